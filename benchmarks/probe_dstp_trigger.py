"""When should DSTP re-select (issue 19)? For each trigger (`prune.dstp_interval` k: every k steps;
`prune.dstp_shift_threshold` j: also when the host's new set overlaps the set in use by less than j; k = 1000
means only the threshold fires), each host + DSTP at each retention on the test split: accuracy per family,
re-selections and swapped-in tokens per decoded token, and decode time per token (batch 32, medians over
batches; the trade-off's cost side, not a latency benchmark). A probe, not a stage. Writes <out>/probe.json.

    .venv/bin/python benchmarks/probe_dstp_trigger.py --split val --per-family 100 --retentions 0.333 0.111

Choose a trigger on `val`: stage 07 reports its claims on the test split.
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

TRIGGERS = [(1, 0.0), (4, 0.0), (8, 0.0), (16, 0.0), (8, 0.5), (1000, 0.3), (1000, 0.5), (1000, 0.7)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="params/default.yaml")
    ap.add_argument("--methods", nargs="+", default=["fastv", "divprune", "zspaprune"])
    ap.add_argument("--retentions", type=float, nargs="+", default=[0.333, 0.111])
    ap.add_argument("--per-family", type=int, default=30)
    ap.add_argument("--split", default="val", choices=["train", "val", "test"])
    ap.add_argument(
        "--triggers", nargs="+", default=[f"{k}:{j}" for k, j in TRIGGERS], help="interval:threshold"
    )
    ap.add_argument("--out", default="results/bench/probe_dstp_trigger")
    args = ap.parse_args()
    cfg = load_params(args.params, {})
    configure_threads(cfg.runtime.num_threads)
    loaded = load_teacher(cfg, progress=False)
    exs = benchmark_examples(cfg, args.split, args.per_family * len(cfg.data.families))
    triggers = [(int(t.split(":")[0]), float(t.split(":")[1])) for t in args.triggers]
    rows = []
    for m in args.methods:
        for r in args.retentions:
            for trig in [None, *triggers]:  # None: the host without DSTP
                spec = PruneSpec.from_config(cfg, m, r, dstp=trig is not None)
                if trig:
                    spec = dataclasses.replace(spec, dstp_interval=trig[0], dstp_shift_threshold=trig[1])
                gens = generate_pruned(loaded, exs, spec, cfg.generation.max_new_tokens, cfg.prune.batch_size)
                scored = [score_example(x, g["text"]) for x, g in zip(exs, gens)]
                tokens = sum(len(g["token_ids"]) for g in gens)
                rows.append(
                    {
                        "method": m,
                        "retention": r,
                        "interval": trig[0] if trig else None,
                        "threshold": trig[1] if trig else None,
                        "accuracy": headline(family_metrics(exs, scored)),
                        "reselections_per_token": sum(g["reselections"] for g in gens) / tokens,
                        "swapped_per_token": sum(g["swapped_in"] for g in gens) / tokens,
                        "decode_s_per_token": statistics.median(g["decode_s_per_token"] for g in gens),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
                atomic_write_json(
                    Path(args.out) / "probe.json",
                    {"rows": rows, "split": args.split, "n": len(exs), "env": environment(cfg)},
                )


if __name__ == "__main__":
    main()
