"""The paper's benchmarks through `datasets`: MMMU, DocVQA and POPE, normalized into the embedded record schema.

    cfg = load_params("params/colab_qwen2vl_2b.yaml")
    train = examples(cfg, "train")        # list of records, the same keys as data.make_example
    dd, path = build_real_benchmark(cfg)   # the cached DatasetDict (train / val / test) behind it

| source | hub id (`data.<source>_id`) | split used | family | metric |
|---|---|---|---|---|
| `mmmu` | `MMMU/MMMU`, one config per subject (30, or `data.mmmu_subjects`) | validation (900) or dev | multistep | accuracy (MMMU parsing) |
| `docvqa` | `lmms-lab-encoder/DocVQA` (formerly `lmms-lab/DocVQA`), config `DocVQA` | validation (5349) | reading | ANLS |
| `pope` | `lmms-lab-encoder/POPE` (formerly `lmms-lab/POPE`), default config | test (9000 = 3 x 3000) | existence | F1, yes-ratio |

**Record schema** (what `data.make_example` returns): `id` (`mmmu-validation_Art_12`, `docvqa-49153`,
`pope-3001`), `family`, `source`, `image` (the first image), `images` (all images, in `<image N>` order),
`question`, `options` (list; MMMU stores a string holding a Python list, parsed with `ast.literal_eval`),
`answer`, `answers` (DocVQA's references; MMMU open answers that are lists), `question_type`
(multiple-choice | open), `attr_type` (multistep | text | existence), `pope_split` (POPE's category:
adversarial | popular | random), `scene=None`, `rationale=""`, `anchors=[]`, `template=0`. MMMU's
`<image N>` placeholders stay in the text; `vskip_core.modeling.adapters.interleave` puts image N there.

**Splits.** Only answered splits can be scored (DocVQA's and MMMU's test answers are hidden: asking for them is
an error, not an empty metric). The pipeline's train / val / test are disjoint slices of one seeded permutation
of each source's answered split: `data.n_train` rationales to distil from, `data.n_test` to evaluate on; with
several sources, examples rotate between them as the embedded families do. Each example of the real split is
normalized once and cached with its images in `<runtime.cache_dir>/real-<hash>/` (`card.json` beside it
says how many rows every filter kept).

**Where the data comes from.** `data.<source>_id` is a hub id (`datasets.load_dataset`; only the needed
split's parquet files are fetched when the repository has the usual `<config>/<split>-*.parquet` layout) or a
local path: a `save_to_disk` folder (Dataset or DatasetDict) or a folder of parquet files in the hub layout
(how the tests feed it, and how to run offline: `load_dataset(...).save_to_disk(DIR)` on a machine with access).
DocVQA and POPE moved from `lmms-lab/` to `lmms-lab-encoder/` (the old ids redirected in 2026): when the hub
says a new id is not found, its old id (`HUB_FALLBACKS`) is tried, with a warning; offline, nothing is retried.

**Visual anchors on real data (for VARR).** There is no scene ground truth: nobody annotated which attribute
each image has. `find_real_anchors(text, ex)` finds, in any text (the teacher's own rationale, a compressed one,
a student's output), the mentions of:
- colour words (basic colour terms), shape words, size words, position words, from fixed English lexicons;
- object categories: the 80 COCO category names (POPE's objects are COCO objects), singular or plural;
- text read off the image: every span equal to one of the example's gold answers (DocVQA's answers are
  strings printed in the document), plus prices, percentages and numbers with at least two digits.
Each mention gets `in_question` and `in_scene`: `in_scene` is True for a gold-answer span and for POPE's queried
object when the answer is yes, False for that object when the answer is no, and None (unknown) otherwise.
Limits: VARR on real data measures whether attribute *mentions* survive compression, not whether they are
true; the lexicons are English and closed (materials, textures, brand names, chart values written in words,
non-COCO objects are missed); a colour word is counted even when it is not about the image ("red blood cells"
in an MMMU medicine question); hallucination counts (attributes that contradict the scene) exist only for
POPE's queried object. `ANCHOR_NOTE` holds this paragraph for the notebooks.
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
import re
import warnings
from pathlib import Path
from typing import Any

from vskip_core.config import Config
from vskip_core.data.embedded import build_benchmark, decode_record, find_anchors, make_example
from vskip_core.data.standins import VERSION as STANDIN_VERSION
from vskip_core.data.standins import is_standin
from vskip_core.data.standins import resolve_dataset as resolve
from vskip_core.runtime import build_dir_once
from vskip_core.runtime import progress as tqdm

SCHEMA_VERSION = 1  # bump when the normalized schema changes (it keys the cache)
SOURCE_FAMILY = {"mmmu": "multistep", "docvqa": "reading", "pope": "existence"}
SOURCE_ATTR = {"mmmu": "multistep", "docvqa": "text", "pope": "existence"}
MMMU_SUBJECTS = (
    "Accounting",
    "Agriculture",
    "Architecture_and_Engineering",
    "Art",
    "Art_Theory",
    "Basic_Medical_Science",
    "Biology",
    "Chemistry",
    "Clinical_Medicine",
    "Computer_Science",
    "Design",
    "Diagnostics_and_Laboratory_Medicine",
    "Economics",
    "Electronics",
    "Energy_and_Power",
    "Finance",
    "Geography",
    "History",
    "Literature",
    "Manage",
    "Marketing",
    "Materials",
    "Math",
    "Mechanical_Engineering",
    "Music",
    "Pharmacy",
    "Physics",
    "Psychology",
    "Public_Health",
    "Sociology",
)
DOCVQA_CONFIG = "DocVQA"
POPE_SPLIT = "test"
POPE_CATEGORIES = ("adversarial", "popular", "random")
IMAGE_REF = re.compile(r"<image (\d+)>")
# Hub ids that moved: current id -> the old one, tried when the hub says the current one is not found
HUB_FALLBACKS = {"lmms-lab-encoder/DocVQA": "lmms-lab/DocVQA", "lmms-lab-encoder/POPE": "lmms-lab/POPE"}


class BenchmarkError(ValueError):
    """A benchmark cannot be loaded or used as configured; the message says what to change."""


# ------------------------------------------------------------------------------------------- opening
def is_local(dataset_id: str) -> bool:
    return Path(dataset_id).expanduser().exists()


def open_split(dataset_id: str, split: str, config: str | None = None):
    """One split of a dataset as a `datasets.Dataset`: from a local path (save_to_disk folder, or a folder of
    parquet files in the hub layout `[<config>/]<split>-*.parquet`) or from the hub."""
    if is_local(dataset_id):
        return _open_local(Path(dataset_id).expanduser(), split, config)
    try:
        return _open_hub(dataset_id, split, config)
    except BenchmarkError as e:
        old = HUB_FALLBACKS.get(dataset_id)
        if old is None or not _hub_not_found(e.__cause__):
            raise
    warnings.warn(
        f"{dataset_id!r} was not found on the Hugging Face hub; loading its old id {old!r} instead",
        stacklevel=2,
    )
    return _open_hub(old, split, config)


def _hub_not_found(e: BaseException | None) -> bool:
    """The hub answered that the dataset does not exist (not: offline, no network, no access)."""
    import datasets
    from huggingface_hub.errors import RepositoryNotFoundError

    while e is not None:
        if isinstance(e, datasets.exceptions.DatasetNotFoundError | RepositoryNotFoundError):
            return True
        e = e.__cause__ or e.__context__
    return False


def _open_local(root: Path, split: str, config: str | None):
    import datasets

    if (root / "dataset_dict.json").exists():
        dd = datasets.load_from_disk(str(root))
        if split not in dd:
            raise BenchmarkError(f"{root} has splits {list(dd)}, not {split!r}")
        return dd[split]
    if (root / "state.json").exists():
        return datasets.load_from_disk(str(root))
    files = sorted(
        f for f in root.rglob("*.parquet") if f.name.startswith(f"{split}-") or f.parent.name == split
    )
    if config:
        under = [f for f in files if config in f.relative_to(root).parts[:-1]]
        files = under or files
    if not files:
        raise BenchmarkError(
            f"no parquet files for split {split!r} under {root}; expected the hub layout "
            f"[<config>/]{split}-*.parquet, or a datasets save_to_disk folder"
        )
    return datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")


def _open_hub(dataset_id: str, split: str, config: str | None):
    """`datasets.load_dataset` for one split. First only that split's files (`<config>/<split>-*` or
    `data/<split>-*`: datasets otherwise downloads every split of a config, e.g. MMMU's 3.3 GB test set), then,
    if the repository has another layout, the whole config."""
    import datasets

    pattern = f"{config}/{split}-*" if config else f"data/{split}-*"
    try:
        try:
            return datasets.load_dataset(dataset_id, data_files={split: pattern}, split=split)
        except datasets.exceptions.DatasetNotFoundError:
            raise  # no such repository: another layout will not help
        except (datasets.exceptions.DataFilesNotFoundError, FileNotFoundError):
            return datasets.load_dataset(dataset_id, config, split=split)
    except Exception as e:  # noqa: BLE001 - every failure here gets the same advice
        raise BenchmarkError(
            f"could not load {dataset_id!r} (config {config!r}, split {split!r}) from the Hugging Face hub: "
            f"{type(e).__name__}: {e}. Offline or no access? On a machine with access run "
            f"datasets.load_dataset({dataset_id!r}, {config!r}, split={split!r}).save_to_disk(DIR), copy DIR "
            f"here and pass it as the dataset id (e.g. --set data.mmmu_id=DIR); a folder of the repository's "
            f"parquet files works too"
        ) from e


# ------------------------------------------------------------------------------------------- MMMU
def parse_options(raw: Any, where: str = "") -> list[str]:
    """MMMU's `options`: a string holding a Python list ("['a', 'b']"); already a list is accepted."""
    if raw is None or raw == "":
        return []
    if isinstance(raw, list):
        return [str(o) for o in raw]
    try:
        val = ast.literal_eval(raw)
    except (ValueError, SyntaxError) as e:
        raise BenchmarkError(f"{where}: options {raw[:80]!r} is not a Python list literal ({e})") from None
    if not isinstance(val, list | tuple):
        raise BenchmarkError(f"{where}: options {raw[:80]!r} is not a list")
    return [str(o) for o in val]


def mmmu_subject(mmmu_id: str) -> str:
    """`validation_Art_Theory_12` -> `Art_Theory`."""
    parts = mmmu_id.split("_")
    return "_".join(parts[1:-1]) if len(parts) >= 3 else ""


def _mmmu_refs(row: dict[str, Any]) -> list[int]:
    text = (row.get("question") or "") + " " + (row.get("options") or "")
    return [int(m.group(1)) for m in IMAGE_REF.finditer(text)]


def _mmmu_answers(answer: str) -> list[str]:
    a = answer.strip()
    if a.startswith("[") and a.endswith("]"):
        try:
            val = ast.literal_eval(a)
            if isinstance(val, list | tuple) and val:
                return [str(v) for v in val]
        except (ValueError, SyntaxError):
            pass
    return [a]


def normalize_mmmu(row: dict[str, Any]) -> dict[str, Any]:
    """One MMMU row -> a record. Images image_1..image_7 that are present are kept in order; the `<image N>`
    placeholders are renumbered if an earlier slot is empty."""
    rid = row["id"]
    slots = [(k, row.get(f"image_{k}")) for k in range(1, 8)]
    present = [(k, im) for k, im in slots if im is not None]
    renumber = {k: i + 1 for i, (k, _) in enumerate(present)}

    def fix(s: str) -> str:
        def sub(m):
            k = int(m.group(1))
            if k not in renumber:
                raise BenchmarkError(f"MMMU {rid}: the text refers to <image {k}>, which is empty")
            return f"<image {renumber[k]}>"

        return IMAGE_REF.sub(sub, s)

    qtype = row.get("question_type") or "multiple-choice"
    options = [fix(o) for o in parse_options(row.get("options"), f"MMMU {rid}")]
    answer = (row.get("answer") or "").strip()
    answers = [answer] if qtype == "multiple-choice" else _mmmu_answers(answer)
    images = [im for _, im in present]
    return _record(
        rid=f"mmmu-{rid}",
        source="mmmu",
        images=images,
        question=fix(row["question"]),
        options=options,
        answer=answers[0] if qtype == "open" else answer,
        answers=answers,
        question_type=qtype,
    )


def _mmmu_pool(cfg: Config) -> tuple[Any, list[int], dict[str, int]]:
    import datasets

    d = cfg.data
    subjects = list(d.mmmu_subjects) or list(MMMU_SUBJECTS)
    unknown = [s for s in subjects if s not in MMMU_SUBJECTS]
    if unknown:
        raise BenchmarkError(f"data.mmmu_subjects: unknown subjects {unknown}; valid: {list(MMMU_SUBJECTS)}")
    mmmu_id = resolve(cfg, d.mmmu_id)
    if is_local(mmmu_id):
        ds = open_split(mmmu_id, d.mmmu_split)
    else:
        ds = datasets.concatenate_datasets([open_split(mmmu_id, d.mmmu_split, s) for s in subjects])
    meta = ds.select_columns(["id", "question", "options", "answer", "question_type"]).to_dict()
    stats = {"rows": len(ds), "other_subject": 0, "hidden_answer": 0, "bad_options": 0, "too_many_images": 0}
    keep = []
    for i in range(len(ds)):
        row = {k: meta[k][i] for k in meta}
        if mmmu_subject(row["id"]) not in subjects:
            stats["other_subject"] += 1
            continue
        if (row["answer"] or "").strip() in ("", "?"):
            stats["hidden_answer"] += 1
            continue
        try:
            opts = parse_options(row["options"], row["id"])
        except BenchmarkError:
            stats["bad_options"] += 1
            continue
        if row["question_type"] == "multiple-choice" and not opts:
            stats["bad_options"] += 1
            continue
        if d.max_images and len(set(_mmmu_refs(row))) > d.max_images:
            stats["too_many_images"] += 1
            continue
        keep.append(i)
    if stats["hidden_answer"] and not keep:
        raise BenchmarkError(
            f"MMMU split {d.mmmu_split!r} of {d.mmmu_id} has no answers (hidden); use data.mmmu_split: validation"
        )
    return ds, keep, stats


# ------------------------------------------------------------------------------------------- DocVQA
def normalize_docvqa(row: dict[str, Any]) -> dict[str, Any]:
    answers = [str(a) for a in (row.get("answers") or [])]
    if not answers:
        raise BenchmarkError(f"DocVQA {row.get('questionId')}: no answers (test answers are hidden)")
    return _record(
        rid=f"docvqa-{row['questionId']}",
        source="docvqa",
        images=[row["image"]],
        question=row["question"],
        options=[],
        answer=answers[0],
        answers=answers,
        question_type="open",
    )


def _docvqa_pool(cfg: Config) -> tuple[Any, list[int], dict[str, int]]:
    d = cfg.data
    ds = open_split(resolve(cfg, d.docvqa_id), d.docvqa_split, DOCVQA_CONFIG)
    if "answers" not in ds.column_names:
        raise BenchmarkError(
            f"DocVQA split {d.docvqa_split!r} of {d.docvqa_id} has no `answers` column (test answers are "
            f"hidden); scoring needs answers: use data.docvqa_split: validation"
        )
    answers = ds["answers"]
    keep = [i for i, a in enumerate(answers) if a]
    stats = {"rows": len(ds), "no_answers": len(ds) - len(keep)}
    if not keep:
        raise BenchmarkError(
            f"DocVQA split {d.docvqa_split!r} of {d.docvqa_id} has no answers (test answers are hidden); "
            f"scoring and evaluation need them: use data.docvqa_split: validation"
        )
    return ds, keep, stats


# ------------------------------------------------------------------------------------------- POPE
_POPE_OBJECT = re.compile(r"is there an? (.+?) in the (?:image|picture|photo)", re.IGNORECASE)


def pope_object(question: str) -> str | None:
    """The queried object of a POPE question ("Is there a dining table in the image?" -> "dining table")."""
    m = _POPE_OBJECT.search(question)
    return m.group(1).strip().lower() if m else None


def normalize_pope(row: dict[str, Any]) -> dict[str, Any]:
    answer = row["answer"].strip().lower()
    return _record(
        rid=f"pope-{row['question_id']}",
        source="pope",
        images=[row["image"]],
        question=row["question"],
        options=[],
        answer=answer,
        answers=[answer],
        question_type="open",
        pope_split=row["category"],
    )


def _pope_pool(cfg: Config) -> tuple[Any, list[int], dict[str, int]]:
    d = cfg.data
    ds = open_split(resolve(cfg, d.pope_id), POPE_SPLIT)
    meta = ds.select_columns(["answer", "category"]).to_dict()
    stats = {"rows": len(ds), "other_category": 0, "not_yes_no": 0}
    keep = []
    for i, (a, c) in enumerate(zip(meta["answer"], meta["category"])):
        if c not in d.pope_categories:
            stats["other_category"] += 1
        elif (a or "").strip().lower() not in ("yes", "no"):
            stats["not_yes_no"] += 1
        else:
            keep.append(i)
    return ds, keep, stats


POOLS = {"mmmu": _mmmu_pool, "docvqa": _docvqa_pool, "pope": _pope_pool}
NORMALIZE = {"mmmu": normalize_mmmu, "docvqa": normalize_docvqa, "pope": normalize_pope}


# ------------------------------------------------------------------------------------------- records
def _record(
    rid: str,
    source: str,
    images: list,
    question: str,
    options: list[str],
    answer: str,
    answers: list[str],
    question_type: str,
    pope_split: str = "",
) -> dict[str, Any]:
    if not images:
        raise BenchmarkError(f"{rid}: no image")
    return {
        "id": rid,
        "family": SOURCE_FAMILY[source],
        "source": source,
        "image": images[0],
        "images": images,
        "question": question,
        "options": options,
        "answer": answer,
        "answers": answers,
        "question_type": question_type,
        "attr_type": SOURCE_ATTR[source],
        "pope_split": pope_split,
        "scene": None,
        "rationale": "",
        "anchors": [],
        "decisions": [],
        "template": 0,
    }


def record_features():
    """The saved schema: the embedded benchmark's columns (`data.build_split`) plus `images`."""
    import datasets

    s = datasets.Value("string")
    return datasets.Features(
        {
            "id": s,
            "family": s,
            "source": s,
            "image": datasets.Image(),
            "images": datasets.Sequence(datasets.Image()),
            "question": s,
            "options": datasets.Sequence(s),
            "answer": s,
            "answers": datasets.Sequence(s),
            "question_type": s,
            "attr_type": s,
            "pope_split": s,
            "scene": s,
            "rationale": s,
            "anchors": s,
            "decisions": s,
            "template": datasets.Value("int32"),
        }
    )


def split_counts(n: int, k: int) -> list[int]:
    """How many of n rotating examples each of k sources gets (example i comes from source i % k)."""
    return [len(range(j, n, k)) for j in range(k)]


def real_cache_dir(cfg: Config) -> Path:
    d = cfg.data
    key = {
        "schema": SCHEMA_VERSION,
        "seed": d.seed,
        "n": [d.n_train, d.n_val, d.n_test],
        "max_images": d.max_images,
        "source": list(d.source),
    }
    if "mmmu" in d.source:
        key["mmmu"] = [_id_key(d.mmmu_id), d.mmmu_split, sorted(d.mmmu_subjects)]
    if "docvqa" in d.source:
        key["docvqa"] = [_id_key(d.docvqa_id), d.docvqa_split]
    if "pope" in d.source:
        key["pope"] = [_id_key(d.pope_id), sorted(d.pope_categories)]
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return cfg.path(cfg.runtime.cache_dir) / f"real-{h}"


def _id_key(dataset_id: str) -> str:
    if is_standin(dataset_id):
        return f"{dataset_id}-v{STANDIN_VERSION}"
    p = Path(dataset_id).expanduser()
    return str(p.resolve()) if p.exists() or p.is_absolute() else dataset_id


def build_real_benchmark(cfg: Config, progress: bool = False):
    """The train / val / test DatasetDict of the configured real sources (built once, then read from the cache):
    (DatasetDict, path). `card.json` in the folder has every filter's counts."""
    import datasets

    d = cfg.data
    if d.source == ["embedded"]:
        raise BenchmarkError("data.source is [embedded]: use vskip_core.data.embedded.build_benchmark")
    path = real_cache_dir(cfg)
    if (path / "dataset_dict.json").exists():
        return datasets.load_from_disk(str(path)), path
    sizes = {"train": d.n_train, "val": d.n_val, "test": d.n_test}
    if not any(sizes.values()):
        raise BenchmarkError("data.n_train, n_val and n_test are all 0: nothing to load")
    k = len(d.source)
    per_source: dict[str, dict[str, list[dict]]] = {}
    card: dict[str, Any] = {"sources": {}, "sizes": sizes, "seed": d.seed}
    for j, src in enumerate(d.source):
        ds, keep, stats = POOLS[src](cfg)
        need = {s: split_counts(n, k)[j] for s, n in sizes.items()}
        if sum(need.values()) > len(keep):
            raise BenchmarkError(
                f"{src}: {sum(need.values())} examples requested (train {need['train']}, val {need['val']}, "
                f"test {need['test']}) but only {len(keep)} usable rows ({stats}); lower data.n_train / n_val / "
                f"n_test"
            )
        order = list(keep)
        random.Random(f"vskip:{d.seed}:{src}").shuffle(order)
        chosen, start = {}, 0
        for s in ("train", "val", "test"):
            chosen[s] = order[start : start + need[s]]
            start += need[s]
        sub = ds.select([i for s in ("train", "val", "test") for i in chosen[s]])
        recs = [NORMALIZE[src](row) for row in tqdm(sub, desc=f"normalize {src}", disable=not progress)]
        it = iter(recs)
        per_source[src] = {s: [next(it) for _ in chosen[s]] for s in ("train", "val", "test")}
        card["sources"][src] = {"filters": stats, "usable": len(keep), "kept": need}
    splits = {}
    features = record_features()
    for s in ("train", "val", "test"):
        if sizes[s] == 0:  # datasets cannot reload an empty saved split; an absent split reads as empty
            continue
        rows = [per_source[d.source[i % k]][s][i // k] for i in range(sizes[s])]
        cols = {name: [_encode_value(name, r[name]) for r in rows] for name in features}
        splits[s] = datasets.Dataset.from_dict(cols, features=features)
    dd = datasets.DatasetDict(splits)

    def build(tmp: Path) -> None:
        dd.save_to_disk(str(tmp))
        (tmp / "card.json").write_text(json.dumps(card, indent=2))

    build_dir_once(path, build, "card.json")
    return datasets.load_from_disk(str(path)), path


def load_benchmark(cfg: Config, progress: bool = True):
    """(DatasetDict, path) of the configured benchmark: the embedded one or the real sources (built and cached
    on first use). Splits of size 0 are absent."""
    if cfg.data.source == ["embedded"]:
        return build_benchmark(cfg)
    return build_real_benchmark(cfg, progress=progress)


def image_table(loaded, records: list[dict[str, Any]]):
    """One row per record: source, images, first image's width x height, and the visual tokens the model
    sees for all its images under the configured pixel cap (Qwen: merged patches; Llama-3.2-Vision: tiles x
    patches of the cross-attention states)."""
    import pandas as pd

    ad, rows = loaded.adapter, []
    for r in records:
        enc = ad.encode(r, loaded.tokenizer, loaded.processor)
        if "image_positions" in enc:
            n_visual = len(enc["image_positions"])
        else:
            vc = loaded.model.config.vision_config
            n_visual = int(enc["aspect_ratio_mask"].sum()) * ((vc.image_size // vc.patch_size) ** 2 + 1)
        w, h = r["images"][0].size if r.get("images") else r["image"].size
        rows.append(
            {
                "source": r.get("source", "embedded"),
                "images": len(r.get("images") or [r["image"]]),
                "width": w,
                "height": h,
                "visual_tokens": n_visual,
            }
        )
    return pd.DataFrame(rows)


def _encode_value(name: str, v: Any) -> Any:
    if name in ("scene", "anchors", "decisions"):
        return json.dumps(v)
    return v


def benchmark_card(cfg: Config) -> dict[str, Any]:
    """Rows kept by every filter, per source, and the split sizes (builds the cache if needed)."""
    _, path = build_real_benchmark(cfg)
    return json.loads((path / "card.json").read_text())


def examples(cfg: Config, split: str, n: int | None = None) -> list[dict[str, Any]]:
    """The first `n` (default: all) records of a split, for the embedded benchmark or the real sources alike."""

    sizes = {"train": cfg.data.n_train, "val": cfg.data.n_val, "test": cfg.data.n_test}
    if split not in sizes:
        raise BenchmarkError(f"unknown split {split!r}; valid: {list(sizes)}")
    n = sizes[split] if n is None else min(n, sizes[split])
    if cfg.data.source == ["embedded"]:
        return [make_example(cfg, split, i) for i in range(n)]
    if n == 0:
        return []
    dd, _ = build_real_benchmark(cfg)
    return [decode_record(r) for r in dd[split].select(range(n))]


def example_at(cfg: Config, split: str, index: int) -> dict[str, Any]:
    """Record `index` of a split (what `rationales.jsonl` stores as `split` / `index`)."""

    if cfg.data.source == ["embedded"]:
        return make_example(cfg, split, index)
    dd, _ = build_real_benchmark(cfg)
    return decode_record(dd[split][index])


# ------------------------------------------------------------------------------------------- anchors
COLOUR_WORDS = (
    "red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black", "white", "gray", "grey",
    "violet", "cyan", "magenta", "beige", "gold", "golden", "silver", "turquoise", "navy", "maroon",
)  # fmt: skip
SHAPE_WORDS = (
    "circle", "circles", "square", "squares", "triangle", "triangles", "rectangle", "rectangles", "diamond",
    "diamonds", "oval", "ovals", "star", "stars", "hexagon", "pentagon", "cube", "cubes", "sphere", "spheres",
    "cylinder", "cylinders", "cone", "cones", "arrow", "arrows", "circular", "square-shaped", "triangular",
    "rectangular", "round", "curved",
)  # fmt: skip
SIZE_WORDS = ("small", "large", "big", "tiny", "huge", "tall", "short", "long", "wide", "narrow", "thick", "thin")  # fmt: skip
POSITION_WORDS = (
    "top left", "top right", "bottom left", "bottom right", "upper left", "upper right", "lower left",
    "lower right", "left", "right", "top", "bottom", "upper", "lower", "middle", "center", "centre", "above",
    "below", "behind", "in front of", "next to", "beside",
)  # fmt: skip
COCO_OBJECTS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
_NUMBER_RE = re.compile(r"\$\s?\d[\d,]*(?:\.\d+)?|\d[\d,]*(?:\.\d+)?\s?%|\b\d[\d,.:/-]*\d\b")

ANCHOR_NOTE = (
    "Visual anchors on real data are found by lexicon, not read from a scene: colour, shape, size and position "
    "words, COCO object names, gold-answer strings and numbers. `in_scene` is known only for gold-answer spans "
    "(True) and POPE's queried object (True when the answer is yes, False when no); elsewhere it is None. VARR "
    "here measures whether such mentions survive compression, not whether they are true; the lexicons are "
    "English and closed, and a colour word counts even when it is not about the image."
)


def find_real_anchors(text: str, ex: dict[str, Any]) -> list[dict[str, Any]]:
    """Visual-attribute mentions in `text` for a real-benchmark example: spans with type (colour, shape, size,
    position, object, text), value, start, end, `in_question`, and `in_scene` (True / False / None, see the
    module docstring). Longest matches first; spans never overlap."""
    question = (ex.get("question") or "").lower()
    answers = [a for a in (ex.get("answers") or []) if ex.get("source") == "docvqa" and len(a.strip()) > 1]
    queried = pope_object(ex.get("question") or "") if ex.get("source") == "pope" else None
    found: list[dict[str, Any]] = []
    taken = [False] * len(text)

    def add(kind: str, value: str, start: int, end: int, in_scene) -> None:
        if any(taken[start:end]):
            return
        taken[start:end] = [True] * (end - start)
        found.append(
            {
                "type": kind,
                "value": value,
                "start": start,
                "end": end,
                "in_question": value.lower() in question,
                "in_scene": in_scene,
            }
        )

    for a in sorted(answers, key=len, reverse=True):  # text read off the image (DocVQA answers)
        for m in re.finditer(re.escape(a.strip()), text, re.IGNORECASE):
            add("text", m.group(0), m.start(), m.end(), True)
    kinds: dict[str, str] = {}
    for kind, words in (
        ("colour", COLOUR_WORDS),  # first: "orange" is a colour unless POPE asks about the fruit
        ("shape", SHAPE_WORDS),
        ("size", SIZE_WORDS),
        ("position", POSITION_WORDS),
        ("object", COCO_OBJECTS),
    ):
        for w in words:
            kinds.setdefault(w, kind)
    if queried:
        kinds[queried] = "object"
    for value in sorted(kinds, key=lambda v: (-len(v), v)):
        kind = kinds[value]
        plural = r"(?:s|es)?" if kind == "object" else ""
        for m in re.finditer(rf"(?<![A-Za-z]){re.escape(value)}{plural}(?![A-Za-z])", text, re.IGNORECASE):
            in_scene = (ex.get("answer") == "yes") if value == queried else None
            add(kind, value, m.start(), m.end(), in_scene)
    for m in _NUMBER_RE.finditer(text):
        add("text", m.group(0), m.start(), m.end(), None)
    return sorted(found, key=lambda a: a["start"])


def find_anchors_for(text: str, ex: dict[str, Any]) -> list[dict[str, Any]]:
    """Anchors of any text for any record: the embedded scene's (`data.find_anchors`) or the lexicon above."""

    if ex.get("source", "embedded") == "embedded":
        return find_anchors(text, ex.get("scene"))
    return find_real_anchors(text, ex)
