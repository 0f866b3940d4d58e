"""Communication ledger: what every client uploads and downloads, per round."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

from fedlora.aggregation import LoraFactors

BYTES_PER_PARAM = 4  # adapters travel as float32


def factor_params(factors: Mapping[str, LoraFactors] | None, names: frozenset[str] = frozenset("AB")) -> int:
    """Parameters in the named factors (A and/or B) of every module."""
    if not factors:
        return 0
    return sum(getattr(f, name).numel() for f in factors.values() for name in names)


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

    def __init__(self, full_params: int, transfers: list[Transfer] | None = None):
        self.full_params = full_params
        self.transfers = transfers or []

    def record(self, server_round: int, client_id: str, params_up: int, params_down: int) -> None:
        self.transfers.append(Transfer(server_round, client_id, params_up, params_down))

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

    def state_dict(self) -> dict:
        return {"full_params": self.full_params, "transfers": [asdict(t) for t in self.transfers]}

    @classmethod
    def from_state_dict(cls, state: dict) -> Ledger:
        return cls(state["full_params"], [Transfer(**row) for row in state["transfers"]])
