"""RAVAN: h heads s_h·B_h·H_h·A_h on frozen random bases; clients train and send only s_h·H_h, averaged exactly.

Raje, Askin, Jhunjhunwala, Joshi, "Ravan: Multi-Head Low-Rank Adaptation for Federated
Fine-Tuning" (NeurIPS 2025, arXiv 2506.05568). Read: the abstract (arxiv.org/abs/2506.05568, the
NeurIPS 2025 OpenReview page) and, as a second oracle, FedLLM-Factory's implementation
(github.com/boyi-liu/FedLLM-Factory, ``alg/ravan.py``); the method section was not reachable.
What the abstract states: the weight update is reparameterised as a sum of h LoRA heads
s_i·B_i·H_i·A_i in which only the core matrices H_i and their scaling factors s_i are trained,
and clients upload s_i·H_i directly. Implemented as, per adapted module W (d×n), with the run's
rank r per head and h = ``heads``:

    ΔW = s · Σ_h s_h · B_h · H_h · A_h  = s · B · blockdiag(s_1 H_1, …, s_h H_h) · A
         B = [B_1 | … | B_h] (d×hr), A = [A_1; …; A_h] (hr×n): frozen, drawn from the run's seed,
         the same on every client, never sent; H_h (r×r) and s_h trained; s = PEFT's α/(hr)
    client k uploads   G_k,h = s_k,h · H_k,h                       (h·r² numbers per module)
    server             H̄_h = Σ_k p_k G_k,h                          (p_k the run's weights, sum 1)
    next round         every client starts from H_h = H̄_h, s_h = 1  (FedLLM-Factory's ``ravan_s = 1``)

Exact: with B, A and s common to all clients, s·B·blockdiag(H̄)·A = Σ_k p_k ΔW_k. Before round 1
H = 0 (FedLLM-Factory's init), so the model starts at the base. The bases: entries N(0, 1/n)
for A and N(0, 1/d) for B, so that A_h's rows and B_h's columns have unit expected norm (nearly
orthonormal for wide layers); FedLLM-Factory draws N(0, 1) entries, and the paper's
initialisation ablations were not readable. They are drawn on the CPU in float64 from the
run's seed and the module's name (:func:`with_bases`, named in each plan as a
:class:`~fedlora.aggregation.method.Drawn`): bit-identical on the server and on every client,
so only H travels, both ways. The client's adapter is PEFT's LoRA at rank hr with a core
between its frozen factors (fedlora/lora/core.py).

Not from the paper, the run's conventions: ``ranks`` is each head's rank r (FedLLM-Factory's
``lora_rank`` with ``num_heads``), one rank for every client; the rank a client's LoRA has, and
the gate checks, is h·r. Trainable parameters per module: h·(r² + 1), against LoRA's r·(d + n).

Weighting: FedLLM-Factory's implementation weighs by the clients' dataset sizes (``examples``,
the default); the authors' code was not found.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from fedlora.aggregation.factored import normalized
from fedlora.aggregation.factors import CORE, AggregationError, ClientUpdate, GlobalUpdate, LoraFactors, \
    example_weights
from fedlora.aggregation.fedit import require_homogeneous
from fedlora.aggregation.method import Aggregator, ClientPlan, Drawn, MethodOptions, option


@dataclass(frozen=True)
class RAVANOptions(MethodOptions):
    heads: int = option(4, "h, the number of heads s_h·B_h·H_h·A_h (each of the run's rank r)")

    def __post_init__(self) -> None:
        if isinstance(self.heads, bool) or not isinstance(self.heads, int) or self.heads < 1:
            raise ValueError(f"heads must be a positive integer, got {self.heads!r}")


def bases(module: str, shape: tuple[int, int], rank: int, seed: int) -> tuple[Tensor, Tensor]:
    """(A, B) of ``module``'s frozen heads, ``rank`` = h·r rows of A and columns of B, drawn from ``seed``."""
    d, n = shape
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}/ravan/{module}".encode()))
    A = torch.randn(rank, n, generator=generator, dtype=torch.float64) / math.sqrt(n)
    B = torch.randn(d, rank, generator=generator, dtype=torch.float64) / math.sqrt(d)
    return A.float(), B.float()


def with_bases(start: dict[str, LoraFactors], *, seed: int) -> dict[str, LoraFactors]:
    """``start`` with every module's frozen heads drawn from ``seed``: what a client does with the
    start it receives, whose A and B are placeholders of the right shapes."""
    return {module: replace(f, **dict(zip("AB", bases(module, f.shape, f.rank, seed))))
            for module, f in start.items()}


class RAVAN(Aggregator):
    """RAVAN (Raje et al., NeurIPS 2025, arXiv 2506.05568): heads s_h·B_h·H_h·A_h, only s_h·H_h trained and averaged.

    Each client's LoRA is h heads on frozen bases B_h, A_h drawn from the run's seed (never
    sent); it trains the r×r cores H_h and head scales s_h and uploads s_h·H_h; the server
    averages them (exact: the bases and scale are common) and every client starts the next
    round from the average with s_h = 1. See the module docstring for the equations.
    """

    name = "ravan"
    paper = "Raje et al., NeurIPS 2025, arXiv 2506.05568"
    exact = True
    sends = "s_h·H_h (h·r² per module)"
    receives = "H̄ (the frozen heads are drawn from the seed)"
    heterogeneous_ranks = False
    Options = RAVANOptions

    def setup(self, context) -> None:
        super().setup(context)
        self._bases: dict[tuple[str, int], tuple[Tensor, Tensor]] = {}

    def client_rank(self, client_id: str, server_round: int) -> int:
        """h·r: the rank of the client's LoRA, h heads of its configured rank r."""
        return self.options.heads * self.context.ranks[client_id]

    def trainable(self, server_round: int) -> frozenset[str]:
        return frozenset({CORE})

    def plan(self, client_id: str, server_round: int) -> ClientPlan:
        """H trained and sent; A and B drawn by the client from the run's seed."""
        return replace(super().plan(client_id, server_round),
                       drawn=Drawn("fedlora.aggregation.ravan:with_bases", frozenset("AB"), {"seed": self.seed}))

    def start_adapter(self, client_id: str, server_round: int) -> dict[str, LoraFactors]:
        """The frozen heads and the global cores (zero before round 1), at the uploads' scale."""
        rank, heads = self.client_rank(client_id, server_round), self.options.heads
        start = {}
        for module, shape in self.context.shapes.items():
            if (module, rank) not in self._bases:
                self._bases[module, rank] = bases(module, shape, rank, self.seed)
            A, B = self._bases[module, rank]
            if self.global_update is not None:
                start[module] = replace(self.global_update.factors[module], A=A, B=B)
            else:
                start[module] = LoraFactors(A, B, self.context.scales[client_id],
                                            torch.zeros(heads, rank // heads, rank // heads))
        return start

    def combine(self, updates: list[ClientUpdate], weights: list[float] | Tensor | None = None, *,
                server_round: int | None = None) -> GlobalUpdate:
        weights = normalized(example_weights(updates, weights))
        factors = {}
        for module in updates[0].factors:
            require_homogeneous(updates, module, self.name)
            reference = updates[0].factors[module]
            for update in updates:
                here = update.factors[module]
                if here.H is None:
                    raise AggregationError("ravan needs the core H its clients train", client_id=update.client_id,
                                           module=module, rule="shape")
                if not (torch.equal(here.A, reference.A) and torch.equal(here.B, reference.B)):
                    raise AggregationError(f"frozen heads differ from client {updates[0].client_id!r}'s; ravan "
                                           "needs every client to train on the bases drawn from the run's seed",
                                           client_id=update.client_id, module=module, rule="frozen")
            mean = torch.zeros_like(reference.H)
            for weight, update in zip(weights, updates):
                mean.add_(update.factors[module].H.to(mean.dtype), alpha=weight)
            factors[module] = replace(reference, H=mean)
        return GlobalUpdate(factors=factors, merge=False)
