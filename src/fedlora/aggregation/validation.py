"""Server-side checks of one client update before it is aggregated (robustness, not privacy)."""

from __future__ import annotations

import torch

from fedlora.aggregation.factors import AggregationError, ClientUpdate, check_factors, check_modules_and_shapes, \
    check_num_examples
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
    for module, factors in update.factors.items():
        check_factors(factors, client_id=client_id, module=module)
        dtypes = [tensor.dtype for tensor in (factors.A, factors.B, factors.H) if tensor is not None]
        if dtype is not None and any(found != dtype for found in dtypes):
            raise AggregationError(f"factors are {'/'.join(map(str, dtypes))}, expected {dtype}",
                                   client_id=client_id, module=module, rule="dtype")
    if expected_shapes is not None:
        check_modules_and_shapes(update, expected_shapes, "the model")
    if max_norm is not None:
        for module, factors in update.factors.items():
            norm = frobenius_norm(factors)
            if norm > max_norm:
                raise AggregationError(f"update norm {norm:.4g} exceeds the maximum {max_norm:g}",
                                       client_id=client_id, module=module, rule="norm")
