"""Baselines that are not aggregation rules: local-only training (and, by configuration,
centralized training: one client holding all data, aggregated trivially by FLoRA)."""

from __future__ import annotations

from fedlora.aggregation import Aggregator, ClientUpdate, GlobalUpdate, check_updates


class LocalOnly(Aggregator):
    """No aggregation: every client keeps training its own adapter, round after round."""

    name = "local"

    def aggregate(self, updates: list[ClientUpdate], weights=None, *, server_round: int | None = None) -> GlobalUpdate:
        check_updates(updates)
        return GlobalUpdate(factors={}, merge=False,
                            client_factors={u.client_id: u.factors for u in updates})
