"""MMMU, DocVQA and POPE loaders on local fixtures written in each hub dataset's exact schema and layout."""

import json

import pyarrow.parquet as pq
import pytest
from fixtures.hub_datasets import write_all, write_docvqa, write_pope

from vskip_core.config import ParamsError, load_params
from vskip_core.data import real as B
from vskip_core.data.embedded import make_example

EMBEDDED_KEYS = set(make_example(load_params("params/smoke.yaml"), "test", 0))


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    return write_all(tmp_path_factory.mktemp("hub"))


def _cfg(hub, tmp_path, **over):
    o = {
        "data.source": ["mmmu", "docvqa", "pope"],
        "data.mmmu_id": str(hub["mmmu"]),
        "data.docvqa_id": str(hub["docvqa"]),
        "data.pope_id": str(hub["pope"]),
        "data.n_train": 9,
        "data.n_val": 3,
        "data.n_test": 6,
        "runtime.cache_dir": str(tmp_path / "cache"),
    }
    o.update({f"data.{k}" if "." not in k else k: v for k, v in over.items()})
    return load_params("params/smoke.yaml", o)


def test_fixtures_have_the_hub_schema(hub):
    """The fixture files carry the hub's columns and feature types (what the loaders must cope with)."""
    mmmu = pq.read_schema(hub["mmmu"] / "Art" / "validation-00000-of-00001.parquet")
    feats = json.loads(mmmu.metadata[b"huggingface"])["info"]["features"]
    assert list(feats)[:4] == ["id", "question", "options", "explanation"]
    assert feats["options"] == {"dtype": "string", "_type": "Value"}  # a string holding a Python list
    assert all(feats[f"image_{k}"]["_type"] == "Image" for k in range(1, 8))
    doc = json.loads(
        pq.read_schema(hub["docvqa"] / "DocVQA" / "test-00000-of-00001.parquet").metadata[b"huggingface"]
    )
    assert doc["info"]["features"]["docId"] == {"dtype": "int64", "_type": "Value"}
    assert set(
        json.loads(
            pq.read_schema(hub["pope"] / "data" / "test-00000-of-00001.parquet").metadata[b"huggingface"]
        )["info"]["features"]
    ) == {
        "id",
        "question_id",
        "question",
        "answer",
        "image_source",
        "image",
        "category",
    }


def test_records_follow_the_embedded_schema(hub, tmp_path):
    cfg = _cfg(hub, tmp_path)
    train = B.examples(cfg, "train")
    assert len(train) == 9
    assert [r["source"] for r in train] == ["mmmu", "docvqa", "pope"] * 3  # rotation, like families
    for r in train:
        assert EMBEDDED_KEYS <= set(r) and "images" in r
        assert r["family"] == B.SOURCE_FAMILY[r["source"]]
        assert r["scene"] is None and r["anchors"] == [] and r["rationale"] == ""
        assert r["image"].size == r["images"][0].size and len(r["images"]) >= 1
        assert isinstance(r["options"], list) and isinstance(r["answers"], list) and r["answers"]
    for r in (r for r in B.examples(cfg, "test") + train if r["source"] == "mmmu"):
        refs = {int(n) for n in B.IMAGE_REF.findall(r["question"] + " ".join(r["options"]))}
        assert refs and max(refs) <= len(r["images"])
        if r["question_type"] == "multiple-choice":
            assert r["answer"] in "ABCD" and r["options"] and all(isinstance(o, str) for o in r["options"])
    docs = [r for r in train if r["source"] == "docvqa"]
    assert all(r["answer"].startswith("$") and r["answers"][1] == r["answer"][1:] for r in docs)
    assert {r["pope_split"] for r in train if r["source"] == "pope"} <= {"adversarial", "popular", "random"}
    assert all(r["answer"] in ("yes", "no") for r in train if r["source"] == "pope")


def test_mmmu_options_and_open_answers():
    assert B.parse_options("['a', \"they're\", '<image 2>']") == ["a", "they're", "<image 2>"]
    assert B.parse_options("[]") == []
    with pytest.raises(B.BenchmarkError, match="not a Python list"):
        B.parse_options("['a', ", "MMMU x")
    from fixtures.hub_datasets import mmmu_rows

    rows = mmmu_rows("Math", "validation", 4)
    rec = B.normalize_mmmu(rows[3])
    assert rec["question_type"] == "open" and rec["answers"] == ["1", "one"] and rec["answer"] == "1"
    rows[1]["image_1"] = None  # `<image 2>` is then the first image: placeholders are renumbered
    rec = B.normalize_mmmu(dict(rows[1], question="Look at <image 2>."))
    assert rec["question"] == "Look at <image 1>." and len(rec["images"]) == 1
    with pytest.raises(B.BenchmarkError, match="empty"):
        B.normalize_mmmu(dict(rows[1], question="Look at <image 1>."))


def test_interleaved_images_reach_both_encoders(hub, tmp_path):
    """An MMMU record with images in question and options encodes with one image block per placeholder."""
    from vskip_core.modeling.adapters import get_adapter

    cfg = _cfg(hub, tmp_path, source=["mmmu"], n_train=12, n_val=0, n_test=0)
    multi = [r for r in B.examples(cfg, "train") if len(r["images"]) > 1]
    assert multi
    texts = [r["question"] + " " + " ".join(r["options"]) for r in multi] * 20
    for fam, marker in (("qwen2_vl", "<|vision_start|>"), ("mllama", "<|image|>")):
        ad = get_adapter(fam)
        tok, proc = ad.tiny_tokenizer(texts), ad.tiny_image_processor()
        for r in multi:
            n_refs = len(
                B.IMAGE_REF.findall(
                    r["question"] + " ".join(f"({i}) {o}" for i, o in enumerate(r["options"]))
                )
            )
            enc = ad.encode(r, tok, proc, instruction="Answer with the letter.")
            assert ad.prompt_text(r, tok).count(marker) == n_refs
            if fam == "mllama":
                assert enc["pixel_values"].shape[1] == n_refs
            else:
                assert enc["image_grid_thw"].shape[0] == n_refs


def test_subsampling_is_seeded_disjoint_and_cached(hub, tmp_path):
    cfg = _cfg(hub, tmp_path)
    ids = {s: [r["id"] for r in B.examples(cfg, s)] for s in ("train", "val", "test")}
    all_ids = ids["train"] + ids["val"] + ids["test"]
    assert len(set(all_ids)) == len(all_ids) == 18
    again = {s: [r["id"] for r in B.examples(_cfg(hub, tmp_path / "other"), s)] for s in ids}
    assert again == ids  # same seed, fresh cache: same subset
    other = [r["id"] for r in B.examples(_cfg(hub, tmp_path / "s2", seed=7), "train")]
    assert other != ids["train"]
    card = B.benchmark_card(cfg)
    assert card["sources"]["mmmu"]["usable"] == 24 and card["sources"]["pope"]["kept"] == {
        "train": 3,
        "val": 1,
        "test": 2,
    }
    # built once: the cache answers even when the source files are gone
    import shutil

    copy = tmp_path / "pope_copy"
    shutil.copytree(hub["pope"], copy)
    pcfg = _cfg(hub, tmp_path / "c", source=["pope"], pope_id=str(copy), n_train=3, n_val=0, n_test=2)
    first = [r["id"] for r in B.examples(pcfg, "train")]
    shutil.rmtree(copy)
    assert [r["id"] for r in B.examples(pcfg, "train")] == first
    assert B.real_cache_dir(
        _cfg(hub, tmp_path / "c", source=["pope"], pope_id=str(hub["pope"]), n_train=3, n_val=0, n_test=2)
    ) != B.real_cache_dir(pcfg)
    dd, path = B.build_real_benchmark(cfg)
    assert path == B.real_cache_dir(cfg) and (path / "card.json").exists()
    assert B.example_at(cfg, "test", 2)["id"] == ids["test"][2]


def test_filters_and_sizes(hub, tmp_path):
    cfg = _cfg(
        hub, tmp_path, source=["mmmu"], mmmu_subjects=["Art"], n_train=2, n_val=0, n_test=2, max_images=1
    )
    recs = B.examples(cfg, "train") + B.examples(cfg, "test")
    assert len(recs) == 4 and all("_Art_" in r["id"] and len(r["images"]) == 1 for r in recs)
    card = B.benchmark_card(cfg)["sources"]["mmmu"]
    # 16 rows of the other two subjects; 4 of the 8 Art rows have 2 or 3 images
    assert card["filters"]["other_subject"] == 16 and card["filters"]["too_many_images"] == 4
    assert card["usable"] == 4
    pope = _cfg(hub, tmp_path, source=["pope"], pope_categories=["adversarial"], n_train=2, n_val=0, n_test=2)
    assert {r["pope_split"] for r in B.examples(pope, "train") + B.examples(pope, "test")} == {"adversarial"}
    with pytest.raises(B.BenchmarkError, match="only 6 usable rows"):
        B.examples(
            _cfg(hub, tmp_path, source=["pope"], pope_categories=["random"], n_train=5, n_val=0, n_test=5),
            "train",
        )
    with pytest.raises(B.BenchmarkError, match="unknown subjects"):
        B.examples(_cfg(hub, tmp_path, source=["mmmu"], mmmu_subjects=["Alchemy"]), "train")


def test_splits_without_answers_are_refused(hub, tmp_path):
    cfg = _cfg(hub, tmp_path, source=["docvqa"], docvqa_split="test", n_train=2, n_val=0, n_test=0)
    with pytest.raises(B.BenchmarkError, match="hidden.*validation"):
        B.examples(cfg, "train")
    with pytest.raises(ParamsError, match="mmmu_split"):
        _cfg(hub, tmp_path, mmmu_split="test")
    with pytest.raises(ParamsError, match="data.source"):
        _cfg(hub, tmp_path, source=["mmmu", "embedded"])


def test_local_save_to_disk_and_both_docvqa_homes(hub, tmp_path):
    import datasets

    pope = B.open_split(str(hub["pope"]), "test")
    datasets.DatasetDict({"test": pope}).save_to_disk(str(tmp_path / "pope_dd"))
    pope.save_to_disk(str(tmp_path / "pope_ds"))
    for src in ("pope_dd", "pope_ds"):
        cfg = _cfg(
            hub, tmp_path / src, source=["pope"], pope_id=str(tmp_path / src), n_train=3, n_val=0, n_test=3
        )
        assert len(B.examples(cfg, "train")) == 3
    # lmms-lab-encoder/DocVQA has the same layout as lmms-lab/DocVQA: one loader for both
    enc_home = write_docvqa(tmp_path / "lmms-lab-encoder" / "DocVQA", n_validation=5)
    cfg = _cfg(
        hub, tmp_path / "enc", source=["docvqa"], docvqa_id=str(enc_home), n_train=3, n_val=0, n_test=2
    )
    assert all(r["id"].startswith("docvqa-49") for r in B.examples(cfg, "train"))
    with pytest.raises(B.BenchmarkError, match="no parquet files for split 'validation'"):
        B.open_split(str(write_pope(tmp_path / "only_test")), "validation")


def test_hub_offline_error_says_to_pass_a_local_path(monkeypatch):
    import datasets
    import huggingface_hub.constants as hc

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    with pytest.raises(B.BenchmarkError, match=r"lmms-lab/POPE.*save_to_disk.*data.mmmu_id=DIR"):
        B.open_split("lmms-lab/POPE", "test")


def test_moved_hub_ids_default_and_fall_back_to_the_old_id(monkeypatch):
    """DocVQA and POPE live under lmms-lab-encoder/ (the defaults); when the hub says the new id is not found,
    the old lmms-lab/ id is tried, with a warning. Offline, no fallback: the error names a local path."""
    import datasets
    import huggingface_hub.constants as hc

    from vskip_core.config import DataConfig

    assert (
        DataConfig().docvqa_id == "lmms-lab-encoder/DocVQA"
        and DataConfig().pope_id == "lmms-lab-encoder/POPE"
    )
    calls = []

    def not_found(path, *a, **kw):
        calls.append((path, a))
        if path.startswith("lmms-lab-encoder/"):
            raise datasets.exceptions.DatasetNotFoundError(f"Dataset '{path}' doesn't exist on the Hub")
        return f"loaded {path}"

    monkeypatch.setattr(datasets, "load_dataset", not_found)
    with pytest.warns(UserWarning, match=r"lmms-lab-encoder/POPE.*not found.*lmms-lab/POPE"):
        assert B.open_split("lmms-lab-encoder/POPE", "test") == "loaded lmms-lab/POPE"
    calls.clear()
    with pytest.warns(UserWarning, match=r"lmms-lab-encoder/DocVQA.*not found.*lmms-lab/DocVQA"):
        assert (
            B.open_split("lmms-lab-encoder/DocVQA", "validation", B.DOCVQA_CONFIG) == "loaded lmms-lab/DocVQA"
        )
    assert [c[0] for c in calls][-1] == "lmms-lab/DocVQA"
    with pytest.raises(B.BenchmarkError, match=r"lmms-lab-encoder/Other.*save_to_disk"):  # no old home known
        B.open_split("lmms-lab-encoder/Other", "test")

    def offline(path, *a, **kw):
        calls.append((path, a))
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (OfflineModeIsEnabled)")

    calls.clear()
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(B.BenchmarkError, match=r"lmms-lab-encoder/POPE.*save_to_disk.*data.mmmu_id=DIR"):
        B.open_split("lmms-lab-encoder/POPE", "test")
    assert {c[0] for c in calls} == {"lmms-lab-encoder/POPE"}  # the old id is not tried offline
    monkeypatch.undo()
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    with pytest.raises(B.BenchmarkError, match=r"lmms-lab-encoder/DocVQA.*save_to_disk.*DIR"):
        B.open_split("lmms-lab-encoder/DocVQA", "validation", B.DOCVQA_CONFIG)


def test_real_anchors():
    pope_yes = {
        "source": "pope",
        "question": "Is there a dog in the image?",
        "answer": "yes",
        "answers": ["yes"],
    }
    text = "I see two red dogs on the left, an orange cup, and no cat."
    a = {x["value"]: x for x in B.find_real_anchors(text, pope_yes)}
    assert a["dog"]["type"] == "object" and a["dog"]["in_scene"] is True and a["dog"]["in_question"]
    assert text[a["dog"]["start"] : a["dog"]["end"]] == "dogs"
    assert a["red"]["type"] == "colour" and a["red"]["in_scene"] is None
    assert (
        a["orange"]["type"] == "colour" and a["left"]["type"] == "position" and a["cat"]["in_scene"] is None
    )
    assert not any(x["value"] in ("yes", "no") for x in a.values())
    pope_no = dict(pope_yes, question="Is there an orange in the image?", answer="no", answers=["no"])
    b = {x["value"]: x for x in B.find_real_anchors(text, pope_no)}
    assert b["orange"]["type"] == "object" and b["orange"]["in_scene"] is False
    doc = {"source": "docvqa", "question": "What is the total?", "answers": ["$17.07", "17.07"]}
    c = B.find_real_anchors("The total at the bottom reads $17.07, paid 2024.", doc)
    kinds = {(x["type"], x["value"], x["in_scene"]) for x in c}
    assert (
        ("text", "$17.07", True) in kinds
        and ("position", "bottom", None) in kinds
        and ("text", "2024", None) in kinds
    )
    spans = sorted((x["start"], x["end"]) for x in c)
    assert all(e1 <= s2 for (_, e1), (s2, _) in zip(spans, spans[1:]))  # no overlaps
    from vskip_core.data.embedded import find_anchors

    emb = make_example(load_params("params/smoke.yaml"), "test", 0)
    assert B.find_anchors_for(emb["rationale"], emb) == find_anchors(emb["rationale"], emb["scene"])


def test_examples_dispatch_embedded(smoke_cfg):
    ids = [r["id"] for r in B.examples(smoke_cfg, "test", 3)]
    assert ids == [make_example(smoke_cfg, "test", i)["id"] for i in range(3)]
    assert B.example_at(smoke_cfg, "val", 2)["id"] == "val-000002"
    with pytest.raises(B.BenchmarkError, match="unknown split"):
        B.examples(smoke_cfg, "dev")
