"""Name -> function tables looked up one way: `lookup(table, name, key)` returns the entry or raises the one
uniform error, "<key>: unknown '<name>'; choose from a, b, c" (the table's own order), so that every registry
(loss types, advantage scalings, rollout backends, rewards, trackers…) answers a typo the same way."""

from __future__ import annotations

from typing import Mapping, TypeVar

T = TypeVar("T")


def lookup(table: Mapping[str, T], name: object, key: str, *, error: type[Exception] = ValueError,
           hint: str = "") -> T:
    """`table[name]`; an unknown (or unhashable) name raises `error` naming `key`, the name and the choices, then
    `hint` (e.g. "; or give 'package.module:function'")."""
    try:
        return table[name]  # type: ignore[index]
    except (KeyError, TypeError):
        raise error(f"{key}: unknown {name!r}; choose from {', '.join(map(str, table))}{hint}") from None
