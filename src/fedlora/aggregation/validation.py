"""Server-side checks of one client update before it is aggregated (robustness, not privacy)."""

from __future__ import annotations

import torch

from fedlora.aggregation.base import AggregationError, ClientUpdate, check_factors, check_num_examples
from fedlora.aggregation.factored import frobenius_norm


def validate_update(update: ClientUpdate, expected_shapes: dict[str, tuple[int, int]] | None = None, *,
                    max_norm: float | None = None, max_examples: int | None = None,
                    dtype: torch.dtype | None = torch.float32) -> None:
    """Raise :class:`AggregationError` (naming client, module and rule) for an unusable update.

    Rules: ``"modules"`` (module set ≠ ``expected_shapes``' keys), ``"shape"`` (dense shape
    ≠ expected, or A's rows ≠ B's columns), ``"dtype"`` (not floating point, or not ``dtype``
    when given), ``"finite"`` (NaN/Inf), ``"norm"`` (‖scale·B·A‖_F > ``max_norm``, computed
    factored), ``"num_examples"`` (not a positive int, or above ``max_examples``).
    """
    client_id = update.client_id
    check_num_examples(update, max_examples)
    if expected_shapes is not None and set(update.factors) != set(expected_shapes):
        missing = sorted(set(expected_shapes) - set(update.factors))
        extra = sorted(set(update.factors) - set(expected_shapes))
        raise AggregationError(f"module set differs from the model's: missing {missing}, unexpected {extra}",
                               client_id=client_id, module=(missing + extra)[0], rule="modules")
    for module, factors in update.factors.items():
        check_factors(factors, client_id=client_id, module=module)
        if dtype is not None and (factors.A.dtype != dtype or factors.B.dtype != dtype):
            raise AggregationError(f"factors are {factors.A.dtype}/{factors.B.dtype}, expected {dtype}",
                                   client_id=client_id, module=module, rule="dtype")
        if expected_shapes is not None and factors.shape != tuple(expected_shapes[module]):
            raise AggregationError(f"update shape {factors.shape} differs from the model's "
                                   f"{tuple(expected_shapes[module])}", client_id=client_id, module=module,
                                   rule="shape")
        if max_norm is not None:
            norm = frobenius_norm(factors)
            if norm > max_norm:
                raise AggregationError(f"update norm {norm:.4g} exceeds the maximum {max_norm:g}",
                                       client_id=client_id, module=module, rule="norm")


def partition_valid(updates: list[ClientUpdate],
                    **rules) -> tuple[list[ClientUpdate], list[AggregationError]]:
    """Split updates into those passing :func:`validate_update` (same keyword ``rules``) and the
    errors of the rejected ones, so a round can proceed without the faulty clients."""
    valid, rejected = [], []
    for update in updates:
        try:
            validate_update(update, **rules)
        except AggregationError as error:
            rejected.append(error)
        else:
            valid.append(update)
    return valid, rejected
