"""Types shared by every aggregation method: plain tensors in, plain tensors out.

A LoRA-adapted linear layer W (d×n) carries an update ``scale * B @ A`` with A: r×n and
B: d×r. Every method module in this package turns a list of :class:`ClientUpdate` into one
:class:`GlobalUpdate`; none of them touches models, files or the network.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch
from torch import Tensor

from fedlora.errors import FedloraError

FACTOR_NAMES = ("A", "B")


class AggregationError(FedloraError):
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

    def delta(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Tensor:
        """The dense d×n update, computed in ``dtype`` on ``device`` (default: the factors' own)."""
        A, B = self.A.to(device=device, dtype=dtype), self.B.to(device=device, dtype=dtype)
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

    def delta(self, module: str, dtype: torch.dtype | None = None,
              device: torch.device | str | None = None) -> Tensor:
        """The dense d×n update of the global model for ``module``."""
        total = self.factors[module].delta(dtype, device)
        if module in self.residual:
            total = total + self.residual[module].delta(dtype, device)
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


def factors_to_tensors(prefix: str, factors: dict[str, LoraFactors]) -> dict[str, Tensor]:
    """Factors as named tensors (``<prefix><module>.A``/``.B``/``.scale``), as checkpoints store them."""
    tensors = {}
    for module, f in factors.items():
        tensors[f"{prefix}{module}.A"] = f.A.contiguous()
        tensors[f"{prefix}{module}.B"] = f.B.contiguous()
        tensors[f"{prefix}{module}.scale"] = torch.tensor(f.scale, dtype=torch.float64)
    return tensors


def tensors_to_factors(prefix: str, tensors: dict[str, Tensor]) -> dict[str, LoraFactors]:
    """The factors :func:`factors_to_tensors` stored under ``prefix``."""
    modules = sorted({key[len(prefix):-len(".scale")] for key in tensors
                      if key.startswith(prefix) and key.endswith(".scale")})
    return {m: LoraFactors(tensors[f"{prefix}{m}.A"], tensors[f"{prefix}{m}.B"],
                           float(tensors[f"{prefix}{m}.scale"])) for m in modules}


@dataclass(frozen=True)
class RunContext:
    """What a method is told of the run before its first round (plain data the engine fills in)."""

    #: every client's rank, in client order
    ranks: dict[str, int]
    #: every client's LoRA scale α/r (α/√r with rsLoRA)
    scales: dict[str, float]
    #: module → (d, n), the shape of its dense update
    shapes: dict[str, tuple[int, int]]
    #: the run's seed; every draw a method makes derives from it
    seed: int = 0


#: (JSON-able metadata, tensors): a method's state as a checkpoint stores it
MethodState = tuple[dict, dict[str, Tensor]]


class Aggregator(ABC):
    """One federated LoRA method (one module per method, registered by name).

    Modelled on Flower's strategies. The engine calls, per run: :meth:`setup`; per round:
    :meth:`trainable`, :meth:`uploads`, :meth:`client_rank` and :meth:`start_adapter` for every
    sampled client (whose training adds :meth:`regularizer` to its loss and keeps the factors
    :attr:`kept_on_client` in its own store), the updates that
    pass its validation gate go into :meth:`accumulator` (→ :meth:`combine`), the result is
    merged into the global model as it says and handed to :meth:`commit`; then
    :meth:`evaluation_adapters` says what to evaluate, and :meth:`state_dict` is checkpointed.
    :meth:`aggregate` is the same combination for callers without an engine: it checks the
    updates first.

    The default state is the last global update without what was merged into the base weights:
    clients continue from its adapter (or their own entry in ``client_factors``), or start fresh
    after a merge. A method keeping other state overrides :meth:`commit`, :meth:`state_dict` and
    :meth:`load_state_dict`.
    """

    name: ClassVar[str]
    #: True where clients of different ranks can be aggregated.
    heterogeneous_ranks: ClassVar[bool] = True
    #: True for a method that trains one client holding every client's records (centralized)
    pools_data: ClassVar[bool] = False
    #: the runtimes the method can run on
    runtimes: ClassVar[tuple[str, ...]] = ("inprocess", "flower")
    #: factors each client keeps across rounds in its own store and never sends either way
    #: (FedSA-LoRA's B): the runtime holding the clients keeps them (see engine/client_state.py)
    kept_on_client: ClassVar[frozenset[str]] = frozenset()

    context: RunContext | None = None
    global_update: GlobalUpdate | None = None

    # -- the run ---------------------------------------------------------------------------
    def setup(self, context: RunContext) -> None:
        """Called once before the first round (and before a checkpoint's state is loaded)."""
        self.context = context
        self.global_update = None

    @property
    def seed(self) -> int:
        return self.context.seed if self.context is not None else 0

    # -- configure a round -----------------------------------------------------------------
    def trainable(self, server_round: int) -> frozenset[str]:
        """Factors clients train in ``server_round`` (1-based); the others stay frozen."""
        return frozenset(FACTOR_NAMES)

    def uploads(self, server_round: int) -> frozenset[str]:
        """Factors clients send back in ``server_round``; the server takes the others from the
        start adapter it sent (a frozen factor), or never knows them (:attr:`kept_on_client`)."""
        return self.trainable(server_round)

    def client_rank(self, client_id: str, server_round: int) -> int:
        """The rank ``client_id`` trains (and must send) in ``server_round``: its configured one
        unless the method changes it (HetLoRA's self-pruning)."""
        return self.context.ranks[client_id]

    def regularizer(self, factors: dict[str, LoraFactors]) -> Tensor | None:
        """A term clients add to their training loss, differentiable in the live ``factors``
        of their LoRA; None: none (the default)."""
        return None

    def start_adapter(self, client_id: str, server_round: int) -> dict[str, LoraFactors] | None:
        """The factors ``client_id`` starts this round's LoRA from; None for a fresh LoRA.

        Factors of a lower rank than the client's fill its LoRA's leading components and the
        others start fresh (B zero), so the client still starts from exactly their update; a
        method whose clients train only one factor returns them at the client's rank.

        Before any global update, a factor the server does not get back (frozen from the first
        round on, as in FFA-LoRA and RoLoRA, or not uploaded) must be one the server knows, the
        same on every client, so the start is drawn here, from the run's seed (B zero, as a
        fresh LoRA's); so is the start of a method whose clients keep a factor of their own.
        """
        rank = self.client_rank(client_id, server_round)
        if self.global_update is not None:
            return self.client_start(self.global_update, client_id, rank)
        every = frozenset(FACTOR_NAMES)
        if self.trainable(server_round) == self.uploads(server_round) == every and not self.kept_on_client:
            return None  # every client draws its own fresh LoRA
        return self.drawn_start(client_id)

    def drawn_start(self, client_id: str) -> dict[str, LoraFactors]:
        """A fresh LoRA for ``client_id`` drawn here, from the run's seed: A as PEFT draws it
        (Kaiming-uniform), B zero; the same for every client of one rank."""
        from fedlora.aggregation.factored import fit_ranks  # factored builds on this module

        empty = {module: LoraFactors(torch.zeros(0, n), torch.zeros(d, 0), self.context.scales[client_id])
                 for module, (d, n) in self.context.shapes.items()}
        return fit_ranks(empty, self.context.ranks[client_id], self.seed)

    def client_start(self, global_update: GlobalUpdate, client_id: str,
                     rank: int) -> dict[str, LoraFactors] | None:
        """Factors a client of ``rank`` initialises its next LoRA from; None for a fresh init."""
        if global_update.merge:
            return None
        return global_update.client_factors.get(client_id, global_update.factors)

    # -- aggregate -------------------------------------------------------------------------
    def aggregate(self, updates: list[ClientUpdate], weights: list[float] | Tensor | None = None, *,
                  server_round: int | None = None) -> GlobalUpdate:
        """Check the updates' structure, then :meth:`combine` them; ``weights`` default to the
        clients' example shares."""
        check_updates(updates)
        return self.combine(updates, weights, server_round=server_round)

    @abstractmethod
    def combine(self, updates: list[ClientUpdate], weights: list[float] | Tensor | None = None, *,
                server_round: int | None = None) -> GlobalUpdate:
        """The method's rule, on updates that passed a validation gate (the engine's, or
        :meth:`aggregate`'s check)."""

    def accumulator(self, slots: Sequence[Slot]) -> Accumulator:
        """A collector for one round's updates as they arrive, from the clients (and ranks per
        module) of ``slots`` (see :class:`Accumulator`)."""
        return Accumulator(self, slots)

    # -- after a round ---------------------------------------------------------------------
    def commit(self, server_round: int, update: GlobalUpdate) -> None:
        """Take the round's global update as the state the next round starts from. What was
        merged lives on in the base weights, so it is not kept (nor checkpointed) here."""
        self.global_update = replace(update, factors={} if update.merge else update.factors, residual={})

    def evaluation_adapters(self) -> dict[str | None, dict[str, LoraFactors] | None]:
        """What to evaluate: ``{None: adapter}`` for one global model (the base weights with
        ``adapter`` merged, None for the base alone), or one entry per client for methods whose
        clients keep models of their own (the engine reports each and their mean)."""
        update = self.global_update
        return {None: update.factors if update is not None and not update.merge and update.factors else None}

    def state_dict(self) -> MethodState:
        update = self.global_update
        if update is None:
            return {"global": None}, {}
        tensors = factors_to_tensors("global/", update.factors)
        for client_id, factors in update.client_factors.items():
            tensors.update(factors_to_tensors(f"client/{client_id}/", factors))
        meta = {"merge": update.merge, "info": update.info, "client_factors": sorted(update.client_factors)}
        return {"global": meta}, tensors

    def load_state_dict(self, state: MethodState) -> None:
        meta, tensors = state
        if meta["global"] is None:
            self.global_update = None
            return
        meta = meta["global"]
        self.global_update = GlobalUpdate(
            factors=tensors_to_factors("global/", tensors), merge=meta["merge"], info=meta["info"],
            client_factors={cid: tensors_to_factors(f"client/{cid}/", tensors) for cid in meta["client_factors"]})


#: a client expected this round and its rank per module
Slot = tuple[str, dict[str, int]]


class Accumulator:
    """One round's updates, added one at a time as clients deliver them.

    ``slots`` are the clients expected, in the order their updates are aggregated whatever
    the order they arrive in, with their ranks per module. Updates are added once they passed
    the engine's validation gate, and are not checked again. This default keeps the updates
    and calls :meth:`Aggregator.combine` at the end. A method that can keep less overrides
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
        return self.aggregator.combine([self.filled[slot] for slot in sorted(self.filled)], weights,
                                       server_round=server_round)

    def exact_sum(self, weights: list[float] | Tensor | None = None) -> dict[str, LoraFactors]:
        """``Σ_k p_k s_k B_k A_k`` of the updates added and not dropped, per module, factored
        (FLoRA's stack): what exact aggregation gives, for the engine's aggregation error; ``p_k``
        are ``weights``, by default the example shares. Only the accumulator still holds what
        the uploads were, so it is asked, after :meth:`result`."""
        from fedlora.aggregation.factored import stack  # factored builds on this module

        updates = [self.filled[slot] for slot in sorted(self.filled)]
        return stack(updates, example_weights(updates, weights))
