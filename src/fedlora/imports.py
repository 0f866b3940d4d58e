"""Objects named by ``"package.module:attribute"`` strings: registered methods, their clients'
regularisers, Flower's app factories, the choices a configuration field offers and the names
the packages export lazily (so that ``fedlora --help`` imports no torch)."""

from __future__ import annotations

from importlib import import_module
from typing import Any


def resolve(reference: str) -> Any:
    """The object ``reference`` names (``attribute`` may be dotted); ValueError for a malformed one."""
    module, _, attribute = reference.partition(":")
    if not module or not attribute:
        raise ValueError(f"reference {reference!r} must look like 'package.module:name'")
    target: Any = import_module(module)
    for part in attribute.split("."):
        target = getattr(target, part)
    return target
