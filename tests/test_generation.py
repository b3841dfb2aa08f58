import copy
import importlib.util
import json

import pytest

from vskip_core.modeling.loading import load_model
from vskip_core.stages.generation import example_for, generate_rationales, load_rationales


class _Killed(Exception):
    pass


def test_rationales_resume_after_kill_without_loss_or_duplicates(tiny_teacher, tmp_path):
    cfg, _ = tiny_teacher
    cfg.generation.shard_size = 4
    cfg.generation.max_new_tokens = 16
    loaded = load_model(cfg)

    def kill_after_first(k):
        if k == 0:
            raise _Killed

    with pytest.raises(_Killed):
        generate_rationales(
            cfg, loaded, tmp_path / "a", split="train", n=10, progress=False, on_shard_done=kill_after_first
        )
    assert (tmp_path / "a" / "shards" / "shard-00000.jsonl").exists()
    assert not (tmp_path / "a" / "rationales.jsonl").exists()
    done = []
    generate_rationales(
        cfg, loaded, tmp_path / "a", split="train", n=10, progress=False, on_shard_done=done.append
    )
    assert done == [1, 2]  # only the unfinished shards ran
    resumed = load_rationales(tmp_path / "a")
    generate_rationales(cfg, loaded, tmp_path / "b", split="train", n=10, progress=False)
    straight = load_rationales(tmp_path / "b")
    assert [r["id"] for r in resumed] == [f"train-{i:06d}" for i in range(10)]
    assert [r["token_ids"] for r in resumed] == [r["token_ids"] for r in straight]
    rec = resumed[3]
    assert example_for(cfg, rec)["id"] == rec["id"]
    assert {"rationale", "parsed_answer", "correct", "time_s", "anchors", "family"} <= set(rec)
    assert load_rationales(tmp_path / "a", correct_only=True) == [r for r in resumed if r["correct"]]


def test_params_change_discards_stale_rationale_shards(tiny_teacher, tmp_path, capsys):
    """Shards written under other params (here max_new_tokens) are discarded, not merged: the pipeline reruns
    stage 01 after a params change and must get the new rationales."""
    cfg = copy.deepcopy(tiny_teacher[0])
    cfg.generation.shard_size = 4
    cfg.generation.max_new_tokens = 4
    loaded = load_model(cfg)
    generate_rationales(cfg, loaded, tmp_path / "a", split="train", n=6, progress=False)
    capsys.readouterr()
    cfg.generation.max_new_tokens = 12
    done = []
    generate_rationales(
        cfg, loaded, tmp_path / "a", split="train", n=6, progress=False, on_shard_done=done.append
    )
    assert done == [0, 1]  # both shards generated again
    assert "discarded 2 shards" in capsys.readouterr().out
    generate_rationales(cfg, loaded, tmp_path / "b", split="train", n=6, progress=False)
    straight = load_rationales(tmp_path / "b")
    assert [r["token_ids"] for r in load_rationales(tmp_path / "a")] == [r["token_ids"] for r in straight]


def test_sharded_writer_workers_resume_and_stale_shards(tmp_path, capsys):
    """The one shard writer of stages 01 and 02: workers write beside each other, every worker's rows come
    back (lists as lists), merge joins them, and shards of another fingerprint (or none) are all discarded."""
    from vskip_core.runtime import ShardedWriter

    for fmt in ShardedWriter.FORMATS:
        d = tmp_path / fmt
        w0, w1 = (ShardedWriter(d, "a", fmt, worker=(i, 2)) for i in (0, 1))
        w0.write([{"id": "x", "v": [1.5, 2.0]}])
        w1.write([{"id": "y", "v": [3.0]}])
        w0.write([{"id": "z", "v": []}])
        assert [f.name for f in w0.shards()] == [f"shard-w0of2-0000{k}.{fmt}" for k in (0, 1)] + [
            f"shard-w1of2-00000.{fmt}"
        ]
        rows = ShardedWriter(d, "a", fmt).rows()
        assert rows == [{"id": "x", "v": [1.5, 2.0]}, {"id": "z", "v": []}, {"id": "y", "v": [3.0]}]
        merged = ShardedWriter(d, "a", fmt).merge(tmp_path / f"all.{fmt}")
        assert ShardedWriter(d, "a", fmt).rows([merged]) == rows
        capsys.readouterr()
        assert ShardedWriter(d, "b", fmt).shards() == []
        assert "discarded 3 shards" in capsys.readouterr().out
    (tmp_path / "old").mkdir()  # shards from before fingerprints (no manifest.json) are not trusted
    (tmp_path / "old" / "shard-00000.jsonl").write_text('{"id": "x"}\n')
    assert ShardedWriter(tmp_path / "old", "a").rows() == []
    with pytest.raises(ValueError, match="format"):
        ShardedWriter(tmp_path, "a", "csv")


def test_sharded_workers_then_merge(tiny_teacher, tmp_path):
    cfg, _ = tiny_teacher
    cfg.generation.shard_size = 3
    cfg.generation.max_new_tokens = 8
    loaded = load_model(cfg)
    with pytest.raises(FileNotFoundError, match="shards missing"):
        generate_rationales(cfg, loaded, tmp_path, split="val", n=7, shard=(0, 2), progress=False)
    path = generate_rationales(cfg, loaded, tmp_path, split="val", n=7, shard=(1, 2), progress=False)
    ids = [json.loads(x)["id"] for x in path.read_text().splitlines()]
    assert ids == [f"val-{i:06d}" for i in range(7)]


def test_generation_cli_workers_then_merge(tiny_teacher, tmp_path, capsys):
    from vskip_core.stages.generation import main

    cfg, _ = tiny_teacher
    common = [
        "--params",
        "params/smoke.yaml",
        "--run",
        "cli",
        "--set",
        f"runtime.cache_dir={cfg.runtime.cache_dir}",
        "--set",
        f"runtime.results_dir={tmp_path}",
        "--set",
        "embedded.train_steps=40",
        "--set",
        "embedded.pretrain_steps=10",
        "--set",
        "embedded.lr=0.003",
        "--set",
        "generation.shard_size=4",
        "--set",
        "generation.n_examples=10",
        "--set",
        "generation.max_new_tokens=6",
    ]
    assert main([*common, "--merge"]) == 1  # nothing written yet: a clear error
    assert "shards missing" in capsys.readouterr().err
    assert main([*common, "--shard", "0/2"]) == 0
    assert "2 of 3 shards written" in capsys.readouterr().out
    assert main([*common, "--shard", "1/2"]) == 0
    out = tmp_path / "cli" / "01_rationale_generation" / "rationales.jsonl"
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == [
        f"train-{i:06d}" for i in range(10)
    ]
    assert main([*common, "--merge"]) == 0
    assert main([*common, "--shard", "2/2"]) == 2
    assert "0 <= i < n" in capsys.readouterr().err
    (out.parent / "shards" / "shard-00000.jsonl").unlink()
    if importlib.util.find_spec("vllm") is None:  # the optional backend names its extra when absent
        assert main([*common, "--backend", "vllm"]) == 2
        assert "pip install -e '.[vllm]'" in capsys.readouterr().err


def test_missing_rationales_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="01_rationale_generation"):
        load_rationales(tmp_path)


def test_keep_report_counts_what_kept_rationales_hands_on(smoke_cfg):
    """Notebook 01's filter table and stage 02's input come from one rule (`is_kept`)."""
    from vskip_core.config import load_params
    from vskip_core.stages.generation import is_kept, keep_report

    def rec(fam, ids, answered, correct):
        return {"family": fam, "token_ids": ids, "has_answer_line": answered, "correct": correct}

    recs = [
        rec("reading", [1], True, True),
        rec("reading", [1], True, False),
        rec("reading", [], False, False),
    ]
    recs += [rec("existence", [1, 2], False, False)]
    for keep, kept in (("correct", 1), ("answered", 2), ("all", 3)):
        cfg = load_params("params/smoke.yaml", {"generation.keep": keep})
        t = keep_report(cfg, recs)
        assert t.loc["total", "kept"] == kept == sum(is_kept(cfg, r) for r in recs)
        assert t.loc["reading", "generated"] == 3 and t.loc["reading", "non-empty"] == 2
    assert t.loc["total", "kept %"] == 75.0
