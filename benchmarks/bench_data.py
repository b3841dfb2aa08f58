"""How fast the embedded benchmark generates: 10,000 examples (scene + render + rationale + anchors), and the
same written as a `datasets.Dataset` with PNG-encoded images. Medians over repeats; writes
results/bench/data.json.

    .venv/bin/python benchmarks/bench_data.py [--n 10000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

from vskip_core.config import REPO_ROOT, Config
from vskip_core.data.embedded import build_split, iter_examples
from vskip_core.runtime import atomic_write_json, environment


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cfg = Config()
    gen, ds = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        for _ex in iter_examples(cfg, "train", args.n):
            pass
        gen.append(time.perf_counter() - t)
        t = time.perf_counter()
        build_split(cfg.data, "train", args.n)
        ds.append(time.perf_counter() - t)
    out = {
        "n_examples": args.n,
        "generate_s_median": statistics.median(gen),
        "generate_s_all": gen,
        "dataset_s_median": statistics.median(ds),
        "dataset_s_all": ds,
        "examples_per_s": args.n / statistics.median(gen),
        "env": environment(),
    }
    atomic_write_json(REPO_ROOT / "results" / "bench" / "data.json", out)
    print(
        f"{args.n} examples: generate {out['generate_s_median']:.2f} s (median of {args.repeats}), "
        f"as a datasets.Dataset with PNG images {out['dataset_s_median']:.2f} s"
    )


if __name__ == "__main__":
    main()
