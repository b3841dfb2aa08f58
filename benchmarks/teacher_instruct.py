"""Does the embedded teacher behave like an instruction-tuned VLM (issue 32)? Builds the teacher under the given
overrides (cached by its recipe hash under `runtime.cache_dir`), then `teacher.prompt_report`: per family, with
rationale, direct (turn prefilled with `Answer:`) and with each held-out instruction sentence (never trained)
after the question. Writes <out>/report.json (rows, resolved params, environment, build and eval seconds).

    .venv/bin/python benchmarks/teacher_instruct.py --set embedded.direct_share=0.25 \\
        --set embedded.instruct_share=0.3 --per-family 200 --heldout 100 --out results/bench/teacher_instruct
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from vskip_core.arguments import parse_sets
from vskip_core.config import load_params
from vskip_core.modeling.loading import load_model
from vskip_core.runtime import atomic_write_json, configure_threads, environment
from vskip_core.teacher import build_info, build_teacher, prompt_report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="params/default.yaml")
    ap.add_argument(
        "--set", action="append", default=[], help="dotted override, e.g. embedded.direct_share=0.25"
    )
    ap.add_argument(
        "--per-family", type=int, default=200, help="test examples per family (rationale, direct)"
    )
    ap.add_argument("--heldout", type=int, default=100, help="test examples per family per held-out sentence")
    ap.add_argument("--split", default="test", help="val to choose a recipe, test to report it")
    ap.add_argument("--out", default="results/bench/teacher_instruct")
    args = ap.parse_args()
    cfg = load_params(args.params, parse_sets(args.set))
    configure_threads(cfg.runtime.num_threads)
    t0 = time.time()
    path = build_teacher(cfg)
    t1 = time.time()
    rows = prompt_report(cfg, load_model(cfg), args.per_family, args.heldout, split=args.split)
    report = {
        "rows": rows,
        "teacher": path.name,
        "build_seconds": build_info(path)["build_seconds"],
        "eval_seconds": time.time() - t1,
        "split": args.split,
        "wall_seconds_this_run": time.time() - t0,
        "params": cfg.to_dict(),
        "environment": environment(),
    }
    atomic_write_json(Path(args.out) / "report.json", report)
    for r in rows:
        d = "" if r["delta"] is None else f"  delta {r['delta']:+.3f}"
        y = "" if r["yes_ratio"] is None else f"  yes {r['yes_ratio']:.2f}"
        print(f"{r['prompt'][:36]:36s} {r['family']:10s} {r['score']:.3f} (n {r['n']}){y}{d}")


if __name__ == "__main__":
    main()
