"""The method contract: what a federated LoRA method declares, and the few calls the engine makes.

A method is one module of this package and one line in ``registry.py``. It declares, as PEFT's
tuners do, a typed options dataclass (:class:`MethodOptions`, checked when a run is configured
and listed by ``fedlora methods``) and what it supports (class attributes the configuration
checks: heterogeneous ranks, client-level DP, personalised models, runtimes). Modelled on
Flower's strategies, the engine calls, per run :meth:`Aggregator.setup`; per round
:meth:`Aggregator.plan` for every sampled client (a :class:`ClientPlan`, carried whole in the
client's task, so a client never builds a method), :meth:`Aggregator.accumulator` for the
updates that pass its validation gate (its result is :meth:`Aggregator.combine`'s), then
:meth:`Aggregator.commit` once the round's update is merged; after every round
:meth:`Aggregator.evaluation_adapters`, and :meth:`Aggregator.state_dict` for the checkpoint.
:meth:`Aggregator.arrange` may reshape the run's clients before it starts (the centralized
baseline pools them).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

from fedlora.aggregation.factored import fit_ranks, stack
from fedlora.aggregation.factors import FACTOR_NAMES, AggregationError, ClientUpdate, GlobalUpdate, LoraFactors, \
    MethodState, RunContext, check_updates, example_weights, factor_names, factors_to_tensors, tensors_to_factors
from fedlora.imports import resolve

T = TypeVar("T")


def option(default: Any, help: str) -> Any:
    """A method option's field: its default and the help ``fedlora methods`` and the docs show."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class MethodOptions:
    """A method's options: a frozen dataclass of typed fields declared with :func:`option`, checked
    in ``__post_init__`` (a ValueError saying what is wrong). This base has none. ``fedlora
    methods`` and the docs read the fields from source (:mod:`fedlora.aggregation.facts`)."""


@dataclass(frozen=True)
class Regularizer:
    """A term a client adds to its training loss: ``term(factors, **options)`` on the live factors
    of its LoRA, differentiable in them. Named by reference (``"package.module:function"``) with
    JSON-able options, so a client anywhere computes it without the method."""

    term: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def __call__(self, factors: dict[str, LoraFactors]) -> Tensor | None:
        return resolve(self.term)(factors, **self.options)


@dataclass(frozen=True)
class Drawn:
    """Factors of a plan's start that every client draws itself, the same on every client and so
    never sent (RAVAN's frozen heads): ``draw(start, **options)`` gives the start with the
    ``names`` factors filled in (the server's start already holds them; what a client receives
    holds zeros in their place). Named by reference, as :class:`Regularizer`."""

    draw: str
    names: frozenset[str]
    options: Mapping[str, Any] = field(default_factory=dict)

    def __call__(self, start: dict[str, LoraFactors]) -> dict[str, LoraFactors]:
        return resolve(self.draw)(start, **self.options)


@dataclass(frozen=True)
class ClientPlan:
    """What a method asks of one client in one round."""

    #: the rank the client trains and must send back (the engine rejects any other)
    rank: int
    #: the factors it trains; the others stay as they start
    trainable: frozenset[str] = frozenset(FACTOR_NAMES)
    #: the factors it sends back; the server takes the others from ``start``
    uploads: frozenset[str] = frozenset(FACTOR_NAMES)
    #: what its LoRA starts from (leading components where of a lower rank, the rest fresh with
    #: B zero); None: a fresh LoRA of its own
    start: dict[str, LoraFactors] | None = None
    #: factors it keeps across rounds in its own store, never sent either way (FedSA-LoRA's B):
    #: it starts them from there; the runtime holding the client keeps the store
    kept: frozenset[str] = frozenset()
    #: a term added to its training loss (HetLoRA's rank regulariser); None: none
    regularizer: Regularizer | None = None
    #: factors of ``start`` the client draws itself, never sent (RAVAN's frozen heads); None: none.
    #: A start whose factors carry a core H (RAVAN) gives the client's LoRA that core, trained as "H"
    drawn: Drawn | None = None
    #: factors merged into the client's frozen weights for this round only, under its LoRA
    #: (Fed-PLoRA's untrained modules): it trains from base + folded + start; None: none
    folded: dict[str, LoraFactors] | None = None
    #: train PEFT's AdaLoRA instead of LoRA, from ``rank`` (its init_r) to the budget these
    #: settings give (FLoRA's appendix; keys of :func:`fedlora.lora.adalora.adalora_config`): it
    #: sends, per module, the triplets its budget kept, at most ``rank``; None: LoRA
    adalora: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.kept & self.uploads:
            raise ValueError(f"a client sends {sorted(self.kept & self.uploads)}, which it keeps and never sends")
        if self.start is None and (self.uploads != frozenset(FACTOR_NAMES) or self.kept or self.drawn):
            raise ValueError("a client that does not send every factor needs a start: the server takes the "
                             "factors it does not send from there")
        unknown = (self.trainable | self.uploads) - factor_names(self.start)
        if unknown:
            raise ValueError(f"a client cannot train or send {sorted(unknown)}: its start has no such factor")
        if self.adalora is not None and (self.start is not None or self.trainable != frozenset(FACTOR_NAMES)):
            raise ValueError("an AdaLoRA client trains a fresh adapter, all of it")

    @property
    def sent(self) -> frozenset[str]:
        """The factors of ``start`` the server sends: all but those the client keeps or draws."""
        return factor_names(self.start) - self.kept - (self.drawn.names if self.drawn else frozenset())


@dataclass(frozen=True)
class RunShape:
    """What :meth:`Aggregator.arrange` may change of a run besides its clients."""

    ranks: list[int]
    clients_per_round: int
    local_steps: int | None
    min_clients: int


#: a client expected this round and its rank per module
Slot = tuple[str, dict[str, int]]


class Aggregator(ABC):
    """One federated LoRA method; see the module docstring for the calls the engine makes.

    The default state is the last global update without what was merged into the base weights:
    clients continue from its adapter (or their own entry in ``client_factors``), or start fresh
    after a merge. A method keeping more state returns it as the ``state`` of the update it
    combines and adopts it in :meth:`commit`, which with :meth:`state_dict` and
    :meth:`load_state_dict` it then overrides.
    """

    name: ClassVar[str]
    #: the paper it follows (authors, venue, arXiv id); empty for fedlora's own and the baselines
    paper: ClassVar[str] = ""
    #: whether each round changes the global model by exactly Σ_k p_k Δ_k, the example-weighted
    #: average of the clients' changes (its ``aggregation_error`` is 0 up to rounding); None for
    #: a personalised method, which has no global model
    exact: ClassVar[bool | None] = False
    #: what a client sends and what it downloads, in words (``fedlora methods``, the docs)
    sends: ClassVar[str] = ""
    receives: ClassVar[str] = ""
    #: the method's options (a :class:`MethodOptions` subclass)
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    #: clients of different ranks can be aggregated
    heterogeneous_ranks: ClassVar[bool] = True
    #: client-level DP-FedAvg can protect it: what it broadcasts is a weighted sum of the one
    #: factor its clients upload, the other shared or kept by each client (aggregation/dp.py)
    client_dp: ClassVar[bool] = False
    #: its clients can train with sample-level DP-SGD (``dp``); not where their training does more
    #: than steps of the optimizer (AdaLoRA's budget allocation)
    sample_dp: ClassVar[bool] = True
    #: its clients keep models of their own: each is evaluated where it lives, and their mean reported
    personalised: ClassVar[bool] = False
    #: the runtimes it can run on
    runtimes: ClassVar[tuple[str, ...]] = ("inprocess", "flower")
    #: factors every client keeps in its own store (:attr:`ClientPlan.kept`)
    kept_on_client: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, options: MethodOptions | None = None, **values: Any):
        self.options = options if options is not None else self.Options(**values)
        self.context: RunContext | None = None
        self.global_update: GlobalUpdate | None = None

    # -- the run ---------------------------------------------------------------------------
    @classmethod
    def arrange(cls, clients: dict[str, T], shape: RunShape) -> tuple[dict[str, T], RunShape]:
        """The clients (id → records) the run federates and its shape; by default as given."""
        return clients, shape

    def setup(self, context: RunContext) -> None:
        """Called once before the first round (and before a checkpoint's state is loaded)."""
        self.context = context
        self.global_update = None

    @property
    def seed(self) -> int:
        return self.context.seed if self.context is not None else 0

    # -- configure a round -----------------------------------------------------------------
    def plan(self, client_id: str, server_round: int) -> ClientPlan:
        """What ``client_id`` does in ``server_round`` (1-based): by default both factors trained
        and sent, at its configured rank, from :meth:`start_adapter`, with :attr:`kept_on_client`
        kept; the parts below are what methods override."""
        return ClientPlan(rank=self.client_rank(client_id, server_round), trainable=self.trainable(server_round),
                          uploads=self.uploads(server_round), start=self.start_adapter(client_id, server_round),
                          kept=self.kept_on_client, regularizer=self.regularizer())

    def trainable(self, server_round: int) -> frozenset[str]:
        return frozenset(FACTOR_NAMES)

    def uploads(self, server_round: int) -> frozenset[str]:
        return self.trainable(server_round) - self.kept_on_client

    def client_rank(self, client_id: str, server_round: int) -> int:
        return self.context.ranks[client_id]

    def regularizer(self) -> Regularizer | None:
        return None

    def start_adapter(self, client_id: str, server_round: int) -> dict[str, LoraFactors] | None:
        """The factors ``client_id`` starts this round's LoRA from; None for a fresh LoRA.

        Before any global update, a factor the server does not get back (frozen from the first
        round on, as in FFA-LoRA and RoLoRA, or not uploaded) must be one the server knows, the
        same on every client, so the start is drawn here, from the run's seed (B zero, as a
        fresh LoRA's); so is the start of a method whose clients keep a factor of their own.
        """
        rank = self.client_rank(client_id, server_round)
        if self.global_update is not None:
            return self.client_start(self.global_update, client_id, rank)
        every = frozenset(FACTOR_NAMES)
        if self.trainable(server_round) == self.uploads(server_round) == every:
            return None  # every client draws its own fresh LoRA
        return self.drawn_start(client_id)

    def drawn_start(self, client_id: str) -> dict[str, LoraFactors]:
        """A fresh LoRA for ``client_id`` drawn here, from the run's seed: A as PEFT draws it
        (Kaiming-uniform), B zero; the same for every client of one rank."""
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
        clients' example shares. For callers without an engine."""
        check_updates(updates)
        return self.combine(updates, weights, server_round=server_round)

    @abstractmethod
    def combine(self, updates: list[ClientUpdate], weights: list[float] | Tensor | None = None, *,
                server_round: int | None = None) -> GlobalUpdate:
        """The method's rule, on updates that passed a validation gate (the engine's, or
        :meth:`aggregate`'s check). It changes nothing of the method: what it would keep goes
        into the update's ``state``, adopted by :meth:`commit`."""

    def accumulator(self, slots: Sequence[Slot]) -> Accumulator:
        """A collector for one round's updates as they arrive, from the clients (and ranks per
        module) of ``slots`` (see :class:`Accumulator`)."""
        return Accumulator(self, slots)

    # -- after a round ---------------------------------------------------------------------
    def commit(self, server_round: int, update: GlobalUpdate) -> None:
        """Take the round's global update as the state the next round starts from. What was
        merged lives on in the base weights, so it is not kept (nor checkpointed) here."""
        self.global_update = replace(update, factors={} if update.merge else update.factors, residual={},
                                     state=None)

    def evaluation_adapters(self) -> dict[str | None, dict[str, LoraFactors] | None]:
        """What to evaluate: ``{None: adapter}`` for one global model (the base weights with
        ``adapter`` merged, None for the base alone), or, for a :attr:`personalised` method, one
        entry per client (completed and evaluated where the client's model lives)."""
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
        #: the weights :meth:`result` was last given (None: the method's default)
        self.weights: list[float] | Tensor | None = None

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
        """The method's update of the updates added and not dropped (``weights`` in their order)."""
        self.weights = weights
        return self.aggregator.combine(self.updates(), weights, server_round=server_round)

    def updates(self) -> list[ClientUpdate]:
        """The updates added and not dropped, in slot order."""
        return [self.filled[slot] for slot in sorted(self.filled)]

    def exact_sum(self) -> dict[str, LoraFactors]:
        """``Σ_k p_k s_k B_k A_k`` of the updates added and not dropped, per module, factored
        (FLoRA's stack): what exact aggregation gives, for the engine's aggregation error; ``p_k``
        are the weights :meth:`result` was given, by default the example shares. Only the
        accumulator still holds what the uploads were, so it is asked, after :meth:`result`."""
        updates = self.updates()
        return stack(updates, example_weights(updates, self.weights))
