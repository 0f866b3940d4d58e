"""The data every aggregation method works on: plain tensors in, plain tensors out.

A LoRA-adapted linear layer W (d×n) carries an update ``scale * B @ A`` with A: r×n and
B: d×r. Every method (:mod:`fedlora.aggregation.method`) turns a list of :class:`ClientUpdate`
into one :class:`GlobalUpdate`; none of them touches models, files or the network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fedlora.errors import FedloraError

FACTOR_NAMES = ("A", "B")
#: the core between B and A where factors carry one (RAVAN's heads): a plan may train and send it
CORE = "H"


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
    """One adapted module: its update is ``scale * B @ A`` (A: r×n, B: d×r), or, where it carries
    a core H (RAVAN's heads: h blocks of q×q, h·q = r), ``scale * B @ blockdiag(H_1, …, H_h) @ A``."""

    A: Tensor
    B: Tensor
    scale: float = 1.0
    H: Tensor | None = None

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(d, n): the shape of the dense update."""
        return self.B.shape[0], self.A.shape[1]

    def plain(self) -> LoraFactors:
        """The same update without a core: H folded into B (B·blockdiag(H)); itself where it has none."""
        if self.H is None:
            return self
        return LoraFactors(A=self.A, B=self.B @ torch.block_diag(*self.H.to(self.B.dtype)), scale=self.scale)

    def delta(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Tensor:
        """The dense d×n update, computed in ``dtype`` on ``device`` (default: the factors' own)."""
        A, B = self.A.to(device=device, dtype=dtype), self.B.to(device=device, dtype=dtype)
        if self.H is not None:
            B = B @ torch.block_diag(*self.H.to(device=device, dtype=B.dtype))
        return self.scale * (B @ A)

    def numel(self) -> int:
        return self.A.numel() + self.B.numel() + (self.H.numel() if self.H is not None else 0)


def factor_names(factors: dict[str, LoraFactors] | None) -> frozenset[str]:
    """The factors ``factors`` hold: A and B, and H where a module carries a core."""
    core = factors is not None and any(f.H is not None for f in factors.values())
    return frozenset(FACTOR_NAMES) | ({CORE} if core else frozenset())


@dataclass
class ClientUpdate:
    """What one client sends after local training: its factors per module, its data size and the
    examples its training processed this round (steps × batch size as run; None where not reported)."""

    factors: dict[str, LoraFactors]
    num_examples: int
    client_id: str
    num_processed: int | None = None


@dataclass
class GlobalUpdate:
    """What the server computes from one round of client updates.

    ``factors`` is what is broadcast. ``merge`` says how clients use it: merged into the base
    weights, after which every client starts a fresh LoRA (FLoRA), or kept as the global
    adapter the next round starts from (FedIT and kin). ``residual`` (FedEx-LoRA) is a further
    exact correction always merged into the base. ``client_factors`` holds per-client factors
    where a method sends each client its own (FlexLoRA). ``info`` carries diagnostics such as
    the broadcast rank or a truncation error. ``state`` is what a stateful method keeps besides
    (HetLoRA's client ranks): the method adopts it when the update is committed, so nothing of
    a round is held between aggregating and applying it; it never travels.
    """

    factors: dict[str, LoraFactors]
    merge: bool
    residual: dict[str, LoraFactors] = field(default_factory=dict)
    client_factors: dict[str, dict[str, LoraFactors]] = field(default_factory=dict)
    info: dict[str, float | int | str] = field(default_factory=dict)
    state: Any = None

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


#: how a round weighs its clients (the run's ``weighting``): ``examples``, by their dataset sizes
#: (each method's own default rule, which for all but HetLoRA and client-level DP is exactly
#: that); ``uniform``, equally; ``processed``, by the examples their training processed this
#: round (FederatedScope's convention: its clients report ``ctx.num_samples``, summed batch
#: sizes, and its FedAvg weighs by them; uniform when every client runs the same full batches)
WEIGHTINGS = ("examples", "uniform", "processed")


def client_weights(updates: list[ClientUpdate], weighting: str) -> list[float] | None:
    """The p_k a round's ``updates`` are aggregated with under ``weighting`` (shares summing to
    1), or None for ``examples``: the method's own default, the example shares but where its
    rule says otherwise (HetLoRA's update norms, client-level DP's 1/m). The one place a run's
    weighting is turned into weights."""
    if weighting == "examples":
        return None
    if weighting == "uniform":
        return [1 / len(updates)] * len(updates)
    if weighting != "processed":
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    for update in updates:
        if update.num_processed is None:
            raise AggregationError("did not report the examples it processed, which weighting 'processed' needs",
                                   client_id=update.client_id, rule="num_processed")
    total = sum(update.num_processed for update in updates)
    if total <= 0:
        raise AggregationError("no client processed an example this round", rule="weights")
    return [update.num_processed / total for update in updates]


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
    """``num_examples`` is a positive integer, at most ``max_examples`` when that is given;
    ``num_processed``, where reported, a non-negative integer."""
    count = update.num_examples
    if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
        raise AggregationError(f"num_examples must be a positive integer, got {count!r}",
                               client_id=update.client_id, rule="num_examples")
    if max_examples is not None and count > max_examples:
        raise AggregationError(f"num_examples {count} exceeds the maximum {max_examples}",
                               client_id=update.client_id, rule="num_examples")
    processed = update.num_processed
    if processed is not None and (not isinstance(processed, int) or isinstance(processed, bool) or processed < 0):
        raise AggregationError(f"num_processed must be a non-negative integer, got {processed!r}",
                               client_id=update.client_id, rule="num_processed")


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
    if factors.H is not None:
        check_core(factors, client_id=client_id, module=module)


def check_core(factors: LoraFactors, *, client_id: str | None = None, module: str | None = None) -> None:
    """A core's shape (h blocks of q×q with h·q the rank), dtype and finiteness."""
    H = factors.H
    if H.dim() != 3 or H.shape[1] != H.shape[2] or H.shape[0] * H.shape[1] != factors.rank:
        raise AggregationError(f"core H of shape {tuple(H.shape)} is not h blocks of q×q with h·q = rank "
                               f"{factors.rank}", client_id=client_id, module=module, rule="shape")
    if not H.is_floating_point():
        raise AggregationError(f"core H must be floating point, got {H.dtype}", client_id=client_id, module=module,
                               rule="dtype")
    if not torch.isfinite(H).all():
        raise AggregationError("H contains NaN or Inf", client_id=client_id, module=module, rule="finite")


def factors_to_tensors(prefix: str, factors: dict[str, LoraFactors]) -> dict[str, Tensor]:
    """Factors as named tensors (``<prefix><module>.A``/``.B``/``.scale``), as checkpoints store them."""
    tensors = {}
    for module, f in factors.items():
        tensors[f"{prefix}{module}.A"] = f.A.contiguous()
        tensors[f"{prefix}{module}.B"] = f.B.contiguous()
        tensors[f"{prefix}{module}.scale"] = torch.tensor(f.scale, dtype=torch.float64)
        if f.H is not None:
            tensors[f"{prefix}{module}.H"] = f.H.contiguous()
    return tensors


def tensors_to_factors(prefix: str, tensors: dict[str, Tensor]) -> dict[str, LoraFactors]:
    """The factors :func:`factors_to_tensors` stored under ``prefix``."""
    modules = sorted({key[len(prefix):-len(".scale")] for key in tensors
                      if key.startswith(prefix) and key.endswith(".scale")})
    return {m: LoraFactors(tensors[f"{prefix}{m}.A"], tensors[f"{prefix}{m}.B"],
                           float(tensors[f"{prefix}{m}.scale"]), tensors.get(f"{prefix}{m}.H")) for m in modules}


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
