"""The command line shared by every `python -m vskip_core.stages.<stage>` entry point."""

from __future__ import annotations

import argparse
from typing import Any

from vskip_core.config import ParamsError


def stage_parser(module: str, doc: str | None):
    """The command line every `python -m vskip_core.stages.<stage>` entry point shares: --params, --run, --set
    (parse the result with `parse_sets(args.set)`); callers add their own options."""
    ap = argparse.ArgumentParser(prog=f"python -m vskip_core.{module}", description=doc)
    ap.add_argument("--params", default="params/default.yaml")
    ap.add_argument("--run", default="default")
    ap.add_argument("--set", action="append", default=[], help="dotted override, e.g. gate.gamma=0.5")
    return ap


def parse_sets(sets: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for s in sets:
        if "=" not in s:
            raise ParamsError(f"--set {s!r}: expected key=value, for example --set gate.gamma=0.5")
        k, v = s.split("=", 1)
        out[k.strip()] = v
    return out
