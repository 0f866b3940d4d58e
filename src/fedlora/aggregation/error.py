"""How inexact a round was: the relative distance between two sums of factored updates.

A round's *aggregation error* is ``‖Δ_global − Σ_k p_k Δ_k‖_F / ‖Σ_k p_k Δ_k‖_F`` over all
adapted modules together, where Δ_k is the change client k's update makes to the model it
started from (its final ``s_k B_k A_k`` minus its start's) and Δ_global the change the round
makes to the global model (what was merged into the base weights, plus the new global adapter,
minus the old one). Its *broadcast error* is, per client, ``‖S_k − G‖_F / ‖G‖_F`` for the
adapter S_k the client starts its next round from and the global adapter G, example-weighted.

Both are differences of sums ``Σ_i c_i s_i B_i A_i``, so they are computed from the factors:
the blocks are concatenated once (B: d×R, A: R×n), ``B = Q_b R_b`` and ``Aᵀ = Q_a R_a`` by thin
QRs, and ``‖Σ_i c_i s_i B_i A_i‖_F = ‖R_b diag(c) R_aᵀ‖_F``, an R×R matrix. Subtracting in
that small core (not subtracting squared norms) keeps a difference of 1e-8 of the whole
measurable. Blocks that are the same object (a start every client shares, the old global
adapter) are merged first, so their coefficients cancel exactly. In float64 throughout.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from fedlora.aggregation.factors import GlobalUpdate, LoraFactors
from fedlora.aggregation.method import Aggregator


class FactoredSum:
    """``Σ_i c_i · s_i B_i A_i`` per module, kept as its terms: no product is formed."""

    def __init__(self) -> None:
        #: module → id(factors) → (factors, coefficient); the same object's coefficients add up
        self.terms: dict[str, dict[int, tuple[LoraFactors, float]]] = {}

    def add(self, factors: Mapping[str, LoraFactors] | None, coefficient: float = 1.0) -> FactoredSum:
        """Add ``coefficient`` times every module's update of ``factors`` (None: nothing)."""
        for module, module_factors in (factors or {}).items():
            terms = self.terms.setdefault(module, {})
            _, previous = terms.get(id(module_factors), (module_factors, 0.0))
            terms[id(module_factors)] = (module_factors, previous + coefficient)
        return self


def _core_norms(blocks: list[LoraFactors], coefficients: list[list[float]]) -> list[float]:
    """``‖Σ_i c_i s_i B_i A_i‖_F²`` for each coefficient list ``c`` (one value per block)."""
    blocks = [block.plain() for block in blocks]  # a core folded into B
    ranks = [block.rank for block in blocks]
    B = torch.cat([block.B.to(torch.float64) * block.scale for block in blocks], dim=1)
    A = torch.cat([block.A.to(device=B.device, dtype=torch.float64) for block in blocks])
    R_b = torch.linalg.qr(B, mode="r")[1]
    R_a = torch.linalg.qr(A.T, mode="r")[1]
    norms = []
    for column_coefficients in coefficients:
        scaling = torch.cat([torch.full((rank,), c, dtype=torch.float64, device=B.device)
                             for rank, c in zip(ranks, column_coefficients)])
        norms.append(float(torch.linalg.matrix_norm((R_b * scaling) @ R_a.T).square()))
    return norms


def relative_error(actual: FactoredSum, target: FactoredSum) -> float | None:
    """``‖actual − target‖_F / ‖target‖_F`` over all modules of both; 0.0 when both are zero,
    None when only the target is (the ratio is undefined)."""
    error_squared = target_squared = 0.0
    for module in sorted(set(actual.terms) | set(target.terms)):
        ours, theirs = actual.terms.get(module, {}), target.terms.get(module, {})
        keys = list(dict.fromkeys([*ours, *theirs]))
        blocks = [(ours.get(key) or theirs[key])[0] for key in keys]
        ours_c = [ours[key][1] if key in ours else 0.0 for key in keys]
        theirs_c = [theirs[key][1] if key in theirs else 0.0 for key in keys]
        difference = [a - b for a, b in zip(ours_c, theirs_c)]
        if not any(difference) and not any(theirs_c):
            continue
        module_error, module_target = _core_norms(blocks, [difference, theirs_c])
        error_squared += module_error
        target_squared += module_target
    if target_squared == 0.0:
        return 0.0 if error_squared == 0.0 else None
    return math.sqrt(error_squared / target_squared)


def round_errors(method: Aggregator, before: Mapping[str | None, Mapping[str, LoraFactors] | None],
                 update: GlobalUpdate, uploaded: Mapping[str, LoraFactors],
                 starts: Sequence[tuple[Mapping[str, LoraFactors] | None, float]],
                 client_weights: Mapping[str, float], next_round: int) -> dict[str, float | None]:
    """A committed round's ``aggregation_error`` and ``broadcast_error``.

    ``before`` is what the method evaluated before the round; ``uploaded`` the aggregated
    clients' ``Σ p_k s_k B_k A_k`` (the accumulator's exact sum) and ``starts`` each one's start
    with its p_k; ``client_weights`` weigh every client's broadcast deviation (next round's
    starts against the global adapter), for a method with one global model.
    """
    after = method.evaluation_adapters()
    exact = FactoredSum().add(uploaded)
    for start, weight in starts:
        exact.add(start, -weight)
    achieved = (FactoredSum().add(update.factors if update.merge else None).add(update.residual)
                .add(after[None]).add(before[None], -1.0))
    broadcast = 0.0
    for client_id, weight in client_weights.items():
        plan = method.plan(client_id, next_round)  # what it folds into its weights is part of its start
        deviation = relative_error(FactoredSum().add(plan.start).add(plan.folded), FactoredSum().add(after[None]))
        if deviation is None:
            broadcast = None
            break
        broadcast += weight * deviation
    return {"aggregation_error": relative_error(achieved, exact), "broadcast_error": broadcast}
