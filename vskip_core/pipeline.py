"""Run the numbered notebooks headless with papermill, resumably.

    python -m vskip_core.pipeline --params params/default.yaml --run default
    python -m vskip_core.pipeline --params params/smoke.yaml --run smoke --stages 00,01 --set gate.gamma=0.3

Each stage writes `results/<run>/<stage>/` with `executed.ipynb`, `params.json`, `env.json`, its outputs and
(when it measures something) `metrics.json`. A stage whose `.done` fingerprint (resolved params + notebook code
cells) matches, whose `executed.ipynb` exists and whose outputs are those `.done` recorded (size, sha256) is
skipped; once a stage runs, every stage that reads it reruns. Stages whose inputs are ready run side by side
(`--jobs`, 2 on a CPU-only machine with 2+ cores: each stage uses `runtime.num_threads`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from vskip_core.arguments import parse_sets
from vskip_core.config import ENV_PARAMS, ENV_RUN, REPO_ROOT, STAGE_READS, ParamsError, load_params
from vskip_core.infra.plan import PlanError, print_plan
from vskip_core.method import gating, pruning  # noqa: F401  (register the built-ins params are checked against)
from vskip_core.runtime import (
    ENV_LIVE,
    atomic_write_json,
    changed_output,
    file_sha256,
    output_files,
    results_dir,
    stage_fingerprint,
)

NOTEBOOKS = REPO_ROOT / "notebooks"


def reads(stage: str, stages: list[str]) -> list[str]:
    """The stages of `stages` that `stage` waits for: what it reads (`config.STAGE_READS`, else every earlier
    stage), directly or through stages it reads, so `--stages 01,03` still runs 03 after 01."""
    if stage not in STAGE_READS:
        return [s for s in stages if s < stage]
    seen: set[str] = set()
    todo = list(STAGE_READS[stage])
    while todo:
        s = todo.pop()
        if s not in seen:
            seen.add(s)
            todo += STAGE_READS.get(s, ())
    return [s for s in stages if s in seen]


def direct_reads(stage: str) -> list[str]:
    """The stages `stage` reads itself (`config.STAGE_READS`; every earlier stage when it is not listed)."""
    if stage in STAGE_READS:
        return list(STAGE_READS[stage])
    return [s for s in available_stages() if s < stage]


def prepare_teacher(cfg) -> None:
    """The embedded teacher in the cache before any stage starts (the shipped build, or trained here at
    `runtime.num_threads`), so that stages side by side never train or copy it twice."""
    if cfg.model.teacher == "embedded":
        from vskip_core.runtime import configure_threads
        from vskip_core.teacher import build_teacher

        configure_threads(cfg.runtime.num_threads)
        build_teacher(cfg)


def default_jobs(cfg) -> int:
    """Two stages at once on a CPU-only machine with 2+ cores per stage's threads and the embedded teacher;
    one on a GPU (two stages' models would share its memory) or with a hub model (two in RAM)."""
    from vskip_core.runtime import resolve_device

    if resolve_device(cfg.runtime.device) != "cpu" or cfg.model.teacher != "embedded":
        return 1
    cores = os.cpu_count() or 1
    return max(1, min(2, cores // (cfg.runtime.num_threads or cores)))


def stop_kernels(timeout: float = 10.0) -> None:
    """Terminate the stages' kernels (children of this process, started in their own sessions: Ctrl-C on the
    terminal does not reach them)."""
    try:
        import psutil
    except ImportError:
        return
    children = psutil.Process().children(recursive=True)
    for c in children:
        with contextlib.suppress(psutil.Error):
            c.terminate()
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for c in alive:
        with contextlib.suppress(psutil.Error):
            c.kill()


def available_stages() -> list[str]:
    return sorted(p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def select_stages(spec: str | None) -> list[str]:
    stages = available_stages()
    if not spec:
        return stages
    chosen = []
    for s in (x.strip() for x in spec.split(",") if x.strip()):
        match = [st for st in stages if st == s or st[:2] == s.zfill(2)]
        if not match:
            raise ParamsError(f"unknown stage {s!r}; available: {', '.join(stages)}")
        chosen += [m for m in match if m not in chosen]
    return sorted(chosen)


def check_complete(stage_dir: Path, fingerprint: str) -> tuple[bool, str | None]:
    """(complete, why not where an output recorded in `.done` is missing or changed, or a stage it read ran
    again since: "input <stage> ran again"). A `.done` written before outputs (no "files") or inputs (no
    "reads") were recorded counts on what it has."""
    import json

    done = stage_dir / ".done"
    if (
        not done.exists()
        or not (stage_dir / "executed.ipynb").exists()
        or not (stage_dir / ".finished").exists()
    ):
        return False, None
    try:
        record = json.loads(done.read_text())
    except (OSError, ValueError):
        return False, None
    if record.get("fingerprint") != fingerprint:
        return False, None
    for u, sha in (record.get("reads") or {}).items():  # a stage it read ran again after it finished
        done_u = stage_dir.parent / u / ".done"
        if not done_u.exists() or file_sha256(done_u) != sha:
            return False, f"input {u} ran again"
    changed = changed_output(stage_dir, record.get("files") or {})
    return changed is None, changed


def is_complete(stage_dir: Path, fingerprint: str) -> bool:
    return check_complete(stage_dir, fingerprint)[0]


def one_parameter_cell(path: Path) -> None:
    """papermill keeps the notebook's default parameter cell and adds the values it ran with below it: in the
    executed copy only the second is true, so the first goes (no-op when there is no injected cell)."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    tags = [set(c.get("metadata", {}).get("tags", [])) for c in nb.cells]
    if any("injected-parameters" in t for t in tags):
        nb.cells = [
            c for c, t in zip(nb.cells, tags) if not ("parameters" in t and "injected-parameters" not in t)
        ]
        nbformat.write(nb, path)


def run_stage(
    stage: str, params_file: str, run: str, overrides: dict[str, Any], stage_dir: Path, verbose: bool = False
) -> None:
    import papermill as pm

    stage_dir.mkdir(parents=True, exist_ok=True)
    tmp = stage_dir / ".executed.tmp.ipynb"
    try:
        pm.execute_notebook(
            str(NOTEBOOKS / f"{stage}.ipynb"),
            str(tmp),
            parameters={"params_file": params_file, "run": run, "overrides": overrides},
            cwd=str(NOTEBOOKS),
            progress_bar=verbose,
            log_output=verbose,
            kernel_name="python3",
            # the kernel's log is noise to a reader (its warning about unencrypted TCP on loopback; "KeyboardInterrupt
            # caught in kernel" when jupyter_client's shutdown, which interrupts first, meets a busy kernel); a
            # failing cell still fails the stage. What the kernel writes to its own stderr (the progress mirror)
            # stays on this terminal only
            extra_arguments=["--IPKernelApp.log_level=CRITICAL", "--IPKernelApp.capture_fd_output=False"],
        )
    except pm.PapermillExecutionError as e:
        failed = stage_dir / "failed.ipynb"
        tmp.replace(failed) if tmp.exists() else None
        raise RuntimeError(
            f"stage {stage} failed in cell {e.exec_count} ({e.ename}: {e.evalue}).\n"
            f"  executed notebook with the traceback: {failed}"
        ) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if not (stage_dir / ".finished").exists():
        raise RuntimeError(f"stage {stage} ran but never called stage.finish(); its outputs are incomplete")
    one_parameter_cell(tmp)
    tmp.replace(stage_dir / "executed.ipynb")
    (stage_dir / "failed.ipynb").unlink(missing_ok=True)


def main(argv: list[str] | None = None, prog: str = "python -m vskip_core.pipeline") -> int:
    ap = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(ap)
    return run(ap.parse_args(argv))


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The pipeline's options (`python -m vskip_core.pipeline` and `vskip run`)."""
    ap.add_argument("--params", default="params/default.yaml", help="params YAML (see params/)")
    ap.add_argument(
        "--run",
        default="default",
        help="run name, one plain folder name (default, qwen2vl-2b): outputs go to results/<run>/",
    )
    ap.add_argument("--stages", default=None, help="comma list of stage numbers or names (default: all)")
    ap.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a parameter, e.g. --set gate.gamma=0.5 (repeatable)",
    )
    ap.add_argument("--force", action="store_true", help="rerun stages even if complete")
    ap.add_argument("--verbose", action="store_true", help="stream notebook output and cell progress")
    ap.add_argument(
        "--jobs",
        type=int,
        default=int(os.environ.get("VSKIP_JOBS", "0")),
        help="stages run at once when their inputs are ready (0 = auto: 2 on a CPU-only machine, else 1)",
    )
    ap.add_argument(
        "--plan",
        action="store_true",
        help="print what each stage will load and download, with memory and time estimates; run nothing",
    )
    ap.add_argument(
        "--gpu", default=None, help="with --plan: size for this GPU (T4, L4, A100-80GB, ...; cpu)"
    )


def run(args: argparse.Namespace) -> int:
    """Run the selected stages (or print the plan); 2 on bad input, with one line naming it."""
    if args.plan:
        return _plan(args)

    try:
        overrides = parse_sets(args.sets)
        cfg = load_params(args.params, overrides)
        stages = select_stages(args.stages)
        if not stages:
            raise ParamsError(f"no notebooks found in {NOTEBOOKS}")
        out = results_dir(cfg, args.run)
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / ".write_probe").write_text("ok")
            (out / ".write_probe").unlink()
        except OSError as e:
            raise ParamsError(
                f"results folder {out} is not writable ({e}); set runtime.results_dir or fix its permissions"
            ) from None
    except (ParamsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    # papermill passes params explicitly; don't let the nbval redirect leak into the stages' kernels. Put the
    # variables back afterwards: a test calling main() in-process must not change what later notebooks see.

    saved = {k: os.environ.pop(k) for k in (ENV_PARAMS, ENV_RUN, ENV_LIVE) if k in os.environ}
    os.environ[ENV_LIVE] = "1"  # the stages' progress bars are mirrored on this terminal
    try:
        return _run_stages(args, cfg, stages, overrides, out)
    finally:
        os.environ.pop(ENV_LIVE, None)
        os.environ.update(saved)


def _run_stages(args, cfg, stages, overrides, out) -> int:
    jobs = args.jobs if args.jobs > 0 else default_jobs(cfg)
    side = f", up to {jobs} stages at once" if jobs > 1 else ""
    print(f"vskip pipeline: params={args.params} run={args.run} -> {out}{side}")
    n = len(stages)
    tag = {s: f"[{i}/{n}] {s}" for i, s in enumerate(stages, 1)}
    state: dict[str, str] = {}  # stage -> "skipped" | "ran" | "failed"
    lock = threading.Lock()  # one line at a time from the stages' threads

    def say(line: str, err: bool = False) -> None:
        with lock:
            print(line, file=sys.stderr if err else sys.stdout, flush=True)

    def start(stage: str) -> str | None:
        """Run it (None) or say why it is skipped ("skipped")."""
        fp = stage_fingerprint(cfg, NOTEBOOKS / f"{stage}.ipynb")
        if not args.force and all(state[u] == "skipped" for u in reads(stage, stages)):
            complete, changed = check_complete(out / stage, fp)
            if complete:
                say(f"{tag[stage]}: complete for these params, skipped")
                return "skipped"
            if changed and changed.startswith("input "):
                say(f"{tag[stage]}: {changed} since it finished; it reruns")
            elif changed:
                say(
                    f"{tag[stage]}: output {changed} since it finished; it reruns and the stages that read it"
                )
        return None

    def execute(stage: str) -> str:
        fp = stage_fingerprint(cfg, NOTEBOOKS / f"{stage}.ipynb")
        say(f"{tag[stage]}: running ...")
        t0 = time.time()
        try:
            run_stage(stage, args.params, args.run, overrides, out / stage, args.verbose)
        except Exception as e:  # a failed cell, or a kernel that died (out of memory, stopped)
            say(f"error: {e}", err=True)
            return "failed"
        seconds = round(time.time() - t0, 1)
        record = {"fingerprint": fp, "seconds": seconds, "files": output_files(out / stage)}
        # what it read, as it was: a stage it reads that runs again later makes this one rerun too
        record["reads"] = {
            u: file_sha256(out / u / ".done") for u in direct_reads(stage) if (out / u / ".done").exists()
        }
        atomic_write_json(out / stage / ".done", record)
        say(f"{tag[stage]}: done in {seconds:.0f} s")
        return "ran"

    running: dict[Future, str] = {}
    prepared = False
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        while True:
            scan = "failed" not in state.values()
            while scan:  # start what is ready, in stage order; a skipped stage may ready the next ones
                scan = False
                for s in stages:
                    if len(running) >= jobs or s in state or s in running.values():
                        continue
                    if all(state.get(u) in ("skipped", "ran") for u in reads(s, stages)):
                        if start(s) == "skipped":
                            state[s], scan = "skipped", True
                            break
                        if not prepared:  # once, before the first stage that runs (a 20-min build, or a copy)
                            prepare_teacher(cfg)
                            prepared = True
                        running[pool.submit(execute, s)] = s
            if not running:
                break
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for f in done:
                state[running.pop(f)] = f.result()
    except KeyboardInterrupt:
        names = ", ".join(running.values()) or "the pipeline"
        print(f"\ninterrupted during {names}; stopping; rerun the same command to resume", file=sys.stderr)
        stop_kernels()
        pool.shutdown(wait=True, cancel_futures=True)
        return 130
    except RuntimeError as e:  # the shipped teacher differs from its manifest: the message says the fix
        print(f"error: {e}", file=sys.stderr)
        pool.shutdown(wait=True)
        return 1
    pool.shutdown(wait=True)
    never = [s for s in stages if s not in state]
    if never and "failed" in state.values():
        print(f"not started (they read a failed stage): {', '.join(never)}", file=sys.stderr)
    return 1 if "failed" in state.values() or never else 0


def _plan(args) -> int:

    try:
        print_plan(load_params(args.params, parse_sets(args.sets)), gpu=args.gpu)
    except (ParamsError, PlanError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
