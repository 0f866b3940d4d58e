"""Communication ledger: what every client uploads and downloads, per round.

A client downloads its start adapter and, before it, the merges into the base weights it has
missed since it last took part: the ledger keeps the parameters each round merged and the round
each client's copy of the base weights is merged through (as a runtime with real replicas
reports it, or, without one, as of the client's last reply).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

from fedlora.aggregation import ClientUpdate, LoraFactors
from fedlora.engine.task import ClientTask

BYTES_PER_PARAM = 4  # adapters travel as float32


def factor_params(factors: Mapping[str, LoraFactors] | None, names: frozenset[str] = frozenset("ABH")) -> int:
    """Parameters in the named factors (A, B, a core H where there is one) of every module."""
    if not factors:
        return 0
    return sum(tensor.numel() for f in factors.values() for name in names
               if (tensor := getattr(f, name)) is not None)


@dataclass
class Transfer:
    server_round: int
    client_id: str
    params_up: int
    params_down: int

    @property
    def bytes_up(self) -> int:
        return self.params_up * BYTES_PER_PARAM

    @property
    def bytes_down(self) -> int:
        return self.params_down * BYTES_PER_PARAM


class Ledger:
    """Rows of (round, client, params up, params down); totals and ratios to full fine-tuning.

    ``full_params`` is the parameter count of the whole model: full fine-tuning would upload
    and download all of it per participating client per round.
    """

    def __init__(self, full_params: int, client_ids: Iterable[str]):
        self.full_params = full_params
        self.transfers: list[Transfer] = []
        #: round → parameters it merged into the base weights (rounds that merged some)
        self.merges: dict[int, int] = {}
        #: client → the last round whose merge its copy of the base weights holds
        self.merged_through = {cid: 0 for cid in client_ids}

    def merged(self, server_round: int, params: int) -> None:
        if params:
            self.merges[server_round] = params

    def catchup_params(self, client_id: str, through: int) -> int:
        """Parameters ``client_id`` downloads to be merged through round ``through``."""
        return sum(p for r, p in self.merges.items() if self.merged_through[client_id] < r <= through)

    def charge(self, task: ClientTask, reply: ClientUpdate) -> None:
        """A client that replied to ``task`` (its update accepted or not): it caught up with the
        merges it missed and downloaded its start but for the factors it keeps or draws itself,
        and what it folds into its weights for the round, and uploaded the factors it was asked
        to send."""
        cid, server_round, plan = task.client_id, task.server_round, task.plan
        down = (self.catchup_params(cid, server_round - 1) + factor_params(plan.start, plan.sent)
                + factor_params(plan.folded))
        self.transfers.append(Transfer(server_round, cid, factor_params(reply.factors, plan.uploads), down))
        self.merged_through[cid] = server_round - 1

    def replica_through(self, client_id: str, server_round: int) -> None:
        """A runtime with real replicas says how far ``client_id``'s is merged (after a resume or
        a restart it can be further behind than the ledger assumed)."""
        self.merged_through[client_id] = server_round

    def round_totals(self, server_round: int) -> dict[str, int]:
        rows = [t for t in self.transfers if t.server_round == server_round]
        return {"bytes_up": sum(t.bytes_up for t in rows), "bytes_down": sum(t.bytes_down for t in rows),
                "params_up": sum(t.params_up for t in rows), "params_down": sum(t.params_down for t in rows)}

    def summary(self) -> dict[str, float | int]:
        up = sum(t.params_up for t in self.transfers)
        down = sum(t.params_down for t in self.transfers)
        full = self.full_params * len(self.transfers)  # per participation, one way
        return {
            "bytes_up": up * BYTES_PER_PARAM, "bytes_down": down * BYTES_PER_PARAM,
            "params_up": up, "params_down": down, "participations": len(self.transfers),
            "up_vs_full_finetuning": up / full if full else 0.0,
            "down_vs_full_finetuning": down / full if full else 0.0,
        }

    def state_dict(self) -> tuple[dict, dict]:
        return {"full_params": self.full_params, "transfers": [asdict(t) for t in self.transfers],
                "merges": {str(r): p for r, p in self.merges.items()}, "merged_through": self.merged_through}, {}

    def load_state_dict(self, state: tuple[dict, dict]) -> None:
        meta, _ = state
        self.full_params = meta["full_params"]
        self.transfers = [Transfer(**row) for row in meta["transfers"]]
        self.merges = {int(r): p for r, p in meta["merges"].items()}
        self.merged_through = {cid: int(r) for cid, r in meta["merged_through"].items()}
