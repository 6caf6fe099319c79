"""Objective registry: every objective, built-in or third-party, comes from the
``kdtool.objectives`` entry-point group, so both are found by one mechanism.

A plug-in whose import fails is skipped, not fatal: the others stay usable, ``broken()`` says why,
``kdtool objectives`` prints the reason, and asking for that objective by name raises it."""

from __future__ import annotations

from functools import cache
from importlib.metadata import entry_points
from typing import Any

from pydantic import ValidationError

from kdtool.errors import UserError
from kdtool.objective import Objective

GROUP = "kdtool.objectives"


@cache
def _scan() -> tuple[dict[str, type[Objective]], dict[str, str]]:
    """Import every registered plug-in once: ``(name -> class, name -> why it failed)``."""
    found: dict[str, type[Objective]] = {}
    failed: dict[str, str] = {}
    for ep in entry_points(group=GROUP):
        try:
            found[ep.name] = ep.load()
        except Exception as exc:  # a broken plug-in must not break the others: skip it, keep why
            failed[ep.name] = f"{ep.value} failed to import: {type(exc).__name__}: {_first_line(exc)}"
    return dict(sorted(found.items())), dict(sorted(failed.items()))


def reload() -> None:
    """Forget the scan: the next lookup reads the entry points again (a plug-in installed meanwhile)."""
    _scan.cache_clear()


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else "(no message)"


def available() -> dict[str, type[Objective]]:
    """Name -> objective class of every plug-in that imports, sorted by name."""
    return _scan()[0]


def broken() -> dict[str, str]:
    """Name -> one-line reason for every registered plug-in whose import failed (skipped)."""
    return _scan()[1]


def get_class(name: str) -> type[Objective]:
    """The objective class registered as ``name``.

    Raises:
        UserError: ``name`` is a plug-in that failed to import (with the reason), or unknown.
    """
    objectives = available()
    if name in objectives:
        return objectives[name]
    if name in broken():
        raise UserError(f"objective plug-in {name!r} is broken: {broken()[name]}")
    raise UserError(f"unknown objective {name!r}; known objectives: {', '.join(objectives)}")


def get_objective(name: str, **options: Any) -> Objective:
    """Build a registered objective with validated options, e.g. ``get_objective("fkl", ce_weight=0.5)``."""
    cls = get_class(name)
    try:
        return cls(cls.Options(**options))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise UserError(f"invalid options for objective {name!r}: {problems}") from exc


def describe_options(cls: type[Objective]) -> list[tuple[str, str, str]]:
    """(name, default, description) for each option of an objective."""
    rows = []
    for field_name, field in cls.Options.model_fields.items():
        rows.append((field.alias or field_name, repr(field.default), field.description or ""))
    return rows
