"""Device and dtype resolution, seeding, atomic writes and run records (params.json, env.json, metrics.json).

Every stage (notebook) opens with `stage = start_stage(cfg, run, "02_dual_scoring")`, writes its outputs
under `stage.dir`, and ends with `stage.finish(metrics)`. `.finished` marks a stage whose outputs are complete;
the pipeline adds `.done` with a fingerprint (resolved params + the notebook's code cells) and skips a stage whose
fingerprint matches, which is how a killed run resumes. Inside a stage, `ShardedWriter` writes rows in shards
that a killed run (or another worker) resumes from.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time as _time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vskip_core.config import REPO_ROOT, Config, ParamsError

# Set by the pipeline for the notebooks it runs: progress bars are then also printed on its terminal.
ENV_LIVE = "VSKIP_LIVE_PROGRESS"
LIVE_EVERY_S = 15.0  # at most one terminal line per bar this often (and one when it finishes)
_live_tag = ""  # the running stage's number (start_stage): stages run side by side share one terminal


def progress(*args, **kwargs):
    """A tqdm bar (a widget in Jupyter). Under `python -m vskip_core.pipeline` each bar is mirrored as a plain
    line (phase, step/total, rate, ETA) on the pipeline's terminal (the kernel's own stderr, which the kernel
    does not capture there), and the notebook gets one text line with the bar's final state when it closes: a
    saved widget would show its first state ("0%") in the executed copy. Bars made with leave=False leave
    nothing in the notebook, as in Jupyter."""
    if not os.environ.get(ENV_LIVE):
        from tqdm.auto import tqdm

        return tqdm(*args, **kwargs)
    import io

    from tqdm.std import tqdm

    kwargs = {
        "file": io.StringIO(),
        "ascii": False,
        **kwargs,
    }  # the live bar is the terminal's; the notebook gets the final line

    class _Live(tqdm):
        def _meter(self) -> str:
            return tqdm.format_meter(**{**self.format_dict, "ncols": 100})

        def update(self, n=1):
            out = super().update(n)
            if not self.disable:
                now = _time.monotonic()
                done = self.total is not None and self.n >= self.total
                if done or now - getattr(self, "_vskip_last", 0.0) >= LIVE_EVERY_S:
                    self._vskip_last = now
                    print(f"  {_live_tag:>4}{self._meter()}", file=sys.__stderr__, flush=True)
            return out

        def __iter__(self):  # tqdm's own loop counts without update(): the terminal would see only the end
            if self.disable:
                yield from self.iterable
                return
            try:
                for obj in self.iterable:
                    yield obj
                    self.update(1)
            finally:
                self.close()

        def close(self):
            if not self.disable and self.leave and not getattr(self, "_vskip_closed", False):
                self._vskip_closed = True
                print(self._meter(), flush=True)
            super().close()

    return _Live(*args, **kwargs)


def resolve_device(spec: str = "auto") -> str:
    """'auto' -> cuda if available, else mps, else cpu. The only place that picks a device."""
    import torch

    if spec != "auto":
        if spec.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(
                f"runtime.device={spec!r} but torch sees no CUDA device; set runtime.device: auto"
            )
        return spec
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(spec: str = "auto", device: str = "cpu"):
    """'auto' -> bf16 where supported, else fp16 on GPU, fp32 on CPU. The only place that picks a dtype."""
    import torch

    if spec != "auto":
        return getattr(torch, spec)
    if device.startswith("cuda"):
        # including_emulation=False: a T4 "supports" bf16 only by emulation, several times slower than fp16
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.float32


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bfloat16 in hardware (x86 AMX or AVX512-BF16, from /proc/cpuinfo). Elsewhere
    torch emulates it: measured 6x slower than float32 (SmolLM2-135M forward, 32 x 120 tokens, 1 thread: 117 s vs 19 s) on an AMD EPYC without either."""
    import torch

    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    # capped below AVX-512 (ATEN_CPU_CAPABILITY=avx2, how a CPU without it computes): torch emulates bf16 too
    capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", lambda: None)()
    if capability is not None and not str(capability).upper().startswith("AVX512"):
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


_FAST_DTYPE_NOTED: set[str] = set()


def fast_dtype(spec: str, device: str):
    """`resolve_dtype`, except that a 16-bit dtype asked for on a CPU without native bfloat16 becomes float32
    (with a note): for optional speed-ups such as the external scorer's `gate.external_dtype`."""
    import torch

    dtype = resolve_dtype(spec, device)
    if device == "cpu" and dtype in (torch.bfloat16, torch.float16) and not cpu_has_native_bf16():
        if spec not in _FAST_DTYPE_NOTED:  # once per process: callers may ask again to record the dtype
            _FAST_DTYPE_NOTED.add(spec)
            print(
                f"note: {spec} asked for on a CPU without native bfloat16 (no AMX / AVX512-BF16): using float32"
            )
        return torch.float32
    return dtype


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch. Not covered: CUDA kernels that are nondeterministic by design
    (atomics in scatter/index_add); generation here is greedy, so that affects only ties."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_threads(n: int) -> None:
    import torch

    if n > 0:
        torch.set_num_threads(n)


@contextlib.contextmanager
def torch_threads(n: int):
    """Run a block with `n` torch threads (0: leave as is), then restore the count."""
    import torch

    before = torch.get_num_threads()
    configure_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _finite(obj: Any) -> Any:
    """NaN and infinities as null: strict JSON has no NaN (pandas gives NaN for a missing ratio)."""
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.ndarray):
        return _finite(obj.tolist())
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def build_dir_once(path: Path, build, done: str) -> Path:
    """A cache folder built once, safe when processes race for it (stages run side by side): each builds in its
    own temporary folder next to `path` and renames it into place; a loser keeps the winner's. `build(tmp)`
    fills the folder; the file `done` marks it complete."""
    import shutil

    path = Path(path)
    if (path / done).exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{path.name}.tmp-", dir=path.parent))
    try:
        build(tmp)
        if path.exists() and not (path / done).exists():
            shutil.rmtree(path, ignore_errors=True)  # an incomplete folder left by a killed older build
        try:
            tmp.rename(path)
        except OSError:
            if not (path / done).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    text = json.dumps(_finite(obj), indent=2, sort_keys=False, default=_json_default, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode())


class ShardedWriter:
    """Rows written in shards (`shard-NNNNN.jsonl` or `.parquet`, atomic) under one folder, so a killed run
    resumes from the shards it finished. `manifest.json` holds the fingerprint of what the rows depend on;
    shards written under another fingerprint, or with none, are all discarded (with a note). Worker i of n
    (`--shard i/n`) names its shards `shard-w<i>of<n>-NNNNN`, beside the others'; `rows()` reads them all."""

    FORMATS = ("jsonl", "parquet")

    def __init__(self, folder, fingerprint: str, fmt: str = "jsonl", worker: tuple[int, int] = (0, 1)):
        if fmt not in self.FORMATS:
            raise ValueError(f"shard format {fmt!r}: expected one of {self.FORMATS}")
        if not (0 <= worker[0] < worker[1]):
            raise ValueError(f"worker {worker}: need (i, n) with 0 <= i < n")
        self.dir, self.fingerprint, self.fmt = Path(folder), fingerprint, fmt
        self.tag = "" if worker == (0, 1) else f"w{worker[0]}of{worker[1]}-"
        manifest = self.dir / "manifest.json"
        old = json.loads(manifest.read_text()).get("fingerprint") if manifest.exists() else None
        if old != fingerprint:
            why = f"fingerprint {old}, now {fingerprint}" if old else "no manifest.json"
            self.discard(f"written under other params ({why})")
            atomic_write_json(manifest, {"fingerprint": fingerprint})

    def path(self, key: int) -> Path:
        """This worker's shard number `key`."""
        return self.dir / f"shard-{self.tag}{key:05d}.{self.fmt}"

    def shards(self) -> list[Path]:
        """Every worker's shards, by name."""
        return sorted(self.dir.glob(f"shard-*.{self.fmt}"))

    def write(self, rows: list[dict[str, Any]], key: int | None = None) -> Path:
        """Write one shard atomically: number `key`, or this worker's first free number."""
        if key is None:
            key = 0
            while self.path(key).exists():
                key += 1
        atomic_write_bytes(self.path(key), self._encode(rows))
        return self.path(key)

    def rows(self, shards: list[Path] | None = None) -> list[dict[str, Any]]:
        """The rows of `shards` (default: every worker's), in order; lists come back as Python lists."""
        import pandas as pd

        out: list[dict[str, Any]] = []
        for f in self.shards() if shards is None else shards:
            if self.fmt == "jsonl":
                out += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
            else:
                out += [
                    {k: to_python(v) for k, v in r.items()} for r in pd.read_parquet(f).to_dict("records")
                ]
        return out

    def merge(self, dest: str | os.PathLike, shards: list[Path] | None = None) -> Path:
        """Join the rows of `shards` (default: every worker's) into one file (atomic) in this format."""
        atomic_write_bytes(dest, self._encode(self.rows(shards)))
        return Path(dest)

    def discard(self, why: str) -> None:
        """Delete every worker's shards, saying how many and why."""
        stale = self.shards()
        for f in stale:
            f.unlink()
        if stale:
            print(f"note: discarded {len(stale)} shards in {self.dir}: {why}")

    def _encode(self, rows: list[dict[str, Any]]) -> bytes:
        if self.fmt == "jsonl":
            return "".join(json.dumps(r, default=_json_default) + "\n" for r in rows).encode()
        import io

        import pandas as pd

        buf = io.BytesIO()
        pd.DataFrame(rows).to_parquet(buf, index=False)
        return buf.getvalue()


def is_missing(v: Any) -> bool:
    """A column value that holds nothing: None, or the NaN pandas / parquet put in an empty cell."""
    return v is None or (isinstance(v, float) and v != v)


def to_python(v: Any) -> Any:
    """A numpy array (as read from parquet, nested or not) as Python lists; anything else as it is."""
    if isinstance(v, np.ndarray):
        return [to_python(x) for x in v] if v.dtype == object else v.tolist()
    return v


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def relative_path(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """`path` relative to `root` (posix), as a metrics.json stores it; a path outside `root`, or a hub id, as
    it is."""
    p = Path(path)
    if not p.is_absolute() or not p.resolve().is_relative_to(Path(root).resolve()):
        return str(path)
    return p.resolve().relative_to(Path(root).resolve()).as_posix() or "."


def resolve_path(stored: str | os.PathLike, root: str | os.PathLike) -> Path:
    """A path read back from a metrics.json: a relative one under `root`; an absolute one (metrics written
    before paths were stored relative) as it is."""
    p = Path(stored)
    return p if p.is_absolute() else Path(root) / p


def machine_dirs(cfg: Config | None = None) -> list[Path]:
    """The folders whose absolute paths name this machine: home, the repository, the cache and results."""
    dirs = [Path.home(), REPO_ROOT]
    if cfg is not None:
        dirs += [cfg.path(cfg.runtime.cache_dir), cfg.path(cfg.runtime.results_dir)]
    return [d.resolve() for d in dirs if len(d.resolve().parts) > 1]  # a home of "/" would match everything


def check_portable(obj: Any, dirs: list[Path], key: str = "") -> None:
    """Raise ValueError, naming the key, for a string in `obj` that is an absolute path under one of `dirs`."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            check_portable(v, dirs, f"{key}.{k}" if key else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_portable(v, dirs, f"{key}[{i}]")
    elif isinstance(obj, str) and os.path.isabs(obj):
        p = Path(obj)
        if any(p.is_relative_to(d) for d in dirs):
            raise ValueError(
                f"metrics key {key!r} holds an absolute path of this machine ({obj}): store it relative "
                "to the run folder or the cache (runtime.relative_path)"
            )


def git_info() -> dict[str, Any]:
    def _git(*args: str) -> str | None:
        try:
            return subprocess.run(
                ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
        except Exception:
            return None

    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")  # what decides the kernels' path
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")


def cpu_info() -> dict[str, Any]:
    """CPU model, the flags that pick torch's kernels, the ISA ATen dispatched to and any cap set in the
    environment: the same code trains another teacher on another instruction set (issue 32)."""
    import torch

    model, flags = None, None
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model is None:
            model = value.strip() or None
        elif key.strip() in ("flags", "Features") and flags is None:  # x86 / ARM
            flags = set(value.split())
    if model is None and sys.platform == "darwin":
        with contextlib.suppress(Exception):
            model = (
                subprocess.run(
                    ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5
                ).stdout.strip()
                or None
            )
    if model is None:
        model = platform.processor() or None
    capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", lambda: None)()
    return {
        "cpu_model": model,
        "cpu_flags": {f: f in flags for f in CPU_FLAGS} if flags is not None else None,
        "cpu_capability": capability,
        "isa_caps": {k: os.environ[k] for k in ISA_CAPS if k in os.environ},
    }


def environment(cfg: Config | None = None) -> dict[str, Any]:
    """Versions, git state and hardware: what must sit beside every result."""
    import importlib.metadata as md

    import torch

    def v(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    device = resolve_device(cfg.runtime.device if cfg else "auto")
    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": {
            p: v(p)
            for p in (
                "torch",
                "transformers",
                "peft",
                "datasets",
                "accelerate",
                "bitsandbytes",
                "tokenizers",
                "numpy",
                "papermill",
                "vskip",
            )
        },
        "git": git_info(),
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor(),
        **cpu_info(),
        "seed": cfg.runtime.seed if cfg else None,
    }
    return env


def now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def check_run_name(run: str) -> str:
    """A run name is one plain folder name under results/: no path separator, not `..`, no leading dot
    (`--run ../../x` would otherwise write a whole stage outside results/). Raises ParamsError."""
    problem = None
    if not run:
        problem = "is empty"
    elif "/" in run or "\\" in run:
        problem = "contains a path separator"
    elif ".." in run:
        problem = "contains '..'"
    elif run.startswith("."):
        problem = "starts with '.'"
    if problem:
        raise ParamsError(
            f"run name {run!r} {problem}: it must be one folder name under results/. "
            "Use a plain name such as `default` or `qwen2vl-2b` (--run default)"
        )
    return run


def results_dir(cfg: Config, run: str) -> Path:
    """results/<run>/ (under runtime.results_dir); the run name is checked first (check_run_name)."""
    return cfg.path(cfg.runtime.results_dir) / check_run_name(run)


def notebook_code(notebook: Path) -> bytes:
    """The code cells' sources, in order: what a notebook's results depend on. Metadata, outputs, markdown and
    kernel state (which opening the notebook in JupyterLab changes) are left out."""
    if not notebook.exists():
        return b""
    raw = notebook.read_bytes()
    try:
        cells = json.loads(raw)["cells"]
    except (ValueError, KeyError, TypeError):
        return raw  # not a notebook we can read: every byte counts
    code = ["".join(c["source"]) if isinstance(c["source"], list) else c["source"] for c in cells
            if c.get("cell_type") == "code"]  # fmt: skip
    return "\n\x00\n".join(code).encode()


def stage_fingerprint(cfg: Config, notebook: Path) -> str:
    """What a stage's outputs depend on: the resolved params and the notebook's code cells."""
    import hashlib

    src = notebook_code(notebook)
    return hashlib.sha256(cfg.hash().encode() + hashlib.sha256(src).hexdigest().encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def output_files(stage_dir: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {size, sha256}} of every regular file under a stage folder but `.done`: what the
    pipeline records at finish and checks before skipping the stage."""
    out = {}
    for f in sorted(Path(stage_dir).rglob("*")):
        if f.is_file() and not f.is_symlink() and f.name != ".done":
            out[f.relative_to(stage_dir).as_posix()] = {"size": f.stat().st_size, "sha256": file_sha256(f)}
    return out


def changed_output(stage_dir: Path, recorded: dict[str, dict[str, Any]]) -> str | None:
    """The first recorded output that is missing or differs ("scores.parquet missing"), else None. Sizes are
    compared first; a file of the same size is hashed."""
    for name, rec in recorded.items():
        f = Path(stage_dir) / name
        if not f.is_file():
            return f"{name} missing"
        if f.stat().st_size != rec["size"]:
            return f"{name} changed ({f.stat().st_size} bytes, {rec['size']} recorded)"
        if file_sha256(f) != rec["sha256"]:
            return f"{name} changed (sha256 differs)"
    return None


@dataclass
class Stage:
    cfg: Config
    run: str
    name: str
    dir: Path
    env: dict[str, Any]

    def upstream(self, stage: str) -> Path:
        """Folder of an earlier stage of the same run; raises if that stage has not finished."""
        d = self.dir.parent / stage
        if not (d / ".finished").exists():
            raise FileNotFoundError(
                f"stage {stage} has not finished for run {self.run!r} ({d}); run it first: "
                f"python -m vskip_core.pipeline --params {self.cfg.source} --run {self.run} --stages {stage[:2]}"
            )
        return d

    def save_json(self, name: str, obj: Any) -> Path:
        p = self.dir / name
        atomic_write_json(p, obj)
        return p

    def finish(self, metrics: dict[str, Any] | None = None) -> None:
        """Write metrics.json (if any), the end time, and the `.finished` marker later stages check.
        (The pipeline adds `.done`, with the params fingerprint, once executed.ipynb is in place.)"""
        if metrics is not None:
            check_portable(metrics, machine_dirs(self.cfg))
            self.save_json("metrics.json", metrics)
        self.env["end_time"] = now()
        self.save_json("env.json", self.env)
        atomic_write_json(
            self.dir / ".finished", {"finished": self.env["end_time"], "params_hash": self.cfg.hash()}
        )


def quiet_expected_notices() -> None:
    """Silence what this stack prints that is expected and tells a reader nothing (each looks like a failed
    install in a notebook): bitsandbytes' note that an optional CPU kernel package is absent, transformers'
    deprecation of an attribute peft reads and its note on ordering checkpoints, and the model-loading and
    dataset-saving progress bars (a saved bar shows "0%")."""
    import logging
    import warnings

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    logging.getLogger("transformers.trainer_utils").setLevel(logging.ERROR)  # checkpoint mtime ordering note
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
    try:
        import datasets
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        datasets.disable_progress_bars()  # "Saving the dataset (0/1 shards)" widgets in 04
    except ImportError:  # both are dependencies; without them nothing loads a model anyway
        pass


def display_defaults() -> None:
    """pandas tables marked so that the classic notebook's MathJax 2 does not read prices ("$5.21 ... $5.21")
    as LaTeX (its class is tex2jax_ignore; JupyterLab's MathJax 3 ignores that class: `make lab-check` finds
    a table that needs `plots.HTML`)."""
    try:
        import pandas as pd

        pd.set_option("display.html.use_mathjax", False)
    except ImportError:
        pass


def start_stage(cfg: Config, run: str, name: str) -> Stage:
    """Create results/<run>/<stage>/, seed, set threads, quiet the expected library notices, write params.json
    and env.json (start time)."""
    global _live_tag
    _live_tag = f"{name[:2]}: " if name[:2].isdigit() else ""
    d = results_dir(cfg, run) / name
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / ".write_probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"results folder {d} is not writable ({e}); set runtime.results_dir") from None
    for marker in (".done", ".finished"):
        (d / marker).unlink(missing_ok=True)
    configure_threads(cfg.runtime.num_threads)
    seed_everything(cfg.runtime.seed)
    quiet_expected_notices()
    display_defaults()
    env = environment(cfg)
    env["start_time"] = now()
    env["run"] = run
    env["stage"] = name
    atomic_write_json(d / "params.json", cfg.to_dict())
    atomic_write_json(d / "env.json", env)
    return Stage(cfg=cfg, run=run, name=name, dir=d, env=env)
