"""What a registered method declares about itself, read from its source without importing it.

``fedlora methods`` (and ``fedlora --help``) must not import torch, so the class attributes a
method declares (paper, exactness, capabilities, what travels), its options and the first line
of its docstring are read from the module's syntax tree, following its base classes through
their imports up to the contract's defaults in ``method.py``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cache
from importlib.util import find_spec
from pathlib import Path
from typing import Any

#: the class attributes read, with the contract's own class as the last resort
ATTRIBUTES = ("paper", "exact", "sends", "receives", "heterogeneous_ranks", "client_dp", "sample_dp", "personalised",
              "runtimes")
CONTRACT = ("fedlora.aggregation.method", "Aggregator")
#: where a lineage ends: the contract's classes (which a method may import from the package's face,
#: where no class is defined) and Python's own
LINEAGE_ROOTS = ("Aggregator", "MethodOptions", "ABC", "object")


@dataclass(frozen=True)
class MethodOption:
    name: str
    default: Any
    help: str


@dataclass(frozen=True)
class MethodFacts:
    name: str
    summary: str
    paper: str
    exact: bool | None
    sends: str
    receives: str
    heterogeneous_ranks: bool
    client_dp: bool
    sample_dp: bool
    personalised: bool
    runtimes: tuple[str, ...]
    options: tuple[MethodOption, ...]


@cache
def _module(module_name: str) -> ast.Module:
    return ast.parse(Path(find_spec(module_name).origin).read_text(encoding="utf-8"))


def _class(module_name: str, class_name: str) -> ast.ClassDef:
    return next(node for node in _module(module_name).body
                if isinstance(node, ast.ClassDef) and node.name == class_name)


def _imported(module_name: str, name: str) -> tuple[str, str]:
    """Where ``module_name`` takes ``name`` from: (module, class); its own module if defined there."""
    for node in _module(module_name).body:
        if isinstance(node, ast.ImportFrom) and any(alias.name == name for alias in node.names):
            return node.module, name
    return module_name, name


def _lineage(module_name: str, class_name: str) -> list[tuple[str, ast.ClassDef]]:
    """The class and its bases, nearest first (first base first), as (module, class node)."""
    node = _class(module_name, class_name)
    lineage = [(module_name, node)]
    for base in node.bases:
        if isinstance(base, ast.Name) and base.id not in LINEAGE_ROOTS:
            lineage += _lineage(*_imported(module_name, base.id))
    return lineage


def _assigned(node: ast.ClassDef) -> dict[str, ast.expr]:
    values = {}
    for statement in node.body:
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1 \
                and isinstance(statement.targets[0], ast.Name):
            values[statement.targets[0].id] = statement.value
        elif isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name) and statement.value:
            values[statement.target.id] = statement.value
    return values


def _options(lineage: list[tuple[str, ast.ClassDef]]) -> tuple[MethodOption, ...]:
    """The fields of the nearest ``Options`` the lineage declares, its bases' first (a dataclass's
    order; a field declared again keeps its place): ``option(default, help)`` each."""
    for module_name, node in lineage:
        declared = _assigned(node).get("Options")
        if isinstance(declared, ast.Name):
            fields: dict[str, MethodOption] = {}
            for _, options in reversed(_lineage(*_imported(module_name, declared.id))):
                for field in options.body:
                    if isinstance(field, ast.AnnAssign) and isinstance(field.value, ast.Call):
                        fields[field.target.id] = MethodOption(field.target.id, ast.literal_eval(field.value.args[0]),
                                                               ast.literal_eval(field.value.args[1]))
            return tuple(fields.values())
    return ()


def method_facts(name: str, target: str) -> MethodFacts:
    """The facts of the method registered as ``name`` at ``target`` (``"module:Class"``)."""
    lineage = _lineage(*target.split(":"))
    values = {}
    for attribute in ATTRIBUTES:
        for _, node in [*lineage, (CONTRACT[0], _class(*CONTRACT))]:
            if attribute in (assigned := _assigned(node)):
                values[attribute] = ast.literal_eval(assigned[attribute])
                break
    summary = (ast.get_docstring(lineage[0][1]) or "").strip().splitlines()[0]
    return MethodFacts(name=name, summary=summary, options=_options(lineage), **values)
