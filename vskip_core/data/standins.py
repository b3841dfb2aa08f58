"""Stand-ins for the model hub: tiny checkpoints of the real model classes (random weights fitted to write one fixed
rationale, `vskip_core.modeling.standins`) and small local copies of the hub benchmarks in their exact schemas, so
the real-model path (params/colab_*.yaml, qwen*_7b.yaml, llama32_*.yaml) runs end to end on a CPU with no hub
access.

A params file names a stand-in where it would name a hub id, and it builds itself on first use (cached under
`<runtime.cache_dir>/standins/`), as the embedded teacher does:

    model.teacher: standin:qwen2_vl      # also standin:qwen2_5_vl, standin:mllama, standin:<a registered family>
    gate.llmlingua2_model: standin:llmlingua2   # a tiny XLM-RoBERTa token classifier in LLMLingua-2's format
    data.mmmu_id: standin:mmmu           # also standin:docvqa, standin:pope

Checkpoints are saved like hub ones: `save_pretrained` model, tokenizer with the family's chat template and
special tokens, image-processor config, and a `generation_config.json` carrying the published checkpoints'
sampling fields (Qwen-VL: repetition_penalty 1.05, top_k 1, top_p 0.001; Llama-3.2-Vision: temperature 0.6,
top_p 0.9), so code that lets a checkpoint's generation config leak into greedy decoding is caught on CPU.

Datasets are written by `datasets.Dataset.to_parquet` (image bytes and features embedded, as on the hub):
- MMMU/MMMU: one config per subject, `<Subject>/<split>-00000-of-00001.parquet`; columns id, question, options
  (a *string* holding a Python list), explanation, image_1 .. image_7 (Image, mostly None), img_type, answer,
  topic_difficulty, question_type, subfield. The test split's answers are hidden ("?"). Rows include
  out-of-order, repeated and unreferenced `<image N>` references.
- DocVQA: config DocVQA, `DocVQA/<split>-00000-of-00001.parquet`; questionId (string), question, question_types
  (list of string), image, docId (int64), ucsf_document_id, ucsf_document_page_no, answers (list of string;
  None on the test split), data_split.
- POPE: default config, `data/test-00000-of-00001.parquet`; id, question_id, question, answer (yes/no),
  image_source, image, category (adversarial / popular / random), each category with its own positives.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

import vskip_core.registry as registry
from vskip_core.runtime import build_dir_once

PREFIX = "standin:"


VERSION = 2  # bump when a stand-in's content changes: its cache folder (and every cache keyed on it) changes


MODELS = ("qwen2_vl", "qwen2_5_vl", "mllama")  # the built-in families (test_standins builds each)


SCORERS = ("llmlingua2",)  # text-only external scorers (gate.llmlingua2_model)


DATASETS = ("mmmu", "docvqa", "pope")


COLOURS = [(220, 40, 40), (40, 170, 60), (40, 80, 220), (235, 200, 30), (150, 60, 190)]


def picture(i: int, size: tuple[int, int] = (96, 72)) -> Image.Image:
    """A small distinct image: background shade and a coloured box that depend on i."""
    img = Image.new("RGB", size, (230 - 7 * (i % 10), 230, 225))
    d = ImageDraw.Draw(img)
    c = COLOURS[i % len(COLOURS)]
    x = 8 + (i * 13) % (size[0] - 40)
    d.rectangle([x, 12, x + 30, 12 + 24 + i % 20], fill=c)
    return img


def _mmmu_features():
    import datasets

    s = datasets.Value("string")
    cols = {"id": s, "question": s, "options": s, "explanation": s}
    cols.update({f"image_{k}": datasets.Image() for k in range(1, 8)})
    cols.update({"img_type": s, "answer": s, "topic_difficulty": s, "question_type": s, "subfield": s})
    return datasets.Features(cols)


def mmmu_rows(subject: str, split: str, n: int, start: int = 0) -> list[dict]:
    rows = []
    for j in range(n):
        i = start + j
        row = {
            "id": f"{split}_{subject}_{j + 1}",
            "explanation": "",
            "img_type": "['Diagrams']",
            "topic_difficulty": "Medium",
            "subfield": f"{subject} basics",
        }
        row.update({f"image_{k}": None for k in range(1, 8)})
        row["image_1"] = picture(i)
        kind = j % 4
        if kind == 0:  # single image, multiple choice
            row["question"] = f"<image 1> What colour is the box in this {subject} figure?"
            row["options"] = "['red', 'green', 'blue', 'yellow']"
            row["answer"], row["question_type"] = "ABCD"[i % 4], "multiple-choice"
        elif kind == 1:  # two images interleaved in the question
            row["image_2"] = picture(i + 50, (64, 64))
            row["question"] = "Compare <image 1> and <image 2>. Which box is taller?"
            row["options"] = "['the first', 'the second', \"they're equal\"]"
            row["answer"], row["question_type"] = "B", "multiple-choice"
        elif kind == 2:  # images as options
            row["image_2"] = picture(i + 60, (48, 48))
            row["image_3"] = picture(i + 70, (48, 48))
            row["question"] = "Which option shows the same colour as <image 1>?"
            row["options"] = "['<image 2>', '<image 3>']"
            row["answer"], row["question_type"] = "A", "multiple-choice"
        else:  # open question with several acceptable answers
            row["question"] = "<image 1> How many boxes are drawn?"
            row["options"] = "[]"
            row["answer"], row["question_type"] = "['1', 'one']", "open"
        if split == "test":
            row["answer"] = "?"
        rows.append(row)
    return rows


def mmmu_quirk_rows(subject: str, split: str, start: int = 0) -> list[dict]:
    """Three rows whose `<image N>` references are out of order, repeated, or leave an image unreferenced."""
    rows = mmmu_rows(subject, split, 3, start=start + 40)
    for j, row in enumerate(rows):
        row["id"] = f"{split}_{subject}_q{j + 1}"
        row["image_2"] = picture(start + 80 + j, (64, 48))
        row["options"] = "['the first', 'the second']"
        row["answer"], row["question_type"] = ("?" if split == "test" else "A"), "multiple-choice"
    rows[0]["question"] = "Look at <image 2>, then at <image 1>. Which box is wider?"
    rows[1]["question"] = "<image 1> shows a box. Is the box in <image 1> taller than the one in <image 2>?"
    rows[2]["question"] = "<image 1> What colour is the box?"  # image_2 is present but never referenced
    return rows


def write_mmmu(
    root: Path, subjects=("Art", "Math", "Physics"), per_subject: int = 8, quirks: bool = False
) -> Path:
    """MMMU in its hub layout; `quirks` adds `mmmu_quirk_rows` to every subject's dev / validation / test."""
    import datasets

    root = Path(root)
    for si, subject in enumerate(subjects):
        for split, n in (("dev", 2), ("validation", per_subject), ("test", 3)):
            d = root / subject
            d.mkdir(parents=True, exist_ok=True)
            feats = _mmmu_features()
            raw = mmmu_rows(subject, split, n, start=100 * si)
            raw += mmmu_quirk_rows(subject, split, start=100 * si) if quirks else []
            rows = [{k: r[k] for k in feats} for r in raw]
            ds = datasets.Dataset.from_list(rows, features=feats)
            ds.to_parquet(str(d / f"{split}-00000-of-00001.parquet"))
    return root


def _docvqa_features():
    import datasets

    s = datasets.Value("string")
    return datasets.Features(
        {
            "questionId": s,
            "question": s,
            "question_types": datasets.Sequence(s),
            "image": datasets.Image(),
            "docId": datasets.Value("int64"),
            "ucsf_document_id": s,
            "ucsf_document_page_no": s,
            "answers": datasets.Sequence(s),
            "data_split": s,
        }
    )


def docvqa_rows(split: str, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        total = f"${10 + i}.{i:02d}"
        rows.append(
            {
                "questionId": str(49000 + i + (1000 if split == "test" else 0)),
                "question": "What is the total amount on the invoice?",
                "question_types": ["layout"],
                "image": picture(i, (120, 160)),
                "docId": 1000 + i,
                "ucsf_document_id": f"xyz{i:04d}",
                "ucsf_document_page_no": "1",
                "answers": None if split == "test" else [total, total.lstrip("$")],
                "data_split": split,
            }
        )
    return rows


def write_docvqa(root: Path, n_validation: int = 12, n_test: int = 4) -> Path:
    import datasets

    root = Path(root)
    d = root / "DocVQA"
    d.mkdir(parents=True, exist_ok=True)
    for split, n in (("validation", n_validation), ("test", n_test)):
        ds = datasets.Dataset.from_list(docvqa_rows(split, n), features=_docvqa_features())
        ds.to_parquet(str(d / f"{split}-00000-of-00001.parquet"))
    return root


POPE_OBJECTS = ("dog", "dining table", "orange", "car", "person", "cup")


def _pope_features():
    import datasets

    s = datasets.Value("string")
    return datasets.Features(
        {
            "id": s,
            "question_id": s,
            "question": s,
            "answer": s,
            "image_source": s,
            "image": datasets.Image(),
            "category": s,
        }
    )


def pope_rows(per_category: int) -> list[dict]:
    rows = []
    for c, category in enumerate(("adversarial", "popular", "random")):
        for j in range(per_category):
            i = c * per_category + j
            obj = POPE_OBJECTS[i % len(POPE_OBJECTS)]
            rows.append(
                {
                    "id": str(i),
                    "question_id": str(i + 1),
                    "question": f"Is there a {obj} in the image?",
                    "answer": "yes" if j % 2 == 0 else "no",
                    "image_source": f"COCO_val2014_{i:012d}",
                    "image": picture(i),
                    "category": category,
                }
            )
    return rows


def write_pope(root: Path, per_category: int = 6) -> Path:
    import datasets

    root = Path(root)
    d = root / "data"
    d.mkdir(parents=True, exist_ok=True)
    ds = datasets.Dataset.from_list(pope_rows(per_category), features=_pope_features())
    ds.to_parquet(str(d / "test-00000-of-00001.parquet"))
    return root


def write_all(root: Path) -> dict[str, Path]:
    root = Path(root)
    return {
        "mmmu": write_mmmu(root / "MMMU"),
        "docvqa": write_docvqa(root / "DocVQA"),
        "pope": write_pope(root / "POPE"),
    }


def is_standin(name: str | None) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def resolve_dataset(cfg, name: str) -> str:
    """The folder of dataset stand-in `name` (written on first use), or `name` unchanged if it is not one."""
    if not is_standin(name):
        return name
    writers = {
        "mmmu": lambda p: write_mmmu(p, per_subject=10, quirks=True),
        "docvqa": write_docvqa,
        "pope": write_pope,
    }
    key = name[len(PREFIX) :]
    if key not in writers:
        raise ValueError(
            f"{name!r} is not a dataset stand-in; valid: {', '.join(PREFIX + k for k in DATASETS)}"
        )
    return str(build_once(standin_dir(cfg.path(cfg.runtime.cache_dir), name), name, writers[key]))


def build_once(path: Path, name: str, build) -> Path:
    """Run `build(tmp)` once and move the result to `path` (`runtime.build_dir_once`: safe when stages race)."""

    def fill(tmp: Path) -> None:
        build(tmp)
        (tmp / ".complete").write_text(json.dumps({"standin": name, "version": VERSION}))

    return build_dir_once(path, fill, ".complete")


def model_names() -> tuple[str, ...]:
    """Families with a model stand-in: the built-ins and every family registered (`registry.FAMILIES`), each
    built from its adapter's tiny_* builders."""
    return tuple(dict.fromkeys((*MODELS, *registry.FAMILIES)))


def standin_dir(cache_dir: str | Path, name: str) -> Path:
    key = name[len(PREFIX) :]
    valid = model_names() + SCORERS + DATASETS
    if key not in valid:
        raise ValueError(f"unknown stand-in {name!r}; valid: {', '.join(PREFIX + k for k in valid)}")
    return Path(cache_dir) / "standins" / f"{key}-v{VERSION}"
