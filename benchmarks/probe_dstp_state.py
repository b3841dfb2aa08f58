"""Which decoding state should the prompt-aware host re-select with under DSTP (issue 19)? For each
`prune.dstp_window` (the last N decoded tokens' mean embedding stands in for the prompt), the prompt-aware
pruner + DSTP at each retention on the test split: accuracy per family, re-selections and swaps per example,
and how much of the host's prefill set each re-selection keeps. A probe, not a stage. Writes <out>/probe.json.

    .venv/bin/python benchmarks/probe_dstp_state.py --windows 1 4 16 --retentions 0.333 0.111 --per-family 30
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

from vskip_core.config import load_params
from vskip_core.data.real import examples as benchmark_examples
from vskip_core.method.pruning import PruneSpec
from vskip_core.metrics import family_metrics, headline, score_example
from vskip_core.runtime import atomic_write_json, configure_threads, environment
from vskip_core.stages.pruning import generate_pruned
from vskip_core.teacher import load_teacher


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="params/default.yaml")
    ap.add_argument("--method", default="zspaprune")
    ap.add_argument("--windows", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--state", default="decoded", choices=["decoded", "prompt+decoded"])
    ap.add_argument("--retentions", type=float, nargs="+", default=[0.333, 0.111])
    ap.add_argument("--per-family", type=int, default=30)
    ap.add_argument("--out", default="results/bench/probe_dstp_state")
    args = ap.parse_args()
    cfg = load_params(args.params, {})
    configure_threads(cfg.runtime.num_threads)
    loaded = load_teacher(cfg, progress=False)
    exs = benchmark_examples(cfg, "test", args.per_family * len(cfg.data.families))
    rows = []
    for r in args.retentions:
        for w in [0, *args.windows]:  # 0: the host without DSTP
            spec = PruneSpec.from_config(cfg, args.method, r, dstp=w > 0)
            if w:
                spec = dataclasses.replace(spec, dstp_window=w, dstp_state=args.state)
            gens = generate_pruned(loaded, exs, spec, cfg.generation.max_new_tokens, cfg.prune.batch_size)
            scored = [score_example(x, g["text"]) for x, g in zip(exs, gens)]
            overlaps = [o for g in gens for o in g["host_overlap"]]
            rows.append(
                {
                    "retention": r,
                    "window": w or None,
                    "state": args.state if w else None,
                    "accuracy": headline(family_metrics(exs, scored)),
                    "reselections": statistics.fmean(g["reselections"] for g in gens),
                    "swapped_in": statistics.fmean(g["swapped_in"] for g in gens),
                    "host_overlap": statistics.fmean(overlaps) if overlaps else None,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    atomic_write_json(
        Path(args.out) / "probe.json", {"rows": rows, "n_test": len(exs), "env": environment(cfg)}
    )


if __name__ == "__main__":
    main()
