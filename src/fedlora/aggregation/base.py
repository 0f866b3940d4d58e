"""Types shared by every aggregation method: plain tensors in, plain tensors out.

A LoRA-adapted linear layer W (d×n) carries an update ``scale * B @ A`` with A: r×n and
B: d×r. Every method module in this package turns a list of :class:`ClientUpdate` into one
:class:`GlobalUpdate`; none of them touches models, files or the network.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

FACTOR_NAMES = ("A", "B")


class AggregationError(ValueError):
    """An update that cannot be aggregated; names the client, the module and the rule broken."""

    def __init__(self, message: str, *, client_id: str | None = None, module: str | None = None,
                 rule: str = "invalid"):
        where = ", ".join(
            part for part in (f"client {client_id!r}" if client_id is not None else "",
                              f"module {module!r}" if module is not None else "") if part)
        super().__init__(f"{where}: {message}" if where else message)
        self.client_id = client_id
        self.module = module
        self.rule = rule


@dataclass(frozen=True)
class LoraFactors:
    """One adapted module: its update is ``scale * B @ A`` (A: r×n, B: d×r)."""

    A: Tensor
    B: Tensor
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(d, n): the shape of the dense update."""
        return self.B.shape[0], self.A.shape[1]

    def delta(self, dtype: torch.dtype | None = None) -> Tensor:
        A, B = (self.A, self.B) if dtype is None else (self.A.to(dtype), self.B.to(dtype))
        return self.scale * (B @ A)

    def numel(self) -> int:
        return self.A.numel() + self.B.numel()


@dataclass
class ClientUpdate:
    """What one client sends after local training: its factors per module and its data size."""

    factors: dict[str, LoraFactors]
    num_examples: int
    client_id: str


@dataclass
class GlobalUpdate:
    """What the server computes from one round of client updates.

    ``factors`` is what is broadcast. ``merge`` says how clients use it: merged into the base
    weights, after which every client starts a fresh LoRA (FLoRA), or kept as the global
    adapter the next round starts from (FedIT and kin). ``residual`` (FedEx-LoRA) is a further
    exact correction always merged into the base. ``client_factors`` holds per-client factors
    where a method sends each client its own (FlexLoRA). ``info`` carries diagnostics such as
    the broadcast rank or a truncation error.
    """

    factors: dict[str, LoraFactors]
    merge: bool
    residual: dict[str, LoraFactors] = field(default_factory=dict)
    client_factors: dict[str, dict[str, LoraFactors]] = field(default_factory=dict)
    info: dict[str, float | int | str] = field(default_factory=dict)

    def delta(self, module: str, dtype: torch.dtype | None = None) -> Tensor:
        """The dense d×n update of the global model for ``module``."""
        total = self.factors[module].delta(dtype)
        if module in self.residual:
            total = total + self.residual[module].delta(dtype)
        return total

    @property
    def modules(self) -> list[str]:
        return list(self.factors)


def example_weights(updates: list[ClientUpdate], weights: list[float] | Tensor | None) -> list[float]:
    """Aggregation weights p_k: the clients' shares of examples unless given explicitly."""
    if weights is None:
        total = sum(u.num_examples for u in updates)
        return [u.num_examples / total for u in updates]
    weights = [float(w) for w in weights]
    if len(weights) != len(updates):
        raise AggregationError(f"{len(weights)} weights given for {len(updates)} client updates",
                               rule="weights")
    for update, weight in zip(updates, weights):
        if not math.isfinite(weight) or weight < 0:
            raise AggregationError(f"weight {weight} must be finite and non-negative",
                                   client_id=update.client_id, rule="weights")
    if sum(weights) <= 0:
        raise AggregationError("weights sum to zero", rule="weights")
    return weights


def check_updates(updates: list[ClientUpdate]) -> None:
    """Structural checks every method needs; raises AggregationError naming client and module."""
    if not updates:
        raise AggregationError("no client updates to aggregate", rule="empty")
    reference = updates[0]
    reference_shapes = {module: factors.shape for module, factors in reference.factors.items()}
    for update in updates:
        check_update(update, reference_shapes, f"client {reference.client_id!r}")


def check_update(update: ClientUpdate, shapes: dict[str, tuple[int, int]], source: str) -> None:
    """One update's example count, factors, module set and shapes (those of ``source``)."""
    check_num_examples(update)
    for module, factors in update.factors.items():
        check_factors(factors, client_id=update.client_id, module=module)
    check_modules_and_shapes(update, shapes, source)


def check_modules_and_shapes(update: ClientUpdate, shapes: dict[str, tuple[int, int]], source: str) -> None:
    """The update adapts exactly the modules of ``shapes`` at those dense shapes (``source``
    says whose shapes they are, for the error)."""
    modules, expected = set(update.factors), set(shapes)
    if modules != expected:
        missing, extra = sorted(expected - modules), sorted(modules - expected)
        raise AggregationError(f"module set differs from {source}: missing {missing}, unexpected {extra}",
                               client_id=update.client_id, module=(missing + extra)[0], rule="modules")
    for module, factors in update.factors.items():
        if factors.shape != tuple(shapes[module]):
            raise AggregationError(f"update shape {factors.shape} differs from {tuple(shapes[module])} of {source}",
                                   client_id=update.client_id, module=module, rule="shape")


def check_num_examples(update: ClientUpdate, max_examples: int | None = None) -> None:
    """``num_examples`` is a positive integer, at most ``max_examples`` when that is given."""
    count = update.num_examples
    if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
        raise AggregationError(f"num_examples must be a positive integer, got {count!r}",
                               client_id=update.client_id, rule="num_examples")
    if max_examples is not None and count > max_examples:
        raise AggregationError(f"num_examples {count} exceeds the maximum {max_examples}",
                               client_id=update.client_id, rule="num_examples")


def check_factors(factors: LoraFactors, *, client_id: str | None = None, module: str | None = None) -> None:
    """Shape, rank and finiteness of one module's factors."""
    A, B = factors.A, factors.B
    if A.dim() != 2 or B.dim() != 2:
        raise AggregationError(f"A and B must be matrices, got shapes {tuple(A.shape)} and {tuple(B.shape)}",
                               client_id=client_id, module=module, rule="shape")
    if A.shape[0] != B.shape[1]:
        raise AggregationError(
            f"declared rank {A.shape[0]} (rows of A) does not match B's {B.shape[1]} columns",
            client_id=client_id, module=module, rule="shape")
    if A.shape[0] < 1:
        raise AggregationError("rank must be at least 1", client_id=client_id, module=module, rule="shape")
    if not A.is_floating_point() or not B.is_floating_point():
        raise AggregationError(f"factors must be floating point, got {A.dtype} and {B.dtype}",
                               client_id=client_id, module=module, rule="dtype")
    for name, tensor in (("A", A), ("B", B)):
        # A finite sum proves every entry finite (NaN and Inf propagate) and costs a third of an
        # elementwise isfinite; only an overflowing sum needs the elementwise check.
        if not torch.isfinite(tensor.sum()) and not torch.isfinite(tensor).all():
            raise AggregationError(f"{name} contains NaN or Inf", client_id=client_id, module=module,
                                   rule="finite")
    if not math.isfinite(factors.scale):
        raise AggregationError(f"scale {factors.scale} is not finite", client_id=client_id, module=module,
                               rule="finite")


class Aggregator(ABC):
    """One federated LoRA aggregation method (one module per method, registered by name).

    Modelled on Flower's strategies: :meth:`trainable` is the per-round configuration sent to
    clients, :meth:`aggregate` turns their updates into the global update, and
    :meth:`client_start` says which factors a client starts its next round from.
    """

    name: ClassVar[str]
    #: True where clients of different ranks can be aggregated.
    heterogeneous_ranks: ClassVar[bool] = True

    def trainable(self, server_round: int) -> frozenset[str]:
        """Factors clients train in ``server_round`` (1-based); the others stay frozen."""
        return frozenset(FACTOR_NAMES)

    @abstractmethod
    def aggregate(self, updates: list[ClientUpdate], weights: list[float] | Tensor | None = None, *,
                  server_round: int | None = None) -> GlobalUpdate:
        """Combine client updates; ``weights`` default to the clients' example shares."""

    def accumulator(self, slots: Sequence[Slot]) -> Accumulator:
        """A collector for one round's updates as they arrive, from the clients (and ranks per
        module) of ``slots`` (see :class:`Accumulator`)."""
        return Accumulator(self, slots)

    def client_start(self, global_update: GlobalUpdate, client_id: str,
                     rank: int) -> dict[str, LoraFactors] | None:
        """Factors a client of ``rank`` initialises its next LoRA from; None for a fresh init."""
        if global_update.merge:
            return None
        return global_update.client_factors.get(client_id, global_update.factors)


#: a client expected this round and its rank per module
Slot = tuple[str, dict[str, int]]


class Accumulator:
    """One round's updates, added one at a time as clients deliver them.

    ``slots`` are the clients expected, in the order their updates are aggregated whatever
    the order they arrive in, with their ranks per module. This default keeps the updates and
    calls :meth:`Aggregator.aggregate` at the end. A method that can keep less overrides
    :meth:`Aggregator.accumulator`: FLoRA's copies each update into its slot of the stack, so
    a server that lets go of each upload once added never holds every upload and the stack at
    once. Either way :meth:`result` equals ``aggregate`` over the updates added and not
    dropped, in slot order.
    """

    def __init__(self, aggregator: Aggregator, slots: Sequence[Slot]):
        self.aggregator = aggregator
        self.slots = list(slots)
        self.filled: dict[int, ClientUpdate] = {}  # slot → the update added there

    def add(self, update: ClientUpdate) -> None:
        """Take in one update; AggregationError for one that cannot join (it is not added)."""
        self.filled[self.free_slot(update)] = update

    def free_slot(self, update: ClientUpdate) -> int:
        """The first slot of the update's client not yet filled."""
        slot = next((i for i, (client_id, _) in enumerate(self.slots)
                     if client_id == update.client_id and i not in self.filled), None)
        if slot is None:
            raise AggregationError("sent an update this round has no place for", client_id=update.client_id,
                                   rule="unexpected")
        return slot

    def drop(self, client_id: str) -> int:
        """Forget the (first) update of ``client_id``, e.g. one :meth:`result` refused; its slot."""
        slot = next(i for i in sorted(self.filled) if self.filled[i].client_id == client_id)
        del self.filled[slot]
        return slot

    def result(self, weights: list[float] | Tensor | None = None, *, server_round: int | None = None) -> GlobalUpdate:
        return self.aggregator.aggregate([self.filled[slot] for slot in sorted(self.filled)], weights,
                                         server_round=server_round)
