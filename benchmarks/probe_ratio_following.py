"""Does a student follow the requested ratio? Trains students on a finished run's stage-04 datasets with a
given LoRA budget and evaluates ActRatio, accuracy, yes-ratio and VARR per requested ratio on the test split
(against the teacher's own rationale lengths). A probe for the distillation recipe (issue 18), not a stage:
nothing of the run is changed. Writes <out>/probe.json.

    .venv/bin/python benchmarks/probe_ratio_following.py --run-dir results/default --steps 320 \\
        --methods vskip text_only --per-family 30 --out results/bench/probe_320
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vskip_core.config import load_params
from vskip_core.data.real import examples as benchmark_examples
from vskip_core.runtime import atomic_write_json, configure_threads, environment, seed_everything
from vskip_core.stages import distillation as distill
from vskip_core.stages.evaluation import evaluate_system
from vskip_core.teacher import load_teacher


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", default="results/default", help="a run whose stage 04 saved its datasets")
    ap.add_argument("--params", default="params/default.yaml")
    ap.add_argument("--steps", type=int, default=320, help="distill.max_steps of each student")
    ap.add_argument("--methods", nargs="+", default=["vskip", "text_only"])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.9])
    ap.add_argument("--per-family", type=int, default=30, help="test examples per family")
    ap.add_argument("--out", default="results/bench/probe_ratio_following")
    args = ap.parse_args()
    out = Path(args.out)
    cfg = load_params(args.params, {"distill.max_steps": args.steps})
    configure_threads(cfg.runtime.num_threads)
    seed_everything(cfg.runtime.seed)
    datasets = distill.load_datasets(Path(args.run_dir) / "04_qlora_distillation" / "datasets", args.methods)
    t0 = time.time()
    trained = distill.train_students(cfg, datasets, out)
    train_minutes = (time.time() - t0) / 60
    exs = benchmark_examples(cfg, "test", args.per_family * len(cfg.data.families))
    g = cfg.generation
    kw = dict(max_new_tokens=g.max_new_tokens, batch_size=cfg.eval.batch_size, progress=False)
    teacher_recs, _ = evaluate_system(load_teacher(cfg, progress=False), exs, "teacher", None, **kw)
    reference = {r["id"]: r["rationale_tokens"] for r in teacher_recs}
    rows = []
    for m in args.methods:
        student = distill.load_student(cfg, trained[m]["adapter"])
        for r in args.ratios:
            prefix = distill.ratio_prefix(r)
            _, row = evaluate_system(student, exs, m, r, prefix=prefix, reference_tokens=reference, **kw)
            rows.append(
                {k: row[k] for k in ("method", "ratio", "act_ratio", "accuracy", "yes_ratio", "anls")}
            )
            rows[-1]["varr"] = row["varr"]["overall"]
            print(json.dumps(rows[-1]), flush=True)
    atomic_write_json(
        out / "probe.json",
        {
            "steps": args.steps,
            "train_minutes": train_minutes,
            "n_test": len(exs),
            "rows": rows,
            "env": environment(cfg),
        },
    )


if __name__ == "__main__":
    main()
