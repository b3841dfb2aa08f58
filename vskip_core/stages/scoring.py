"""Stage 02 from the command line, for several GPUs (`python -m vskip_core.stages.scoring --shard i/n`)."""

from __future__ import annotations

import sys

from vskip_core.method.scoring import score_rationales


def main(argv: list[str] | None = None) -> int:
    """Stage 02 outside the notebook, for several GPUs: worker i of n scores every n-th kept rationale of
    stage 01 and writes its shards under results/<run>/02_dual_scoring/score_shards/ (one process per GPU,
    `CUDA_VISIBLE_DEVICES=i`). Then run the pipeline (or notebook 02): it reads every worker's shards back,
    scores only what is missing, and writes scores.parquet and the report."""

    from vskip_core.cli import parse_sets, stage_parser
    from vskip_core.config import ParamsError, load_params
    from vskip_core.modeling.loading import load_model
    from vskip_core.runtime import results_dir
    from vskip_core.stages.generation import example_for, kept_rationales, parse_shard

    ap = stage_parser("stages.scoring", main.__doc__)
    ap.add_argument("--shard", default="0/1", help="worker i of n, e.g. 0/4")
    a = ap.parse_args(argv)
    try:
        cfg = load_params(a.params, parse_sets(a.set))
        worker = parse_shard(a.shard)
    except (ParamsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_dir = results_dir(cfg, a.run)
    gen_dir = run_dir / "01_rationale_generation"
    try:
        recs = kept_rationales(cfg, gen_dir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if cfg.model.teacher == "embedded":
        from vskip_core.teacher import build_teacher

        build_teacher(cfg)
    out = run_dir / "02_dual_scoring"
    df = score_rationales(
        load_model(cfg),
        cfg,
        recs,
        [example_for(cfg, r) for r in recs],
        out_dir=out,
        require_answer_line=cfg.generation.keep != "all",
        worker=worker,
    )
    print(f"worker {a.shard}: {len(df)} rationales scored ({df.attrs['resumed']} already in shards) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
