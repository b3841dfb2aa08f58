"""Run records and resume, on two tiny notebooks that use the real start_stage / finish API."""

import json

import nbformat
import pytest

from vskip_core import pipeline

STAGE_SRC = """
from vskip_core.config import load_params
from vskip_core.runtime import start_stage
cfg = load_params(params_file, overrides)
stage = start_stage(cfg, run, "{name}")
(stage.dir / "count.txt").write_text(str(int((stage.dir / "count.txt").read_text()) + 1)
                                     if (stage.dir / "count.txt").exists() else "1")
if cfg.data.n_test == 13 and "{name}".startswith("01"):
    raise RuntimeError("boom")
stage.finish({{"n_test": cfg.data.n_test}})
"""


@pytest.fixture
def nbdir(tmp_path, monkeypatch):
    return _stage_notebooks(tmp_path, monkeypatch, ("00_first", "01_second"))


def _stage_notebooks(tmp_path, monkeypatch, names):
    """Tiny notebooks `names` (STAGE_SRC) in tmp_path/notebooks/, which the pipeline then runs."""
    d = tmp_path / "notebooks"
    d.mkdir()
    for name in names:
        nb = nbformat.v4.new_notebook()
        p = nbformat.v4.new_code_cell('params_file = "params/smoke.yaml"\nrun = "default"\noverrides = {}')
        p.metadata["tags"] = ["parameters"]
        nb.cells = [p, nbformat.v4.new_code_cell(STAGE_SRC.format(name=name))]
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, d / f"{name}.ipynb")
    monkeypatch.setattr(pipeline, "NOTEBOOKS", d)
    return tmp_path


def _args(res, *extra):
    return ["--params", "params/smoke.yaml", "--run", "r", "--set", f"runtime.results_dir={res}", *extra]


def _count(res, stage):
    return int((res / "r" / stage / "count.txt").read_text())


def test_records_skip_and_rerun(nbdir):
    res = nbdir / "results"
    args = _args(res)
    assert pipeline.main(args) == 0
    for stage in ("00_first", "01_second"):
        d = res / "r" / stage
        for f in ("executed.ipynb", "params.json", "env.json", "metrics.json", ".done"):
            assert (d / f).exists(), f
        env = json.loads((d / "env.json").read_text())
        assert {"python", "versions", "git", "device", "seed", "start_time", "end_time"} <= set(env)
        assert env["versions"]["torch"]
        assert json.loads((d / "params.json").read_text())["runtime"]["results_dir"] == str(res)
    assert pipeline.main(args) == 0  # complete: both skipped
    assert _count(res, "00_first") == 1 and _count(res, "01_second") == 1
    # a killed second stage (no .done) is redone alone
    (res / "r" / "01_second" / ".done").unlink()
    assert pipeline.main(args) == 0
    assert _count(res, "00_first") == 1 and _count(res, "01_second") == 2
    # changed params rerun everything
    assert pipeline.main(args + ["--set", "data.n_test=7"]) == 0
    assert _count(res, "00_first") == 2 and _count(res, "01_second") == 3


def test_failing_stage_names_notebook_and_cell(nbdir, capsys):
    res = nbdir / "results"
    args = [
        "--params",
        "params/smoke.yaml",
        "--run",
        "r",
        "--set",
        f"runtime.results_dir={res}",
        "--set",
        "data.n_test=13",
    ]
    assert pipeline.main(args) == 1
    err = capsys.readouterr().err
    assert "01_second" in err and "boom" in err and "failed.ipynb" in err and "cell" in err
    assert (res / "r" / "01_second" / "failed.ipynb").exists()
    assert not (res / "r" / "01_second" / "executed.ipynb").exists()
    assert (res / "r" / "00_first" / ".done").exists()  # the finished stage is kept


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--params", "params/nope.yaml"], "does not exist"),
        (["--stages", "42"], "unknown stage"),
        (["--set", "gate.gama=0.5"], "gamma"),
        (["--set", "novalue"], "key=value"),
    ],
)
def test_bad_input_exits_nonzero(nbdir, capsys, args, needle):
    assert pipeline.main(["--run", "r", "--set", f"runtime.results_dir={nbdir / 'results'}"] + args) == 2
    assert needle in capsys.readouterr().err
    assert not (nbdir / "results" / "r" / "00_first").exists()


def test_unwritable_results_dir(nbdir, capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    import os

    if os.access(ro, os.W_OK):  # root ignores permissions: use a path under a file instead
        ro = tmp_path / "afile"
        ro.write_text("x")
    assert pipeline.main(["--run", "r", "--set", f"runtime.results_dir={ro}"]) == 2
    assert "not writable" in capsys.readouterr().err


def test_main_leaves_the_nbval_redirect_in_place(nbdir, monkeypatch):
    """main() hides VSKIP_PARAMS / VSKIP_RUN from its stages but must restore them: nbval's later kernels
    (same pytest process) read them to run on smoke params instead of building the default teacher."""
    monkeypatch.setenv("VSKIP_PARAMS", "params/smoke.yaml")
    monkeypatch.setenv("VSKIP_RUN", "nbval-smoke")
    res = nbdir / "results"
    assert (
        pipeline.main(["--params", "params/smoke.yaml", "--run", "r", "--set", f"runtime.results_dir={res}"])
        == 0
    )
    import os

    assert os.environ["VSKIP_PARAMS"] == "params/smoke.yaml" and os.environ["VSKIP_RUN"] == "nbval-smoke"


def test_stages_registry_matches_the_notebooks():
    from vskip_core.config import STAGES

    assert list(STAGES) == pipeline.available_stages()


@pytest.mark.parametrize("run", ["../../x", "a/b", "..", "../x", ".hidden", "a\\b", ""])
def test_run_name_with_a_path_is_refused_before_anything_is_written(nbdir, capsys, run):
    """`--run ../../x` used to write a whole stage outside results/: refused, exit 2, nothing written."""
    res = nbdir / "results"
    before = sorted(p for p in nbdir.rglob("*"))
    assert (
        pipeline.main(["--params", "params/smoke.yaml", "--run", run, "--set", f"runtime.results_dir={res}"])
        == 2
    )
    err = capsys.readouterr().err
    assert "run name" in err and "plain name" in err and "default" in err
    assert sorted(p for p in nbdir.rglob("*")) == before  # not even results/ was created


@pytest.mark.parametrize("run", ["../x", "a/b", ".x"])
def test_run_name_checked_wherever_it_enters(smoke_cfg, run):
    from vskip_core.config import ParamsError
    from vskip_core.runtime import results_dir, start_stage

    with pytest.raises(ParamsError, match="run name"):
        results_dir(smoke_cfg, run)
    with pytest.raises(ParamsError, match="run name"):
        start_stage(smoke_cfg, run, "00_first")
    assert not (smoke_cfg.path(smoke_cfg.runtime.results_dir)).exists()


@pytest.mark.parametrize("run", ["default", "qwen2vl-2b", "g3", "nbval-smoke", "run.2"])
def test_plain_run_names_pass(smoke_cfg, run):
    from vskip_core.runtime import results_dir

    assert results_dir(smoke_cfg, run) == smoke_cfg.path(smoke_cfg.runtime.results_dir) / run


def test_progress_is_mirrored_on_the_pipeline_terminal(monkeypatch, capsys):
    """Under the pipeline (VSKIP_LIVE_PROGRESS) a bar also prints plain lines on the real stderr: phase,
    step/total and rate, at most every LIVE_EVERY_S and once when it finishes; outside it prints nothing there."""
    import io
    import sys

    from vskip_core import runtime

    fake = io.StringIO()
    monkeypatch.setattr(sys, "__stderr__", fake)
    monkeypatch.setenv(runtime.ENV_LIVE, "1")
    bar = runtime.progress(total=5, desc="teacher: drills", file=io.StringIO())
    for _ in range(5):
        bar.update(1)
    bar.close()
    lines = [x for x in fake.getvalue().splitlines() if x.strip()]
    assert len(lines) == 2 and "teacher: drills" in lines[-1] and "5/5" in lines[-1]
    fake.truncate(0)
    fake.seek(0)
    assert list(runtime.progress(range(5), desc="normalize", file=io.StringIO())) == list(range(5))
    lines = [x for x in fake.getvalue().splitlines() if x.strip()]  # a bar used as an iterator: mirrored too
    assert len(lines) == 2 and "normalize" in lines[-1] and "5/5" in lines[-1]
    monkeypatch.delenv(runtime.ENV_LIVE)
    fake.truncate(0)
    quiet = runtime.progress(total=2, desc="x", file=io.StringIO())
    quiet.update(2)
    assert fake.getvalue() == ""


def test_metrics_json_is_strict_json_with_nan_as_null(tmp_path):
    import json as _json

    import numpy as _np

    from vskip_core.runtime import atomic_write_json

    p = tmp_path / "m.json"
    atomic_write_json(
        p, {"ratio": float("nan"), "rows": [{"x": _np.float32("inf"), "y": _np.array([1.0, _np.nan])}]}
    )
    text = p.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert _json.loads(text) == {"ratio": None, "rows": [{"x": None, "y": [1.0, None]}]}


def test_fingerprint_depends_on_code_cells_only(tmp_path):
    """Opening a notebook in JupyterLab rewrites its metadata (kernel, cell state) and autosave changes its
    bytes: the stage must not rerun for that, nor for a markdown edit; a code edit or a params change reruns it."""
    from vskip_core.config import load_params
    from vskip_core.runtime import stage_fingerprint

    cfg = load_params("params/smoke.yaml", {})
    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_markdown_cell("# title"), nbformat.v4.new_code_cell("x = 1")]
    )
    path = tmp_path / "00_x.ipynb"
    nbformat.write(nb, path)
    base = stage_fingerprint(cfg, path)
    nb.metadata["kernelspec"] = {"name": "other", "display_name": "Other"}
    nb.cells[0].source = "# another title"
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", text="1\n")]
    nb.cells[1].metadata["collapsed"] = True
    nbformat.write(nb, path)
    assert stage_fingerprint(cfg, path) == base
    nb.cells[1].source = "x = 2"
    nbformat.write(nb, path)
    assert stage_fingerprint(cfg, path) != base
    nb.cells[1].source = "x = 1"
    nbformat.write(nb, path)
    assert stage_fingerprint(cfg, path) == base
    assert stage_fingerprint(load_params("params/smoke.yaml", {"prune.n_examples": 7}), path) != base


def test_executed_copy_keeps_only_the_parameters_it_ran_with(tmp_path):
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_markdown_cell("# title"),
            nbformat.v4.new_code_cell('run = "default"', metadata={"tags": ["parameters"]}),
            nbformat.v4.new_code_cell('run = "smoke"', metadata={"tags": ["injected-parameters"]}),
            nbformat.v4.new_code_cell("print(run)"),
        ]
    )
    path = tmp_path / "x.ipynb"
    nbformat.write(nb, path)
    pipeline.one_parameter_cell(path)
    assert [c.source for c in nbformat.read(path, 4).cells] == ["# title", 'run = "smoke"', "print(run)"]
    pipeline.one_parameter_cell(path)  # nothing injected left to tell them apart: unchanged
    assert len(nbformat.read(path, 4).cells) == 3


def _finished_stage(tmp_path, fp="abc"):
    """A stage folder as the pipeline leaves it, outputs recorded in .done, without running a notebook."""
    from vskip_core.runtime import atomic_write_json, output_files

    d = tmp_path / "r" / "02_fake"
    (d / "shards").mkdir(parents=True)
    for name in ("executed.ipynb", ".finished", "scores.parquet", "shards/shard-00000.jsonl"):
        (d / name).write_bytes(b"x" * 4096 + name.encode())
    atomic_write_json(d / ".done", {"fingerprint": fp, "files": output_files(d)})
    return d


def test_done_records_every_output_but_itself(tmp_path):
    d = _finished_stage(tmp_path)
    files = json.loads((d / ".done").read_text())["files"]
    assert set(files) == {"executed.ipynb", ".finished", "scores.parquet", "shards/shard-00000.jsonl"}
    assert files["scores.parquet"]["size"] == 4096 + len("scores.parquet")
    assert len(files["scores.parquet"]["sha256"]) == 64
    assert pipeline.check_complete(d, "abc") == (True, None)
    assert pipeline.check_complete(d, "other") == (False, None)  # other params: no line about files


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda f: f.write_bytes(f.read_bytes()[:100]), "scores.parquet changed (100 bytes"),  # truncated
        (lambda f: f.write_bytes(f.read_bytes().replace(b"x", b"y", 1)), "scores.parquet changed (sha256"),
        (lambda f: f.unlink(), "scores.parquet missing"),
    ],
)
def test_a_changed_or_missing_output_makes_the_stage_incomplete(tmp_path, damage, needle):
    d = _finished_stage(tmp_path)
    damage(d / "scores.parquet")
    complete, why = pipeline.check_complete(d, "abc")
    assert not complete and why.startswith(needle)
    assert not pipeline.is_complete(d, "abc")


def test_a_shard_deleted_under_a_subfolder_is_noticed(tmp_path):
    d = _finished_stage(tmp_path)
    (d / "shards" / "shard-00000.jsonl").unlink()
    assert pipeline.check_complete(d, "abc") == (False, "shards/shard-00000.jsonl missing")


def test_done_written_before_outputs_were_recorded_still_counts(tmp_path):
    d = _finished_stage(tmp_path)
    (d / ".done").write_text(json.dumps({"fingerprint": "abc", "seconds": 1.0}))
    (d / "scores.parquet").unlink()  # not recorded: not checked
    assert pipeline.check_complete(d, "abc") == (True, None)


def test_pipeline_reruns_a_stage_whose_output_changed_with_one_line(nbdir, capsys):
    res = nbdir / "results"
    args = _args(res)
    assert pipeline.main(args) == 0
    assert "files" in json.loads((res / "r" / "00_first" / ".done").read_text())
    size = (res / "r" / "00_first" / "metrics.json").stat().st_size
    (res / "r" / "00_first" / "metrics.json").write_text("{}")
    capsys.readouterr()
    assert pipeline.main(args) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "metrics.json" in ln]
    assert lines == [
        f"[1/2] 00_first: output metrics.json changed (2 bytes, {size} recorded) since it finished; "
        "it reruns and the stages that read it"
    ]
    assert _count(res, "00_first") == 2 and _count(res, "01_second") == 2


def test_cpu_info_names_the_model_flags_and_dispatched_isa(monkeypatch):
    from vskip_core.runtime import CPU_FLAGS, cpu_info, environment

    monkeypatch.delenv("MKL_CBWR", raising=False)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    info = cpu_info()
    assert set(info) == {"cpu_model", "cpu_flags", "cpu_capability", "isa_caps"}
    assert info["cpu_model"] is None or (isinstance(info["cpu_model"], str) and info["cpu_model"])
    assert info["cpu_flags"] is None or set(info["cpu_flags"]) == set(CPU_FLAGS)
    assert info["cpu_flags"] is None or all(isinstance(v, bool) for v in info["cpu_flags"].values())
    assert isinstance(info["cpu_capability"], str) and info["cpu_capability"]  # "AVX512", "AVX2", "DEFAULT"
    assert info["isa_caps"]["ATEN_CPU_CAPABILITY"] == "avx2" and "MKL_CBWR" not in info["isa_caps"]
    assert set(info) <= set(environment())


def test_paths_in_metrics_are_stored_relative_and_resolved_back(tmp_path):
    from vskip_core.runtime import relative_path, resolve_path

    run = tmp_path / "run"
    adapter = run / "04_qlora_distillation" / "adapters" / "vskip"
    assert relative_path(adapter, run) == "04_qlora_distillation/adapters/vskip"
    assert resolve_path("04_qlora_distillation/adapters/vskip", run) == adapter
    assert resolve_path(str(adapter), tmp_path / "elsewhere") == adapter  # metrics written before: as is
    assert relative_path("HuggingFaceTB/SmolLM2", run) == "HuggingFaceTB/SmolLM2"  # a hub id
    assert relative_path("/opt/models/x", run) == "/opt/models/x"  # outside the root: as is


def test_student_adapters_resolve_relative_and_old_absolute_paths(tmp_path):
    from vskip_core.runtime import atomic_write_json
    from vskip_core.stages.distillation import in_run
    from vskip_core.stages.evaluation import student_adapters

    s04 = tmp_path / "run" / "04_qlora_distillation"
    rel = in_run(s04 / "adapters" / "vskip")
    assert rel == "04_qlora_distillation/adapters/vskip"
    atomic_write_json(
        s04 / "metrics.json", {"methods": {"vskip": {"adapter": rel}, "full": {"adapter": "/old/full"}}}
    )
    assert student_adapters(s04) == {"vskip": str(s04 / "adapters" / "vskip"), "full": "/old/full"}


def test_finish_refuses_an_absolute_path_of_this_machine(smoke_cfg, tmp_path):
    from pathlib import Path

    from vskip_core.config import REPO_ROOT
    from vskip_core.runtime import start_stage

    stage = start_stage(smoke_cfg, "r", "00_x")
    for bad in (REPO_ROOT / "x", Path.home() / "x", tmp_path / "cache" / "teacher-x", stage.dir / "a"):
        with pytest.raises(ValueError, match=r"'methods\.vskip\.adapter'"):
            stage.finish({"methods": {"vskip": {"adapter": str(bad)}}})
    stage.finish({"teacher_path": "teacher-x", "note": "read from /work/x", "other": "/opt/models/x"})
    assert json.loads((stage.dir / "metrics.json").read_text())["teacher_path"] == "teacher-x"


@pytest.fixture
def branching(tmp_path, monkeypatch):
    """Three stages: 01 and 02 both read 00 only (side by side)."""
    reads = {"00_first": (), "01_second": ("00_first",), "02_third": ("00_first",)}
    monkeypatch.setattr(pipeline, "STAGE_READS", reads)
    return _stage_notebooks(tmp_path, monkeypatch, tuple(reads))


def test_stages_side_by_side_rerun_what_reads_them(branching, capsys):
    res = branching / "results"
    args = _args(res, "--jobs", "2")
    assert pipeline.main(args) == 0
    assert "up to 2 stages at once" in capsys.readouterr().out
    assert [_count(res, s) for s in ("00_first", "01_second", "02_third")] == [1, 1, 1]
    (res / "r" / "01_second" / ".done").unlink()  # 02 does not read 01: it stays
    assert pipeline.main(args) == 0
    assert [_count(res, s) for s in ("00_first", "01_second", "02_third")] == [1, 2, 1]
    (res / "r" / "00_first" / "metrics.json").write_text("{}")  # both read 00: both rerun
    assert pipeline.main(args) == 0
    assert [_count(res, s) for s in ("00_first", "01_second", "02_third")] == [2, 3, 2]


def test_a_failing_stage_lets_the_other_branch_finish(branching, capsys):
    res = branching / "results"
    args = _args(res)
    assert pipeline.main(args + ["--jobs", "2", "--set", "data.n_test=13"]) == 1  # 01_second raises
    assert "boom" in capsys.readouterr().err
    assert (res / "r" / "02_third" / ".done").exists() and not (res / "r" / "01_second" / ".done").exists()


def test_stage_reads_cover_what_each_notebook_reads():
    """Every stage is in config.STAGE_READS, reads only earlier stages, and every `upstream("...")` or stage
    folder its notebook names is among the stages it waits for (directly or through them)."""
    import re

    from vskip_core.config import STAGE_READS, STAGES

    assert set(STAGE_READS) == set(STAGES)

    def closure(stage):
        out = set()
        for s in STAGE_READS[stage]:
            out |= {s} | closure(s)
        return out

    for stage in STAGES:
        assert all(s < stage for s in STAGE_READS[stage]), stage
        src = (pipeline.NOTEBOOKS / f"{stage}.ipynb").read_text()
        named = set(re.findall(r"(0\d_[a-z_]+)", src)) - {stage}
        if stage == "01_rationale_generation":
            named -= {"00_embedded_teacher"}  # the teacher is made ready by the pipeline (prepare_teacher)
        assert named <= closure(stage), (stage, named - closure(stage))


def test_a_stage_reruns_when_what_it_read_ran_again_in_another_invocation(branching, capsys):
    res = branching / "results"
    args = _args(res, "--jobs", "1")
    assert pipeline.main(args) == 0
    assert pipeline.main(args + ["--stages", "00", "--force"]) == 0  # 00 alone, again
    capsys.readouterr()
    assert pipeline.main(args) == 0  # both readers of 00 see it ran after them
    assert [_count(res, s) for s in ("00_first", "01_second", "02_third")] == [2, 2, 2]
    assert "02_third: input 00_first ran again since it finished; it reruns" in capsys.readouterr().out


def test_reads_follow_the_chain_within_the_selected_stages():
    stages = ["01_rationale_generation", "03_gate_ablations", "08_pruned_student"]
    assert pipeline.reads("03_gate_ablations", stages) == ["01_rationale_generation"]  # through 02
    assert pipeline.reads("08_pruned_student", stages) == ["01_rationale_generation", "03_gate_ablations"]
    assert pipeline.reads("01_rationale_generation", stages) == []
