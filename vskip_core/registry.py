"""The registries of what vskip can be extended with: gate methods, visual-token pruners and model families.

Each entry is registered by the file that defines it (the built-ins by `vskip_core.method.gating`,
`vskip_core.method.pruning` and `vskip_core.modeling.adapters`; yours by your own file, imported before use).
The config validates names against these registries, and the plots and tables take each system's label and
colour from `DISPLAY`, so adding a method touches no other file. docs/API.md, "Add a method in one file".
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownName(ValueError):
    """A name no registry entry has; the message lists the registered names and the nearest one."""


class Registry(Generic[T]):
    """Name -> entry, in registration order."""

    def __init__(self, kind: str, how_to_add: str):
        self.kind = kind
        self.how_to_add = how_to_add
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T, replace: bool = False) -> T:
        if not name or not isinstance(name, str) or any(c in name for c in " @/+"):
            raise ValueError(
                f"{self.kind} name {name!r}: use a non-empty name without spaces, '@', '/' or '+'"
            )
        if name in self._entries and not replace and self._entries[name] is not entry:
            raise ValueError(f"{self.kind} {name!r} is already registered; pass replace=True to redefine it")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise UnknownName(self.unknown(name))
        return self._entries[name]

    def unknown(self, name: str) -> str:
        """The error message for a name not registered: the valid names, the nearest, how to add one."""
        valid = list(self._entries)
        near = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.5)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        return f"unknown {self.kind} {name!r}{hint} Registered: {valid}. To add one: {self.how_to_add}"

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


GATES: Registry = Registry("gate method", "vskip_core.method.gating.register_gate (docs/API.md)")
PRUNERS: Registry = Registry("pruner", "vskip_core.method.pruning.register_pruner (docs/API.md)")
FAMILIES: Registry = Registry("model family", "vskip_core.modeling.adapters.register_family (docs/API.md)")


@dataclass(frozen=True)
class Display:
    """How every table and figure names and colours a system (a gate method, a pruner, or a control)."""

    label: str
    colour: str


_FALLBACK_COLOUR = "#17becf"
DISPLAY: dict[str, Display] = {  # the controls; methods add theirs when they register
    "teacher": Display("teacher", "#222222"),
    "direct": Display("direct answer", "#7f7f7f"),
    "full": Display("full rationale", "#8c564b"),
    "none": Display("no pruning", "#7f7f7f"),
}


def register_display(name: str, label: str, colour: str) -> None:
    DISPLAY[name] = Display(label, colour)


def display(name: str) -> Display:
    """A system's label and colour; an unregistered name is shown as itself in a neutral colour."""
    return DISPLAY.get(name, Display(name, _FALLBACK_COLOUR))


def add(reg: Registry, name: str, entry: T, label: str, colour: str, replace: bool = False) -> T:
    """Register `entry` under `name` in `reg`, with the label and colour every table and figure shows."""
    reg.register(name, entry, replace=replace)
    register_display(name, label, colour)
    return entry


def remove(reg: Registry, name: str) -> None:
    reg.unregister(name)
    DISPLAY.pop(name, None)
