"""What the server asks of one client in one round, and what the client sends back.

These are the only objects that cross between the round loop and client training, so the
in-process and Flower runtimes carry exactly the same information.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedlora.aggregation import ClientPlan, ClientUpdate, LoraFactors


@dataclass(frozen=True)
class ClientTask:
    """One client's instructions for one round (Flower: its ConfigRecord + ArrayRecord)."""

    client_id: str
    server_round: int
    #: what the method asks of the client: rank, factors to train and send, start, kept factors,
    #: regulariser
    plan: ClientPlan
    alpha: float
    #: seeds the fresh LoRA initialisation; shared by all clients of a round so that methods
    #: with a frozen shared factor (FFA-LoRA, RoLoRA, FedIT) start from the same A
    init_seed: int
    #: seeds this client-round's batch order
    data_seed: int
    local_steps: int
    #: sample-level DP-SGD (fedlora.engine.dp_sgd): noise multiplier σ and per-example clip
    #: norm; None: plain training
    dp_noise_multiplier: float | None = None
    dp_max_grad_norm: float | None = None
    #: seeds DP-SGD's batches and noise; None: the client draws a secret seed
    dp_noise_seed: int | None = None


@dataclass
class ClientResult:
    """One client's answer: its update and how training went."""

    update: ClientUpdate
    #: mean training loss; None when the client withholds it (DP-SGD: the loss is not privatised)
    train_loss: float | None
    steps: int
    seconds: float


@dataclass(frozen=True)
class ClientFailure:
    """A sampled client that did not deliver a usable update this round."""

    client_id: str
    server_round: int
    reason: str


@dataclass(frozen=True)
class Contribution:
    """What the server keeps of an accepted reply once its factors are in the aggregate (the
    start it sent is its own: the aggregation error subtracts it)."""

    client_id: str
    num_examples: int
    train_loss: float | None
    seconds: float
    start: dict[str, LoraFactors] | None
