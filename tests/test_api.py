"""The public API and the `vskip` command: what they keep equals what stages 02-03 keep, on the embedded teacher and
on stand-ins of the real classes; pruned generation equals stage 07's decoder; bad input fails in one line."""

import dataclasses
import json

import pytest

from vskip_core import Compressor, InputError, generate_pruned, load_vlm
from vskip_core.cli import main as vskip
from vskip_core.config import load_params
from vskip_core.modeling.standins import RATIONALE

STANDIN_PARAMS = {
    "qwen2_vl": "params/standin/qwen2vl_7b.yaml",
    "mllama": "params/standin/llama32_11b_vision.yaml",
}


def _band(cfg):
    """Stage 02 with the layer-band rule: the key layers do not depend on which rows were scored."""
    sc = dataclasses.replace(cfg.scoring, layer_select="band", head_reduce="max", blank_image=False)
    return dataclasses.replace(cfg, scoring=sc)


def _params_file(cfg, tmp_path) -> str:
    p = tmp_path / "params.json"
    p.write_text(json.dumps(cfg.to_dict()))
    return str(p)


def _dataset(examples, rationales):
    from datasets import Dataset

    return Dataset.from_list(
        [
            {
                "image": ex["image"],
                "question": ex["question"],
                "options": ex.get("options") or [],
                "rationale": r,
            }
            for ex, r in zip(examples, rationales)
        ]
    )


def _stages_02_03(cfg, model: str, examples, rationales, gamma=0.5, method="vskip"):
    """What stage 02 scores and stage 03's gate keeps for these rationales (the pipeline's own functions)."""
    from vskip_core.method.gating import gate_rows
    from vskip_core.metrics import compress_text
    from vskip_core.modeling.loading import load_model
    from vskip_core.stages.scoring import score_rationales

    records = [{"id": str(i), "rationale": r} for i, r in enumerate(rationales)]
    exs = [{**ex, "id": str(i)} for i, ex in enumerate(examples)]
    df = score_rationales(load_model(cfg, model), cfg, records, exs, progress=False, require_answer_line=True)
    rows = df.to_dict("records")
    keeps = gate_rows(rows, method, gamma, cfg, cfg.runtime.seed)
    return {r["id"]: (compress_text(r, k), k.tolist()) for r, k in zip(rows, keeps)}, df.attrs["key_layers"]


def _check_same(ds, ref):
    assert len(ref) >= 3, "too few rows scored to compare"
    for i, row in enumerate(ds):
        if str(i) in ref:
            text, keep = ref[str(i)]
            assert row["compressed_rationale"] == text and row["keep_mask"] == keep, i
            assert row["gate_error"] == ""


def _embedded(tiny_teacher, n=6):
    from vskip_core.data.real import example_at

    cfg = _band(tiny_teacher[0])
    exs = [example_at(cfg, "train", i) for i in range(n)]
    return cfg, exs, [ex["rationale"] for ex in exs]


def test_compress_dataset_and_vskip_compress_keep_what_stages_02_03_keep(tiny_teacher, tmp_path):
    from datasets import load_from_disk

    cfg, exs, rationales = _embedded(tiny_teacher)
    ref, layers = _stages_02_03(cfg, "embedded", exs, rationales)
    comp = Compressor.from_pretrained("embedded", cfg)
    assert comp.key_layers == layers
    ds = _dataset(exs, rationales)
    out = comp.compress_dataset(ds, gamma=0.5, options_column="options", progress=False)
    _check_same(out, ref)
    assert set(ds.column_names) < set(out.column_names)
    assert all(abs(r - 0.5) < 0.1 for r in out["kept_ratio"])
    one = comp.compress(exs[0]["image"], exs[0]["question"], rationales[0], 0.5, options=exs[0]["options"])
    assert (one.text, one.keep.tolist()) == ref["0"]
    assert len(one.scores.tokens) == len(one.keep) == len(one.scores.anchoring)

    ds.save_to_disk(str(tmp_path / "in"))
    args = ["compress", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]
    assert vskip([*args, "--params", _params_file(cfg, tmp_path), "--options-column", "options"]) == 0
    _check_same(load_from_disk(str(tmp_path / "out")), ref)
    assert not (tmp_path / "out.partial").exists() and not (tmp_path / "out.writing").exists()


@pytest.mark.parametrize("family", ["qwen2_vl", "mllama"])
def test_compress_on_standins_of_the_real_classes_keeps_what_stages_02_03_keep(family, tmp_path):
    from vskip_core.data import standins
    from vskip_core.data.real import normalize_pope

    cfg = _band(load_params(STANDIN_PARAMS[family], {"runtime.cache_dir": str(tmp_path / "cache")}))
    exs = [normalize_pope(r) for r in standins.pope_rows(2)]
    rationales = [RATIONALE] * len(exs)
    ref, _ = _stages_02_03(cfg, f"standin:{family}", exs, rationales)
    comp = Compressor.from_pretrained(f"standin:{family}", cfg)
    assert comp.loaded.family == family
    _check_same(comp.compress_dataset(_dataset(exs, rationales), 0.5, progress=False), ref)


def test_a_second_call_with_the_same_out_dir_reads_the_scored_shards_back(
    tiny_teacher, tmp_path, monkeypatch
):
    import vskip_core.stages.scoring as stage_02

    cfg, exs, rationales = _embedded(tiny_teacher, 4)
    comp = Compressor.from_pretrained("embedded", cfg)
    ds = _dataset(exs, rationales)
    first = comp.compress_dataset(ds, 0.5, out_dir=tmp_path / "shards", progress=False)
    assert list((tmp_path / "shards" / stage_02.SHARD_DIR).glob("*.parquet"))
    monkeypatch.setattr(stage_02, "_score_chunk", lambda *a: pytest.fail("scored again instead of resuming"))
    again = comp.compress_dataset(ds, 0.5, out_dir=tmp_path / "shards", progress=False)
    assert again["compressed_rationale"] == first["compressed_rationale"]


def test_rationales_are_written_by_the_model_when_the_column_is_absent(tiny_teacher):
    cfg, exs, _ = _embedded(tiny_teacher, 3)
    comp = Compressor.from_pretrained("embedded", cfg)
    ds = _dataset(exs, ["-"] * 3).remove_columns("rationale")
    out = comp.compress_dataset(ds, 0.5, progress=False)
    assert out["rationale"] == comp.generate_rationales(
        [{**e, "id": str(i)} for i, e in enumerate(exs)], False
    )
    assert all(isinstance(t, str) for t in out["compressed_rationale"])


@pytest.mark.parametrize("method", ["fastv", "divprune", "zspaprune"])
@pytest.mark.parametrize("dstp", [False, True])
def test_generate_pruned_equals_stage_07s_decoder(method, dstp, tmp_path, one_thread):
    from vskip_core.data import standins
    from vskip_core.data.real import normalize_pope
    from vskip_core.method.pruning import PruneSpec
    from vskip_core.stages.pruning import generate_pruned as stage_07

    cfg = load_params(STANDIN_PARAMS["qwen2_vl"], {"runtime.cache_dir": str(tmp_path / "cache")})
    vlm = load_vlm("standin:qwen2_vl", cfg)
    ex = normalize_pope(standins.pope_rows(1)[0])
    got = generate_pruned(vlm, ex["image"], ex["question"], method, 0.333, dstp, 12, cfg, return_record=True)
    spec = PruneSpec.from_config(cfg, method, 0.333, dstp)
    (ref,) = stage_07(vlm, [ex], spec, 12, 1, instruction=cfg.generation.instruction)
    assert got["token_ids"] == ref["token_ids"] and got["kept"] == ref["kept"]
    assert got["visual_tokens"] == ref["visual_tokens"] < ref["n_visual"]
    assert (got["reselections"] > 0) == dstp or len(got["token_ids"]) < 5
    assert generate_pruned(vlm, ex["image"], ex["question"], method, 0.333, dstp, 12, cfg) == ref["text"]


# ------------------------------------------------------------------------------------------- bad input
def test_bad_input_is_one_line_exit_2_and_nothing_written(tiny_teacher, tmp_path, capsys):
    cfg, exs, rationales = _embedded(tiny_teacher, 2)
    _dataset(exs, rationales).save_to_disk(str(tmp_path / "in"))
    capsys.readouterr()  # save_to_disk's progress bar
    base = ["compress", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]
    base += ["--params", _params_file(cfg, tmp_path)]
    for extra, words in [
        (["--question-column", "prompt"], ["no column 'prompt'", "--question-column"]),
        (["--gamma", "1.5"], ["--gamma 1.5", "(0, 1]"]),
        (["--method", "vskp"], ["unknown gate method 'vskp'", "did you mean 'vskip'"]),
    ]:
        assert vskip(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and all(w in err for w in words), err
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.writing").exists()
    llava = tmp_path / "llava"
    llava.mkdir()
    (llava / "config.json").write_text(json.dumps({"model_type": "llava"}))
    assert vskip([*base, "--model", str(llava)]) == 2
    err = capsys.readouterr().err
    assert "llava" in err and "supported" in err, err
    with pytest.raises(InputError, match="gamma"):
        Compressor.from_pretrained("embedded", cfg).compress(exs[0]["image"], "Q?", "text", gamma=0)


def test_vskip_help_and_plan(capsys):
    assert vskip([]) == 0
    assert "compress" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        vskip(["compress", "--help"])
    assert e.value.code == 0 and "--rationale-column" in capsys.readouterr().out
    assert vskip(["run", "--plan", "--params", "params/colab_qwen2vl_2b.yaml"]) == 0
    assert "Qwen/Qwen2-VL-2B-Instruct" in capsys.readouterr().out


def test_the_vskip_command_is_installed():
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).with_name("vskip")  # [project.scripts], installed by make test's pip install
    assert exe.exists(), f"{exe} missing: reinstall with pip install -e ."
    out = subprocess.run([str(exe), "compress", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--gamma" in out.stdout, out.stderr


def test_the_package_top_is_the_public_api():
    import vskip_core

    assert {"Compressor", "load_vlm", "generate_pruned"} <= set(vskip_core.__all__)
    for name in vskip_core.__all__:
        obj = getattr(vskip_core, name)
        assert name == "__version__" or obj.__doc__, name
    with pytest.raises(AttributeError):
        vskip_core.not_public  # noqa: B018
    from importlib.metadata import version

    assert vskip_core.__version__ == version("vskip")  # the installed package's, from pyproject.toml
