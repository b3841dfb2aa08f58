"""The real-model path, end to end on CPU: every real params file has a stand-in twin in params/standin/ that
differs only in an allow-list of keys (hub ids -> in-repo stand-ins, sizes), and the Qwen2-VL (Colab),
Qwen2.5-VL and Llama-3.2-Vision twins run all nine notebooks through `python -m vskip_core.pipeline`, from an
empty cache, with the command lines docs/COLAB.md gives."""

import json
import re
import shlex
import subprocess
import sys

import pytest

from vskip_core.config import REPO_ROOT, STAGES, load_params
from vskip_core.data.standins import VERSION

REAL = ("colab_qwen2vl_2b", "qwen2vl_7b", "qwen25vl_7b", "llama32_11b_vision")
# what a stand-in twin may change, and why: where the model and data come from, how much of them, and the
# rationale filter (a random-weight teacher is never right, so `correct` would leave later stages nothing)
ALLOWED = {
    "model.teacher",
    "distill.student",
    "gate.llmlingua2_model",
    "data.mmmu_id",
    "data.docvqa_id",
    "data.pope_id",
    "data.n_train",
    "data.n_val",
    "data.n_test",
    "generation.max_new_tokens",
    "generation.batch_size",
    "generation.keep",
    "distill.max_steps",
    "distill.save_steps",
    "distill.warmup_steps",
    "eval.n_examples",
    "eval.latency_examples",
    "eval.batch_size",
    "prune.n_examples",
}
PIPELINES = ("colab_qwen2vl_2b", "qwen25vl_7b", "llama32_11b_vision")  # one per model class


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@pytest.mark.parametrize("name", REAL)
def test_standin_twin_changes_only_allowed_keys(name):
    real = _flat(load_params(f"params/{name}.yaml").to_dict())
    twin = _flat(load_params(f"params/standin/{name}.yaml").to_dict())
    changed = {k for k in real if real[k] != twin[k]} - {"source"}
    assert changed <= ALLOWED, sorted(changed - ALLOWED)
    assert twin["model.teacher"].startswith("standin:") and twin["distill.student"].startswith("standin:")
    assert {"model.family", "model.dtype", "model.attn_implementation", "distill.quantization"}.isdisjoint(
        changed
    )


def colab_commands() -> list[list[str]]:
    """The `python -m vskip_core.pipeline` command lines of docs/COLAB.md, as argv lists (Colab's `!` and the
    set-up cell's {params_file} / {sets} filled in as the doc's own cells fill them)."""
    text = (REPO_ROOT / "docs" / "COLAB.md").read_text()
    params_file = re.search(r'^params_file = "([^"]+)"', text, re.M).group(1)
    cmds = []
    for line in re.findall(r"^!?\s*(python -m vskip_core\.pipeline .*?)(?:\s+#.*)?$", text, re.M):
        line = line.replace("{params_file}", params_file).replace("{sets}", "")
        cmds.append(shlex.split(line)[3:])
    assert cmds, "docs/COLAB.md lists no pipeline command"
    return cmds


def test_colab_plan_commands_run():
    """Every --plan line of docs/COLAB.md runs as written (a GPU is not needed to plan)."""
    from vskip_core import pipeline

    plans = [c for c in colab_commands() if "--plan" in c]
    assert plans
    for argv in plans:
        assert pipeline.main(argv) == 0, argv


def _run_argv(name: str) -> list[str]:
    """The doc's run command for the Colab file (section 3), the twin's params in place of the real ones; the
    same shape for the other files."""
    runs = [c for c in colab_commands() if "--plan" not in c and "params/colab_qwen2vl_2b.yaml" in c]
    assert len(runs) == 1, runs
    argv = list(runs[0])
    argv[argv.index("--params") + 1] = f"params/standin/{name}.yaml"
    return argv


def test_the_docs_cpu_command_is_the_tested_one():
    """docs/COLAB.md's CPU line for the stand-in twin is the Colab run command with the twin's params."""
    cpu = [c for c in colab_commands() if "params/standin/colab_qwen2vl_2b.yaml" in c]
    assert len(cpu) == 1
    tested = _run_argv("colab_qwen2vl_2b")
    strip = lambda a: [x for i, x in enumerate(a) if x != "--run" and (i == 0 or a[i - 1] != "--run")]  # noqa: E731
    assert strip(cpu[0]) == strip(tested)


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """The three twins' pipelines, started together (each runs one torch thread: on 2 cores three processes
    take about half the time of three in a row). name -> (returncode, stdout, stderr, results dir, cache dir)."""
    import os

    tmp = tmp_path_factory.mktemp("standin-pipelines")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VSKIP_JOBS": "1"}  # pipelines side by side: one stage each
    env.pop("VSKIP_PARAMS", None)
    env.pop("VSKIP_RUN", None)
    procs = {}
    for name in PIPELINES:
        res, cache = (
            tmp / name / "results",
            tmp / name / "cache",
        )  # empty: stand-ins and data build themselves
        argv = _run_argv(name) + [
            "--set",
            f"runtime.results_dir={res}",
            "--set",
            f"runtime.cache_dir={cache}",
        ]
        run = argv[argv.index("--run") + 1]
        log = open(tmp / f"{name}.log", "w+")
        p = subprocess.Popen(
            [sys.executable, "-m", "vskip_core.pipeline", *argv],
            cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, text=True, env=env,
        )  # fmt: skip
        procs[name] = (p, log, res / run, cache)
    out = {}
    for name, (p, log, res, cache) in procs.items():
        rc = p.wait(timeout=1500)
        log.seek(0)
        out[name] = (rc, log.read(), res, cache)
        log.close()
    return out


@pytest.mark.parametrize("name", PIPELINES)
def test_standin_pipeline_runs_every_stage(name, pipelines):
    rc, log, out, cache = pipelines[name]
    failed = sorted(str(p) for p in out.glob("*/failed.ipynb"))
    assert rc == 0, (log[-4000:], failed)
    for stage in STAGES:
        d = out / stage
        assert (d / "executed.ipynb").exists() and (d / ".done").exists(), stage
        assert json.loads((d / "metrics.json").read_text()), stage
    if (
        name == "llama32_11b_vision"
    ):  # the image enters through cross-attention: 07 says why it has no pruning
        assert (
            "cross-attention"
            in json.loads((out / "07_visual_token_pruning" / "metrics.json").read_text())["skipped"]
        )
    # every headline figure of the paper's table is computed for V-Skip, LLMLingua-2 and text-only (issue 31)
    summary = json.loads((out / "summary.json").read_text())
    main = {r["method"]: r for r in summary["rows"] if r["ratio"] == 0.5}
    for method in ("vskip", "llmlingua2", "text_only"):
        r = main[method]
        for key in ("anls", "pope_f1", "yes_ratio", "tokens", "latency_s", "act_ratio", "speedup_vs_teacher"):
            assert r[key] is not None, (method, key)
        assert all(r["varr"][t] is not None for t in ("colour", "shape", "category")), (method, r["varr"])
    gate = json.loads((out / "03_gate_ablations" / "metrics.json").read_text())["methods"]
    assert {"vskip", "llmlingua2", "text_only"} <= set(gate)
    assert all(gate[m]["0.5"]["varr"]["overall"] is not None for m in ("vskip", "llmlingua2", "text_only"))
    # the key-layer choice ran on the stand-in (its numbers are meaningless): every contiguous run of the
    # checkpoint's candidate layers under both head reductions, the chosen layers among them, the position analysis
    from transformers import AutoConfig

    from vskip_core.method.scoring import layer_windows
    from vskip_core.modeling.adapters import get_adapter

    family = load_params(f"params/standin/{name}.yaml").model.teacher.removeprefix("standin:")
    cands = get_adapter(family).image_layers(
        AutoConfig.from_pretrained(cache / "standins" / f"{family}-v{VERSION}")
    )
    choice = json.loads((out / "02_dual_scoring" / "metrics.json").read_text())["layer_choice"]
    runs = {(tuple(t["layers"]), t["head_reduce"]) for t in choice["table"]}
    assert runs == {(tuple(w), h) for w in layer_windows(cands) for h in ("max", "mean")}, runs
    assert set(choice["layers"]) <= set(cands) and choice["head_reduce"] in ("max", "mean")
    position = json.loads((out / "02_dual_scoring" / "metrics.json").read_text())["position"]
    assert {r["source"] for r in position} >= {"image", "blank image", "image - blank"}
    teacher = load_params(f"params/standin/{name}.yaml").model.teacher.removeprefix("standin:")
    built = sorted(p.name for p in (cache / "standins").iterdir())
    # the data, the teacher (also the student) and LLMLingua-2's classifier: nothing else is built
    assert built == sorted(f"{k}-v{VERSION}" for k in ("mmmu", "docvqa", "pope", teacher, "llmlingua2"))


def test_plan_agrees_with_stage_01(capsys):
    """--plan counts the rationales stage 01 generates (the whole train split for every real file)."""
    from vskip_core import pipeline
    from vskip_core.stages.generation import plan_shards

    for name in REAL:
        cfg = load_params(f"params/{name}.yaml")
        _, n, _ = plan_shards(cfg)
        assert n == cfg.data.n_train
        assert pipeline.main(["--params", f"params/{name}.yaml", "--plan", "--gpu", "A100-80GB"]) == 0
        assert f"; {n} rationales" in capsys.readouterr().out, name


@pytest.mark.parametrize("name", REAL)
def test_plan_for_every_standin_twin(name, tmp_path, capsys):
    """--plan reads the stand-in's saved config (built on first use), like a local hub checkpoint's."""
    from vskip_core import pipeline

    argv = ["--params", f"params/standin/{name}.yaml", "--plan", "--set", f"runtime.cache_dir={tmp_path}"]
    assert pipeline.main(argv) == 0
    out = capsys.readouterr().out
    assert (
        "stand-in config" in out
        and f"; {load_params(f'params/standin/{name}.yaml').data.n_train} rationales" in out
    )
