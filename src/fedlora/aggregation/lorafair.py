"""LoRA-FAIR: FedIT's averages with B corrected on the server so B'·Ā is closest to Σ p_k ΔW_k."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fedlora.aggregation.factored import concat, frobenius_norm, normalized
from fedlora.aggregation.factors import ClientUpdate, GlobalUpdate, LoraFactors, example_weights
from fedlora.aggregation.fedit import FedIT
from fedlora.aggregation.method import MethodOptions, option


@dataclass(frozen=True)
class LoRAFAIROptions(MethodOptions):
    ridge: float = option(0.0, "λ of the correction's regulariser λ‖s·ΔB‖² (0: the least-squares optimum)")

    def __post_init__(self) -> None:
        if not (math.isfinite(self.ridge) and self.ridge >= 0):
            raise ValueError(f"ridge must be a finite non-negative number, got {self.ridge!r}")


def corrected_B(target: LoraFactors, A: Tensor, B: Tensor, scale: float, ridge: float = 0.0) -> Tensor:
    """B' = B + ΔB, ΔB minimising ``‖T − scale·(B + ΔB)·A‖_F² + ridge·‖scale·ΔB‖_F²`` (closed form).

    With ``T = target.scale·target.B·target.A`` and the thin SVD A = U·Σ·Vᵀ (r×n, small), the
    normal equations give ``scale·ΔB = (T·V − scale·B·U·Σ)·diag(σ / (σ² + ridge))·Uᵀ``, and
    ``T·V`` is formed from the factors (d×R times R×r), never as the dense d×n T. Singular
    values of A below its input precision (σ_1·max(r, n)·eps of A's dtype) count as zero, so
    where A has (numerically) dependent rows ΔB is the minimum-norm solution, not an amplified
    round-off. In float64, returned in B's dtype.
    """
    A64, B64 = A.to(torch.float64), B.to(torch.float64)
    U, S, Vh = torch.linalg.svd(A64, full_matrices=False)
    significant = S > S[0] * max(A.shape) * torch.finfo(A.dtype).eps
    gain = torch.where(significant, S / (S.square() + ridge), 0.0)
    residual_V = (target.scale * target.B.to(torch.float64) @ (target.A.to(torch.float64) @ Vh.T)
                  - scale * B64 @ (U * S))
    return (B64 + (residual_V * gain) @ U.T / scale).to(B.dtype)


class LoRAFAIR(FedIT):
    """LoRA-FAIR (Bian et al., ICCV 2025, arXiv 2411.14961): FedIT's Ā, B̄ plus a server correction ΔB.

    ΔB makes s·(B̄ + ΔB)·Ā the closest update to the ideal Σ p_k ΔW_k that keeps Ā, and
    clients start the next round from the corrected pair (B̄ + ΔB, Ā), with no
    re-initialisation (merge=False). The paper states ΔB = argmin S(ΔW, (B̄+ΔB)Ā) + λ‖ΔB‖
    for a similarity S and solves it iteratively on the server (no public code found); here S
    is the squared Frobenius distance and the regulariser ``ridge``·‖s·ΔB‖², so ΔB has a
    closed form (:func:`corrected_B`), formed from the factors. ``ridge=0`` (default) gives
    the least-squares optimum: the projection of Σ p_k ΔW_k onto Ā's row space, exact when
    that sum's rows lie in it (one client), otherwise still inexact, but never worse than FedIT.
    ``info``: the largest relative Frobenius error to Σ p_k ΔW_k over modules, of FedIT's
    average (``fedit_error``) and of the corrected pair (``residual_error``).

    Weighting: not checked against public code; the run's ``weighting`` (default ``examples``).
    """

    name = "lorafair"
    paper = "Bian et al., ICCV 2025, arXiv 2411.14961"
    exact = False
    sends = "A_k, B_k"
    receives = "Ā and the corrected B"
    Options = LoRAFAIROptions

    def combine(self, updates: list[ClientUpdate], weights: list[float] | Tensor | None = None, *,
                server_round: int | None = None) -> GlobalUpdate:
        average = super().combine(updates, weights, server_round=server_round)
        weights = normalized(example_weights(updates, weights))
        factors, fedit_error, residual_error = {}, 0.0, 0.0
        for module, mean in average.factors.items():
            ideal = concat([update.factors[module] for update in updates], weights)
            corrected = LoraFactors(A=mean.A, B=corrected_B(ideal, mean.A, mean.B, mean.scale, self.options.ridge),
                                    scale=mean.scale)
            fedit_error = max(fedit_error, relative_distance(ideal, mean))
            residual_error = max(residual_error, relative_distance(ideal, corrected))
            factors[module] = corrected
        return GlobalUpdate(factors=factors, merge=False,
                            info={"fedit_error": fedit_error, "residual_error": residual_error})


def relative_distance(target: LoraFactors, approximation: LoraFactors) -> float:
    """``‖ΔW_target − ΔW_approximation‖_F / ‖ΔW_target‖_F``, factored (0 for a zero target)."""
    norm = frobenius_norm(target)
    return frobenius_norm(concat([target, approximation], [1.0, -1.0])) / norm if norm > 0 else 0.0
