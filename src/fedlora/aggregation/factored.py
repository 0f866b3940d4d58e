"""Linear algebra on factored updates ``scale * B @ A`` that never forms the dense d×n matrix.

Adapted layers of an LLM are large (4096×4096) while LoRA ranks are small, so everything
here works on the d×R and R×n factors: FLoRA's stacking, an SVD of ``B @ A`` through two
thin QRs, truncation to a rank, weighted sums of factors and the Frobenius norm.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from functools import reduce

import torch
from torch import Tensor

from fedlora.aggregation.factors import ClientUpdate, LoraFactors

#: (U, S, Vh) of a factored product: U is d×q, S has q values (descending), Vh is q×n.
Svd = tuple[Tensor, Tensor, Tensor]


def common_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """The dtype every tensor can be cast to without loss (float32 and bfloat16 → float32)."""
    return reduce(torch.promote_types, (tensor.dtype for tensor in tensors))


def normalized(weights: Sequence[float]) -> list[float]:
    """Weights rescaled to sum to 1, as averaging methods use them."""
    total = sum(weights)
    return [weight / total for weight in weights]


def concat(blocks: Sequence[LoraFactors], weights: Sequence[float]) -> LoraFactors:
    """One LoraFactors whose product is ``Σ w_k s_k B_k A_k``, for any mix of ranks.

    B = [w_1 s_1 B_1 | … | w_K s_K B_K], A = [A_1; …; A_K], scale 1: the rank is the sum of
    the blocks' ranks and no information is lost.
    """
    blocks = [block.plain() for block in blocks]  # a core folded into B
    dtype = common_dtype([tensor for block in blocks for tensor in (block.A, block.B)])
    # Concatenating and then scaling the columns in place, while B is still in cache, is
    # faster than writing each scaled block into a strided slice.
    B = torch.cat([block.B.to(dtype) for block in blocks], dim=1)
    B.mul_(torch.cat([torch.full((block.rank,), weight * block.scale, dtype=dtype, device=B.device)
                      for block, weight in zip(blocks, weights)]))
    A = torch.cat([block.A.to(dtype) for block in blocks])
    return LoraFactors(A=A, B=B, scale=1.0)


def stack(updates: Sequence[ClientUpdate], weights: Sequence[float]) -> dict[str, LoraFactors]:
    """FLoRA's stacking per module: ``B @ A == Σ p_k ΔW_k`` exactly (weights used as given)."""
    return {module: concat([update.factors[module] for update in updates], weights)
            for module in updates[0].factors}


def padded_sum(tensors: Sequence[Tensor], weights: Sequence[float], rank_dim: int) -> Tensor:
    """``Σ w_k T_k`` where tensors of lower rank are zero-padded along ``rank_dim`` to the largest."""
    shape = list(tensors[0].shape)
    shape[rank_dim] = max(tensor.shape[rank_dim] for tensor in tensors)
    total = torch.zeros(shape, dtype=common_dtype(tensors), device=tensors[0].device)
    for tensor, weight in zip(tensors, weights):
        total.narrow(rank_dim, 0, tensor.shape[rank_dim]).add_(tensor, alpha=weight)
    return total


def average_factors(blocks: Sequence[LoraFactors], weights: Sequence[float]) -> LoraFactors:
    """``Σ w_k A_k`` and ``Σ w_k B_k`` (zero-padded to the largest rank) with the first block's scale.

    This is the FedIT-style average; its product is *not* ``Σ w_k ΔW_k`` because of the
    cross terms ``w_j w_k B_j A_k``.
    """
    return LoraFactors(A=padded_sum([block.A for block in blocks], weights, rank_dim=0),
                       B=padded_sum([block.B for block in blocks], weights, rank_dim=1),
                       scale=blocks[0].scale)


def factored_svd(B: Tensor, A: Tensor) -> Svd:
    """Thin SVD of ``B @ A`` (B: d×R, A: R×n) from QRs of B and Aᵀ and an SVD of the small core.

    B = Q_b R_b and Aᵀ = Q_a R_a give ``B @ A = Q_b (R_b R_aᵀ) Q_aᵀ``, so only a
    min(d,R)×min(n,R) matrix is decomposed. Computed in float64, returned in B's dtype.
    """
    Q_b, R_b = torch.linalg.qr(B.to(torch.float64))
    Q_a, R_a = torch.linalg.qr(A.to(torch.float64).T)
    U_core, S, Vh_core = torch.linalg.svd(R_b @ R_a.T, full_matrices=False)
    dtype = B.dtype
    return (Q_b @ U_core).to(dtype), S.to(dtype), (Vh_core @ Q_a.T).to(dtype)


def numerical_rank(S: Tensor, size: int) -> int:
    """Singular values above float64 round-off for a matrix whose larger side is ``size``
    (the torch.linalg.matrix_rank tolerance)."""
    if S.numel() == 0 or S[0] == 0:
        return 0
    tolerance = S[0].item() * size * torch.finfo(torch.float64).eps
    return int((S > tolerance).sum())


def truncate(svd: Svd, rank: int | None = None) -> tuple[LoraFactors, float]:
    """Factors B = U·S, A = Vh of the leading ``rank`` singular triplets, and the relative error.

    ``rank=None`` keeps every numerically nonzero value (exact). The error
    ``sqrt(Σ dropped S²) / sqrt(Σ S²)`` is the relative Frobenius error of the truncation.
    At least one triplet is kept so the result is a valid LoRA even for a zero update.
    """
    U, S, Vh = svd
    keep = numerical_rank(S, max(U.shape[0], Vh.shape[1])) if rank is None else rank
    keep = max(1, min(keep, S.numel()))
    energy = S.to(torch.float64).square()
    total = energy.sum().item()
    error = math.sqrt(energy[keep:].sum().item() / total) if total > 0 else 0.0
    return LoraFactors(A=Vh[:keep].contiguous(), B=U[:, :keep] * S[:keep], scale=1.0), error


def refactor(factors: LoraFactors, rank: int | None = None) -> tuple[LoraFactors, float]:
    """Re-factor ``scale * B @ A`` into orthogonal form truncated to ``rank`` (None: exact).

    Returns the new factors (scale 1, rank ≤ min(d, n, R)) and the relative Frobenius error.
    """
    return truncate(factored_svd(factors.scale * factors.B, factors.A), rank)


def refactor_all(factors: dict[str, LoraFactors],
                 rank: int | None = None) -> tuple[dict[str, LoraFactors], float]:
    """:func:`refactor` every module; also returns the largest relative error."""
    refactored, worst = {}, 0.0
    for module, module_factors in factors.items():
        refactored[module], error = refactor(module_factors, rank)
        worst = max(worst, error)
    return refactored, worst


def leading(factors: LoraFactors, rank: int) -> LoraFactors:
    """The first ``rank`` rows of A and columns of B (the best rank-r part of SVD-ordered factors)."""
    return LoraFactors(A=factors.A[:rank], B=factors.B[:, :rank], scale=factors.scale)


def fit_rank(factors: LoraFactors, rank: int, seed: int = 0) -> LoraFactors:
    """The same update as a rank-``rank`` adapter, for a client whose rank differs from the
    global's: its leading components, or, where the client's rank is larger (it was not sampled
    when the global was formed from smaller ranks), the global plus extra components initialised
    as a fresh LoRA: A rows drawn like PEFT's Kaiming-uniform init, B columns zero.

    Padding A with zero rows as well as B with zero columns would leave those components with
    zero gradients for good. The draw is seeded by ``seed`` and the ranks, so a resumed run
    redraws it; callers pass a per-module seed so modules do not share their fresh rows. It is
    made on the CPU and then moved to the factors' device, so it is the same on every device.
    """
    if rank <= factors.rank:
        return leading(factors, rank)
    extra, width = rank - factors.rank, factors.A.shape[1]
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{rank}/{factors.rank}".encode()))
    bound = 1 / math.sqrt(width)  # kaiming_uniform_(a=√5) on an r×n weight
    fresh_A = (torch.rand(extra, width, generator=generator, dtype=torch.float64) * 2 - 1) * bound
    return LoraFactors(A=torch.cat([factors.A, fresh_A.to(device=factors.A.device, dtype=factors.A.dtype)]),
                       B=torch.cat([factors.B, factors.B.new_zeros(factors.B.shape[0], extra)], dim=1),
                       scale=factors.scale)


def fit_ranks(factors: dict[str, LoraFactors], rank: int, seed: int = 0) -> dict[str, LoraFactors]:
    """:func:`fit_rank` for every module, each seeded by ``seed`` and its name."""
    return {module: fit_rank(f, rank, zlib.crc32(f"{seed}/{module}".encode())) for module, f in factors.items()}


def max_rank(factors: dict[str, LoraFactors]) -> int:
    """The largest rank over modules: a scalar for ``GlobalUpdate.info``."""
    return max(module_factors.rank for module_factors in factors.values())


def squared_product_norm(A: Tensor, B: Tensor) -> Tensor:
    """``‖B·A‖_F² = trace((BᵀB)(AAᵀ))`` from two r×r Gram matrices: a tensor in the factors'
    dtype, differentiable in both."""
    # Both Gram matrices are symmetric, so the trace of their product is their elementwise dot.
    return ((B.T @ B) * (A @ A.T)).sum().clamp(min=0)


def frobenius_norm(factors: LoraFactors) -> float:
    """``‖scale·B·A‖_F``, factored (in float64; a core folded into B)."""
    factors = factors.plain()
    squared = squared_product_norm(factors.A.to(torch.float64), factors.B.to(torch.float64)).item()
    return abs(factors.scale) * math.sqrt(squared)
