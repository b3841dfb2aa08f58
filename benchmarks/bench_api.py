"""Cost of compressing N rationales through the public API against stage 02 + stage 03's gate on the same rows.

Both sides score the same N rationales of a run's stage 01 with the run's teacher and key layers, then keep
gamma of each with one gate method. Stage 02 always runs the blank-image pass too (scoring.blank_image, for
the position-free variants and notebook 02's analysis); the API runs it only for a method that reads it, so
the benchmark also times the API on `vskip_delta` (which does) for an equal-work comparison. The sides run
alternately, `--repeats` times; the ratio of medians is printed with the machine.

    python benchmarks/bench_api.py --run default --n 1000 --repeats 3
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import subprocess
import time

import torch

from vskip_core import Compressor
from vskip_core.common.artifacts import example_for, kept_rationales
from vskip_core.method.gating import gate_rows
from vskip_core.metrics import compress_text
from vskip_core.modeling.loading import load_model
from vskip_core.runtime import cpu_info
from vskip_core.stages.scoring import score_rationales


def stages_02_03(cfg, loaded, recs, exs, method, gamma):
    df = score_rationales(
        loaded, cfg, recs, exs, progress=False, require_answer_line=cfg.generation.keep != "all"
    )
    rows = df.to_dict("records")
    keeps = gate_rows(rows, method, gamma, cfg, cfg.runtime.seed)
    return [compress_text(r, k) for r, k in zip(rows, keeps)]


def api(comp, recs, exs, method, gamma):
    rows = comp.score_records(recs, exs, [method], progress=False)
    return [comp.gate(r, gamma, method).text for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="default")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gamma", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    comp = Compressor.from_run(a.run)
    cfg, run_dir = comp.cfg, comp.cfg.path(comp.cfg.runtime.results_dir) / a.run
    recs = kept_rationales(cfg, run_dir / "01_rationale_generation")[: a.n]
    exs = [example_for(cfg, r) for r in recs]
    # stage 02 as the run ran it (blank-image pass on), at the key layers it chose
    stage_cfg = dataclasses.replace(cfg, scoring=dataclasses.replace(cfg.scoring, blank_image=True))
    loaded = load_model(stage_cfg)
    times: dict[str, list[float]] = {"stages 02+03": [], "API vskip": [], "API vskip_delta": []}
    same = None
    for _ in range(a.repeats):
        t = time.perf_counter()
        ref = stages_02_03(stage_cfg, loaded, recs, exs, "vskip", a.gamma)
        times["stages 02+03"].append(time.perf_counter() - t)
        t = time.perf_counter()
        got = api(comp, recs, exs, "vskip", a.gamma)
        times["API vskip"].append(time.perf_counter() - t)
        t = time.perf_counter()
        api(comp, recs, exs, "vskip_delta", a.gamma)
        times["API vskip_delta"].append(time.perf_counter() - t)
        same = got == ref
    base = statistics.median(times["stages 02+03"])
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    cpu = cpu_info()
    print(
        f"commit {commit}; {cpu['cpu_model']} ({platform.machine()}, kernels {cpu['cpu_capability']}), torch "
        f"threads {a.threads}; run {a.run}, {len(recs)} rationales, gamma {a.gamma}"
    )
    print(f"key layers {comp.key_layers} ({comp.head_reduce}); API texts identical to stages 02+03: {same}")
    print("| path | median s | ratio to stages 02+03 | repeats |")
    print("|---|---|---|---|")
    for k, v in times.items():
        med = statistics.median(v)
        print(f"| {k} | {med:.1f} | {med / base:.2f} | {', '.join(f'{x:.1f}' for x in v)} |")


if __name__ == "__main__":
    main()
