"""Every random choice of a run derives from (seed, purpose, round, client), so a resumed run
redraws exactly what the uninterrupted run drew, without carrying RNG state around."""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed determined by ``seed`` and ``parts`` (stable across processes and Pythons)."""
    text = "/".join(str(part) for part in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1
