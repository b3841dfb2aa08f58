"""Throughput of the external SmolLM2 scorer (stage 03's `external_lm` column, the largest cost of that stage):
teacher-forced surprisal of gold rationales of the embedded benchmark, each with its question as context, at
each torch thread count. Medians over repeats; writes results/bench/external.json. Run it on an otherwise idle
machine: the ratio between thread counts is the figure to read.

    .venv/bin/python benchmarks/bench_external.py [--n 256] [--repeats 3] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vskip_core.common.external import EXTERNAL_BATCH_SIZE
from vskip_core.config import REPO_ROOT, Config
from vskip_core.data.embedded import iter_examples
from vskip_core.modeling.external_lm import load_smollm2, score_texts
from vskip_core.modeling.prompts import user_text
from vskip_core.runtime import atomic_write_json, environment


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=256, help="rationales scored per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    cfg = Config()
    exs = list(iter_examples(cfg, "train", args.n))
    texts, contexts = [x["rationale"] for x in exs], [user_text(x) for x in exs]
    lm = load_smollm2(cfg)
    rows = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        score_texts(
            lm, texts[:EXTERNAL_BATCH_SIZE], contexts[:EXTERNAL_BATCH_SIZE], EXTERNAL_BATCH_SIZE
        )  # warm-up
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            scored = score_texts(lm, texts, contexts, EXTERNAL_BATCH_SIZE)
            times.append(time.perf_counter() - t)
        n_tokens = sum(len(s["surprisal"]) for s in scored)
        rows[str(threads)] = {
            "seconds_median": statistics.median(times),
            "seconds_all": times,
            "external_tokens": n_tokens,
            "tokens_per_s": n_tokens / statistics.median(times),
        }
        print(
            f"{threads} thread(s): {rows[str(threads)]['tokens_per_s']:.0f} external tokens/s (median of {args.repeats})"
        )
    base = rows[str(args.threads[0])]["seconds_median"]
    out = {
        "n_texts": args.n,
        "batch_size": EXTERNAL_BATCH_SIZE,
        "dtype": str(next(lm.model.parameters()).dtype),
        "by_threads": rows,
        "speedup_vs_first": {k: base / v["seconds_median"] for k, v in rows.items()},
        "env": environment(),
    }
    path = REPO_ROOT / "results" / "bench" / "external.json"
    atomic_write_json(path, out)
    print(f"speedup vs {args.threads[0]} thread(s): {out['speedup_vs_first']}  -> {path}")


if __name__ == "__main__":
    main()
