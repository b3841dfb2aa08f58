"""Does a student follow the requested ratio? Builds the distillation data from a finished run's stages 01 and
02 (no stage 03 or 04 needed) under the given overrides (`--set distill.ratio_position=turn_start`, ...),
trains one student per method, and evaluates ActRatio, accuracy, yes-ratio and VARR per requested ratio on
the test split (against the teacher's own rationale lengths). A probe for the distillation recipe (issue 18),
not a stage: nothing of the run is changed. Writes <out>/probe.json.

    .venv/bin/python benchmarks/probe_ratio_following.py --run-dir results/default \\
        --set distill.max_steps=160 --methods vskip text_only --per-family 20 --out results/bench/probe_a
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vskip_core.arguments import parse_sets
from vskip_core.config import load_params
from vskip_core.data.real import examples as benchmark_examples
from vskip_core.runtime import atomic_write_json, configure_threads, environment, seed_everything
from vskip_core.stages import distillation as distill
from vskip_core.stages.evaluation import evaluate_system, teacher_reference
from vskip_core.stages.gating import student_tokenizer
from vskip_core.teacher import load_teacher


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", default="results/default", help="a run whose stages 01 and 02 finished")
    ap.add_argument("--params", default="params/default.yaml")
    ap.add_argument("--set", action="append", default=[], help="dotted override, e.g. distill.max_steps=160")
    ap.add_argument("--methods", nargs="+", default=["vskip", "text_only"])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.9])
    ap.add_argument("--per-family", type=int, default=20, help="test examples per family")
    ap.add_argument("--out", default="results/bench/probe_ratio_following")
    args = ap.parse_args()
    out, run_dir = Path(args.out), Path(args.run_dir)
    cfg = load_params(args.params, parse_sets(args.set))
    configure_threads(cfg.runtime.num_threads)
    seed_everything(cfg.runtime.seed)
    d = cfg.distill
    rows = distill.training_rows(run_dir / "01_rationale_generation", run_dir / "02_dual_scoring")[0]
    rows, _ = distill.with_external_columns(
        cfg, rows, distill.external_columns(args.methods), [run_dir / "03_gate_ablations"], out / "external"
    )
    datasets, _ = distill.build_datasets(
        cfg, rows,
        args.methods, d.ratios, distill.GateCompressor(cfg),
        student_tokenizer(cfg), seed=cfg.runtime.seed, keep=cfg.generation.keep, max_examples=d.max_examples,
    )  # fmt: skip
    datasets = {m: datasets[m] for m in args.methods}
    t0 = time.time()
    trained = distill.train_students(cfg, datasets, out)
    train_minutes = (time.time() - t0) / 60
    exs = benchmark_examples(cfg, "test", args.per_family * len(cfg.data.families))
    g = cfg.generation
    kw = dict(max_new_tokens=g.max_new_tokens, batch_size=cfg.eval.batch_size, progress=False)
    teacher_recs, _ = evaluate_system(load_teacher(cfg, progress=False), exs, "teacher", None, **kw)
    reference = teacher_reference(teacher_recs)
    rows = []
    for m in args.methods:
        student = distill.load_student(cfg, trained[m]["adapter"])
        for r in args.ratios:
            prompt = distill.ratio_prompt(cfg, 1.0 if m == distill.CONTROL else r)
            _, row = evaluate_system(student, exs, m, r, **prompt, reference=reference, **kw)
            keys = ("method", "ratio", "act_ratio", "accuracy", "yes_ratio", "anls")
            rows.append({k: row[k] for k in keys} | {"varr": row["varr"]["overall"]})
            print(json.dumps(rows[-1]), flush=True)
            if m == distill.CONTROL:
                break
    atomic_write_json(
        out / "probe.json",
        {
            "overrides": args.set,
            "train_minutes": train_minutes,
            "last_loss": {m: t["last_loss"] for m, t in trained.items()},
            "n_test": len(exs),
            "rows": rows,
            "env": environment(cfg),
        },
    )


if __name__ == "__main__":
    main()
