"""HetLoRA: zero-padded averaging weighted by the clients' update norms, and local rank self-pruning."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fedlora.aggregation.factored import frobenius_norm, normalized, squared_product_norm
from fedlora.aggregation.factors import ClientUpdate, GlobalUpdate, LoraFactors, MethodState, example_weights
from fedlora.aggregation.method import MethodOptions, Regularizer, option
from fedlora.aggregation.zeropad import ZeroPad


def kept_rank(rank: int, gamma: float) -> int:
    """The rank self-pruning keeps of ``rank``: ⌊γ·r⌋, at least 1."""
    return max(1, math.floor(gamma * rank))


def tail_norm(factors: LoraFactors, gamma: float) -> Tensor:
    """``‖s·B[:, k:]·A[k:]‖_F`` over the components self-pruning would drop (k = :func:`kept_rank`).

    HetLoRA's local regulariser: a tensor differentiable in A and B, factored (two Gram
    matrices of the tail), with a zero gradient where the tail is zero (a fresh B).
    """
    keep = kept_rank(factors.rank, gamma)
    squared = squared_product_norm(factors.A[keep:], factors.B[:, keep:])
    positive = squared > 0
    # sqrt's slope is infinite at 0: take it of positive values only, so a zero tail gives a zero gradient
    return abs(factors.scale) * torch.where(positive, torch.where(positive, squared, 1.0).sqrt(), 0.0)


def rank_penalty(factors: dict[str, LoraFactors], *, gamma: float, penalty: float) -> Tensor:
    """HetLoRA's term in a client's training loss: ``penalty`` · Σ_modules :func:`tail_norm`."""
    return penalty * sum(tail_norm(module_factors, gamma) for module_factors in factors.values())


def self_pruned_rank(factors: dict[str, LoraFactors], gamma: float,
                     previous_tail: float | None) -> tuple[int, float]:
    """A client's rank for its next round, and its tail norm (summed over modules) now.

    After local training the client prunes to ⌊γ·r⌋ when its tail norm has fallen below
    ``previous_tail``, the value it had after the client's previous round (None: no previous
    round, so no pruning). A pruned client trains and sends the smaller rank from then on.
    """
    ranks = {module_factors.rank for module_factors in factors.values()}
    if len(ranks) != 1:
        raise ValueError(f"self-pruning needs one rank for every module, got ranks {sorted(ranks)}")
    rank = ranks.pop()
    tail = sum(tail_norm(module_factors, gamma).item() for module_factors in factors.values())
    pruned = previous_tail is not None and tail < previous_tail
    return (kept_rank(rank, gamma) if pruned else rank), tail


@dataclass(frozen=True)
class HetLoRAOptions(MethodOptions):
    gamma: float = option(0.99, "self-pruning keeps ⌊γ·r⌋ of a client's rank once its tail norm falls; in (0, 1)")
    penalty: float = option(0.01, "weight of the tail norm in each client's training loss (≥ 0)")

    def __post_init__(self) -> None:
        if not 0 < self.gamma < 1:
            raise ValueError(f"gamma must lie in (0, 1), got {self.gamma!r}")
        if not (math.isfinite(self.penalty) and self.penalty >= 0):
            raise ValueError(f"penalty must be a finite non-negative number, got {self.penalty!r}")


class HetLoRA(ZeroPad):
    """HetLoRA (Cho et al., EMNLP 2024, arXiv 2401.06432): zero-padded average weighted by ‖ΔW_k‖_F.

    Sparsity-weighted aggregation: each client's factors are zero-padded to the largest rank
    (its scale folded into B, as ``zeropad`` does) and averaged with weights
    ‖s_k B_k A_k‖_F / Σ_j ‖s_j B_j A_j‖_F, per module (computed factored). These replace the
    example shares (the paper's rule, under the run's default ``weighting``, ``examples``, and
    under ``uniform`` alike); weights passed explicitly multiply the norms (``processed``: the
    norms times the processed shares); all-zero updates fall back to uniform weights. Distribution by truncation: a client of rank r starts from the first r
    components of the global adapter (:meth:`client_start`, inherited). The average carries
    FedIT's cross terms: it is not Σ p_k ΔW_k.

    Local rank self-pruning: every client adds ``penalty`` · Σ_modules :func:`tail_norm` to its
    training loss (:func:`rank_penalty`), and after a round its rank becomes
    :func:`self_pruned_rank` of what it trained (:meth:`next_rank`). The rule reads only the
    factors the client uploads and the tail norm of its previous upload, so the method applies
    it to the aggregated uploads (the combined update's ``state``) and keeps every client's
    rank and last tail norm once the round is committed (:meth:`client_rank`, checkpointed):
    the rank the client would choose, known to the server without a message. No official code is public; ``gamma = 0.99`` follows public
    reimplementations, ``penalty = 0.01`` is ours.
    """

    name = "hetlora"
    paper = "Cho et al., EMNLP 2024, arXiv 2401.06432"
    exact = False
    sends = "A_k, B_k at its (self-pruned) rank"
    receives = "the norm-weighted zero-padded average, cut to its rank"
    heterogeneous_ranks = True
    Options = HetLoRAOptions

    def __init__(self, options: HetLoRAOptions | None = None, **values):
        super().__init__(options, **values)
        #: client → (its rank from now on, the tail norm of its last upload)
        self.pruning: dict[str, tuple[int, float]] = {}

    def setup(self, context) -> None:
        super().setup(context)
        self.pruning = {}

    def combine(self, updates: list[ClientUpdate], weights: list[float] | Tensor | None = None, *,
                server_round: int | None = None) -> GlobalUpdate:
        given = [1.0] * len(updates) if weights is None else example_weights(updates, weights)
        factors = {}
        for module in updates[0].factors:
            norms = [weight * frobenius_norm(update.factors[module]) for weight, update in zip(given, updates)]
            shares = normalized(norms) if sum(norms) > 0 else normalized(given)
            factors[module] = self.average_module(updates, shares, module)
        pruning = {update.client_id: self.next_rank(update.factors, self.previous_tail(update.client_id))
                   for update in updates}
        return GlobalUpdate(factors=factors, merge=False, state=pruning)

    def commit(self, server_round: int, update: GlobalUpdate) -> None:
        super().commit(server_round, update)
        self.pruning.update(update.state)  # the aggregated clients' ranks move once the round is applied

    def client_rank(self, client_id: str, server_round: int) -> int:
        """The client's rank after its self-pruning so far (its configured rank until then)."""
        return self.pruning[client_id][0] if client_id in self.pruning else super().client_rank(client_id,
                                                                                              server_round)

    def previous_tail(self, client_id: str) -> float | None:
        return self.pruning[client_id][1] if client_id in self.pruning else None

    def regularizer(self) -> Regularizer:
        return Regularizer(f"{__name__}:rank_penalty", {"gamma": self.options.gamma, "penalty": self.options.penalty})

    def next_rank(self, factors: dict[str, LoraFactors], previous_tail: float | None) -> tuple[int, float]:
        """:func:`self_pruned_rank` with this method's ``gamma``."""
        return self_pruned_rank(factors, self.options.gamma, previous_tail)

    def state_dict(self) -> MethodState:
        """The default state plus every client's (rank, last tail norm), as JSON."""
        meta, tensors = super().state_dict()
        return {**meta, "pruning": self.pruning}, tensors

    def load_state_dict(self, state: MethodState) -> None:
        super().load_state_dict(state)
        self.pruning = {cid: (int(rank), float(tail)) for cid, (rank, tail) in state[0]["pruning"].items()}
