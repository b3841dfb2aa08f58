"""Argument parsing shared by every `python -m vskip_core.<module>` entry point (the `vskip` command: vskip_core.cli)."""

from __future__ import annotations

import argparse
from typing import Any

from vskip_core.config import ParamsError


def stage_parser(module: str, doc: str | None, workers: bool = False):
    """The command line every `python -m vskip_core.stages.<stage>` entry point shares: --params, --run, --set
    (parse the result with `parse_sets(args.set)`), and with `workers` --shard i/n (`parse_shard`); callers
    add their own options."""
    ap = argparse.ArgumentParser(prog=f"python -m vskip_core.{module}", description=doc)
    ap.add_argument("--params", default="params/default.yaml")
    ap.add_argument("--run", default="default")
    ap.add_argument("--set", action="append", default=[], help="dotted override, e.g. gate.gamma=0.5")
    if workers:
        ap.add_argument("--shard", default="0/1", help="worker i of n, e.g. 0/4")
    return ap


def parse_sets(sets: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for s in sets:
        if "=" not in s:
            raise ParamsError(f"--set {s!r}: expected key=value, for example --set gate.gamma=0.5")
        k, v = s.split("=", 1)
        out[k.strip()] = v
    return out


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n), worker i of n (0-based)."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected i/n, e.g. 0/4 (worker 0 of 4)") from None
    if not (0 <= i < n):
        raise ValueError(f"--shard {text!r}: need 0 <= i < n")
    return i, n
