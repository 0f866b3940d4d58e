"""FLoRA: stack the clients' factors so the global update is exactly Σ p_k ΔW_k, for any ranks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from dataclasses import dataclass

from fedlora.aggregation.factored import max_rank, refactor_all, stack
from fedlora.aggregation.factors import AggregationError, ClientUpdate, GlobalUpdate, LoraFactors, example_weights
from fedlora.aggregation.method import Accumulator, Aggregator, MethodOptions, Slot, option

COMPRESS_MODES = ("none", "exact")


@dataclass(frozen=True)
class FLoRAOptions(MethodOptions):
    compress: str | int = option("none", "'none': broadcast the stack (rank ΣR); 'exact': re-factor it to its "
                                         "numerical rank at no loss; an int: truncate to that rank by SVD")
    shuffle: int | None = option(None, "a seed permuting the clients' blocks in the stack (the product is unchanged)")

    def __post_init__(self) -> None:
        valid_rank = isinstance(self.compress, int) and not isinstance(self.compress, bool) and self.compress >= 1
        if self.compress not in COMPRESS_MODES and not valid_rank:
            raise ValueError(f"compress must be 'none', 'exact' or a positive rank, got {self.compress!r}")


class FLoRA(Aggregator):
    """Stacking aggregation (Wang et al., 2024): B = [p_1 s_1 B_1 | … | p_K s_K B_K], A = [A_1; …; A_K].

    The global update is merged into the base weights and every client starts a fresh LoRA.
    Weights are used as given (not normalised), so ``B @ A == Σ p_k ΔW_k``.

    ``compress``: ``"none"`` broadcasts the stack (rank ΣR); ``"exact"`` re-factors it to its
    numerical rank (≤ min(d, n, ΣR)) at no loss; an int truncates to that rank via a factored
    SVD and reports the relative Frobenius error in ``info["truncation_error"]``.
    ``shuffle``: a seed that permutes the order of the stacked client blocks (so the position
    of a block does not reveal its client); the product is unchanged.

    Weighting: the public code (ATP-1010/FederatedLLM, ``fed_utils/model_aggregation.py``) weighs
    the clients by their dataset sizes: ``weighting = "examples"``, the default.
    """

    name = "flora"
    paper = "Wang et al., NeurIPS 2024, arXiv 2409.05976"
    exact = True
    sends = "A_k, B_k at its rank"
    receives = "the stack (rank Σ r_k of the round), merged; then a fresh LoRA"
    Options = FLoRAOptions

    def combine(self, updates: list[ClientUpdate], weights: list[float] | Tensor | None = None, *,
                server_round: int | None = None) -> GlobalUpdate:
        # All updates at hand: one concatenation is fastest (copying blocks into a preallocated
        # stack, as the accumulator must, writes B's columns strided: ~1.6x slower). A test
        # holds both bit-identical.
        weights = example_weights(updates, weights)
        order = self.block_order(len(updates))
        return self.broadcast(stack([updates[i] for i in order], [weights[i] for i in order]))

    def accumulator(self, slots: Sequence[Slot]) -> Stacking:
        return Stacking(self, slots)

    def block_order(self, count: int) -> list[int]:
        """The order of the clients' blocks in the stack: as added, or permuted by ``shuffle``."""
        if self.options.shuffle is None:
            return list(range(count))
        generator = torch.Generator().manual_seed(self.options.shuffle)
        return torch.randperm(count, generator=generator).tolist()

    def broadcast(self, stacked: dict[str, LoraFactors]) -> GlobalUpdate:
        """The global update of a stack, compressed as configured."""
        error, compress = 0.0, self.options.compress
        if compress != "none":
            stacked, error = refactor_all(stacked, None if compress == "exact" else compress)
        return GlobalUpdate(factors=stacked, merge=True,
                            info={"broadcast_rank": max_rank(stacked), "truncation_error": error})


class Stacking(Accumulator):
    """FLoRA's stack, filled as updates arrive.

    Every expected client has a slot: its rows of the stacked A and its columns of the stacked
    B, per module. An added update is copied into its slot at once, so a server that lets go
    of each upload once added holds the stack plus one upload, never every upload and the
    stack. Dropped or missing clients are cut out at the end, and the columns of B are scaled
    by p_k s_k then, when every weight is known; the result equals concatenating the blocks.
    """

    def __init__(self, aggregator: FLoRA, slots: Sequence[Slot]):
        super().__init__(aggregator, slots)
        self.offsets: dict[str, list[int]] = {}  # module → each slot's first row of the stack
        self.A: dict[str, Tensor] = {}
        self.B: dict[str, Tensor] = {}
        self.scales: dict[int, dict[str, float]] = {}  # slot → module → the client's scale
        self._taken = False
        self.stacked: dict[str, LoraFactors] | None = None  # the stack, once the result is taken

    def add(self, update: ClientUpdate) -> None:
        """Copy a gate-checked update into its slot."""
        slot = self.free_slot(update)
        ranks = self.slots[slot][1]
        for module, factors in update.factors.items():  # the slot's layout, not validation
            if factors.rank != ranks.get(module):
                raise AggregationError(f"rank {factors.rank} differs from the expected {ranks.get(module)}",
                                       client_id=update.client_id, module=module, rule="shape")
        for module, factors in update.factors.items():
            start, rows = self._offset(module, slot), factors.rank
            A, B = self._buffers(module, factors)
            A[start:start + rows].copy_(factors.A)
            B[:, start:start + rows].copy_(factors.B)
        self.filled[slot] = ClientUpdate({}, update.num_examples, update.client_id,  # the weight needs no more
                                         update.num_processed)
        self.scales[slot] = {module: factors.scale for module, factors in update.factors.items()}

    def drop(self, client_id: str) -> int:
        slot = super().drop(client_id)
        del self.scales[slot]
        return slot

    def result(self, weights: list[float] | Tensor | None = None, *, server_round: int | None = None) -> GlobalUpdate:
        """The stacked update. B is scaled in place, so this is called once."""
        if self._taken:
            raise RuntimeError("a Stacking's result is taken once: its buffers became the stack")
        present = sorted(self.filled)
        if not present:
            raise AggregationError("no client updates to aggregate", rule="empty")
        self.weights = weights
        weights = example_weights([self.filled[slot] for slot in present], weights)
        self._taken = True
        order = self.aggregator.block_order(len(present))
        blocks = [(present[i], weights[i]) for i in order]
        stacked = {}
        for module in list(self.A):
            A, B = self.A.pop(module), self.B.pop(module)
            if [slot for slot, _ in blocks] != list(range(len(self.slots))):  # a client missing or reordered
                index = torch.cat([torch.arange(self._offset(module, slot), self._offset(module, slot + 1),
                                                device=A.device) for slot, _ in blocks])
                A, B = A.index_select(0, index), B.index_select(1, index)
            B.mul_(torch.cat([torch.full((self.slots[slot][1][module],), weight * self.scales[slot][module],
                                         dtype=B.dtype, device=B.device) for slot, weight in blocks]))
            stacked[module] = LoraFactors(A=A, B=B, scale=1.0)
        self.stacked = stacked
        return self.aggregator.broadcast(stacked)

    def exact_sum(self) -> dict[str, LoraFactors]:
        """The stack :meth:`result` formed (the uploads themselves are gone), with its weights."""
        if self.stacked is None:
            raise RuntimeError("a Stacking's exact sum is the stack its result formed: take the result first")
        return self.stacked

    def _offset(self, module: str, slot: int) -> int:
        if module not in self.offsets:
            starts, total = [], 0
            for _, ranks in self.slots:
                starts.append(total)
                total += ranks.get(module, 0)
            self.offsets[module] = starts + [total]
        return self.offsets[module][slot]

    def _buffers(self, module: str, factors: LoraFactors) -> tuple[Tensor, Tensor]:
        """The module's stacked A and B, allocated on first use on the device of the first update's
        factors, and widened to a wider dtype."""
        dtype = torch.promote_types(factors.A.dtype, factors.B.dtype)
        if module not in self.A:
            total = self._offset(module, len(self.slots))
            (d, n) = factors.shape
            self.A[module] = torch.empty(total, n, dtype=dtype, device=factors.A.device)
            self.B[module] = torch.empty(d, total, dtype=dtype, device=factors.A.device)
        elif torch.promote_types(self.A[module].dtype, dtype) != self.A[module].dtype:
            dtype = torch.promote_types(self.A[module].dtype, dtype)
            self.A[module], self.B[module] = self.A[module].to(dtype), self.B[module].to(dtype)
        return self.A[module], self.B[module]
