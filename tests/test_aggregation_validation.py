"""Server-side validation of single client updates: one test per rule, plus partitioning."""

from __future__ import annotations

import pytest
import torch

from fedlora.aggregation import AggregationError, ClientUpdate, LoraFactors
from fedlora.aggregation.validation import validate_update

SHAPES = {"q_proj": (12, 10), "v_proj": (8, 10)}


def update(client_id: str = "c0", num_examples: int = 5, rank: int = 3, dtype=torch.float32,
           scale: float = 2.0) -> ClientUpdate:
    generator = torch.Generator().manual_seed(0)
    factors = {module: LoraFactors(A=torch.randn(rank, n, generator=generator, dtype=dtype),
                                   B=torch.randn(d, rank, generator=generator, dtype=dtype), scale=scale)
               for module, (d, n) in SHAPES.items()}
    return ClientUpdate(factors, num_examples, client_id)


def dense_norm(factors: LoraFactors) -> float:
    return (factors.scale * factors.B.double() @ factors.A.double()).norm().item()


def test_a_good_update_passes_every_rule():
    good = update()
    limit = max(dense_norm(f) for f in good.factors.values()) * 1.001
    validate_update(good, SHAPES, max_norm=limit, max_examples=5)


def replace_factors(target: ClientUpdate, **changes) -> None:
    factors = target.factors["q_proj"]
    target.factors["q_proj"] = LoraFactors(**{"A": factors.A, "B": factors.B, "scale": factors.scale,
                                              **changes})


def missing_module(target):
    del target.factors["v_proj"]


def wrong_shape(target):
    replace_factors(target, A=torch.randn(3, 11), B=torch.randn(12, 3))


def rank_mismatch(target):
    replace_factors(target, B=torch.randn(12, 2))


def wrong_dtype(target):
    replace_factors(target, A=target.factors["q_proj"].A.double(), B=target.factors["q_proj"].B.double())


def integer_factors(target):
    replace_factors(target, A=torch.ones(3, 10, dtype=torch.int64), B=torch.ones(12, 3, dtype=torch.int64))


def not_finite(target):
    target.factors["q_proj"].A[1, 2] = float("nan")


def infinite_scale(target):
    replace_factors(target, scale=float("inf"))


CASES = {
    "modules": (missing_module, "modules", "v_proj"),
    "shape": (wrong_shape, "shape", "q_proj"),
    "rank": (rank_mismatch, "shape", "q_proj"),
    "dtype": (wrong_dtype, "dtype", "q_proj"),
    "integer": (integer_factors, "dtype", "q_proj"),
    "nan": (not_finite, "finite", "q_proj"),
    "scale": (infinite_scale, "finite", "q_proj"),
}


@pytest.mark.parametrize("case", CASES)
def test_each_rule_names_client_module_and_rule(case):
    corrupt, rule, module = CASES[case]
    bad = update("bad")
    corrupt(bad)
    with pytest.raises(AggregationError) as error:
        validate_update(bad, SHAPES)
    assert error.value.rule == rule
    assert error.value.client_id == "bad" and error.value.module == module
    assert "client 'bad'" in str(error.value) and f"module {module!r}" in str(error.value)


def test_norm_is_computed_factored_and_bounded():
    good = update(scale=-1.5)
    norm = max(dense_norm(f) for f in good.factors.values())
    validate_update(good, max_norm=norm * (1 + 1e-6))
    with pytest.raises(AggregationError) as error:
        validate_update(good, max_norm=norm * (1 - 1e-6))
    assert error.value.rule == "norm" and error.value.module in SHAPES


@pytest.mark.parametrize("count, limit", [(0, None), (-1, None), (2.5, None), (True, None), (11, 10)])
def test_num_examples_rule(count, limit):
    with pytest.raises(AggregationError) as error:
        validate_update(update("counted", num_examples=count), max_examples=limit)
    assert error.value.rule == "num_examples" and "client 'counted'" in str(error.value)


def test_dtype_none_accepts_any_float():
    validate_update(update(dtype=torch.float64), SHAPES, dtype=None)
