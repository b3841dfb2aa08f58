"""The public API: V-Skip compression of your own rationales and visual-token pruning on your own model.

These are the functions the pipeline's stages run (stage 02's scoring, the gate of `vskip_core.method.gating`,
stage 07's pruned decoder), behind a few calls; docs/API.md has a runnable example of each.

    from vskip_core import Compressor, load_vlm, generate_pruned
    c = Compressor.from_pretrained("embedded")            # or a hub id / local folder, or Compressor.from_run(...)
    out = c.compress(image, "What colour is the square?", rationale, gamma=0.5)
    out.text, out.keep, out.scores.anchoring
    ds2 = c.compress_dataset(ds, gamma=0.5)               # a datasets.Dataset in, one out
    vlm = load_vlm("Qwen/Qwen2-VL-2B-Instruct")
    generate_pruned(vlm, image, "What is written on the sign?", method="zspaprune", retention=0.333, dstp=True)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vskip_core.common.external import external_columns, with_external_columns
from vskip_core.config import DEFAULT_PARAMS, Config, load_params
from vskip_core.method.gating import GateError, column_fix, keep_mask, method_columns
from vskip_core.method.pruning import PruneSpec, check_retention, unsupported_reason
from vskip_core.metrics import compress_text
from vskip_core.modeling.decoding import generate
from vskip_core.modeling.loading import Loaded, load_model
from vskip_core.modeling.prompts import user_text
from vskip_core.registry import GATES, PRUNERS
from vskip_core.stages.distillation import make_target, split_answer
from vskip_core.stages.pruning import generate_pruned as _generate_pruned
from vskip_core.stages.scoring import score_rationales
from vskip_core.teacher import build_teacher

__all__ = [
    "Compressed",
    "Compressor",
    "InputError",
    "Scores",
    "generate_pruned",
    "load_vlm",
]

if TYPE_CHECKING:
    from datasets import Dataset

_BLANK_COLUMNS = ("anchoring_delta", "surprisal_gain")  # need stage 02's blank-image pass


class InputError(ValueError):
    """Bad input to the API or the `vskip` command: the message names the problem and the fix."""


# --------------------------------------------------------------------------------------------- models
def _config(params: str | os.PathLike | Config | None) -> Config:
    """A params file (default params/default.yaml) as a Config; a Config is used as it is."""
    return params if isinstance(params, Config) else load_params(params or DEFAULT_PARAMS)


def load_vlm(
    model: str = "embedded",
    params: str | os.PathLike | Config | None = None,
    device: str | None = None,
) -> Loaded:
    """A vision-language model with its tokenizer and image processor (`Loaded`): `embedded` (the in-repo
    Qwen2-VL teacher, installed from assets/ or built on first use), a local folder or a hub id of a supported
    family (Qwen2-VL, Qwen2.5-VL, Llama-3.2-Vision). Attention is eager so attention maps exist. `params`
    (a params file, default params/default.yaml, or a Config) sets the rest (`model.*`, `runtime.device`)."""
    cfg = _config(params)
    if model == "embedded":
        build_teacher(cfg)
    try:
        return load_model(cfg, model, device=device)
    except ValueError as e:  # an unsupported family, a family that does not serve the checkpoint, bad params
        raise InputError(f"{model}: {e}") from None


# ------------------------------------------------------------------------------------------- results
@dataclass
class Scores:
    """The two scores of every rationale token (stage 02's row): `surprisal` (nats, image in context) and
    `anchoring` (attention mass on the image at the key layers, heads reduced), with the token texts."""

    id: str
    text: str
    tokens: list[str]
    token_ids: list[int]
    surprisal: np.ndarray
    anchoring: np.ndarray
    answer_start: int  # first token of the final answer line (= len(tokens) without one)
    key_layers: list[int]
    row: dict[str, Any] = field(repr=False)  # the whole row, as stage 02 writes it to scores.parquet


@dataclass
class Compressed:
    """A rationale compressed by a gate method at gamma: the kept text, the token mask, the scores."""

    text: str
    keep: np.ndarray  # bool per token of `scores.tokens`
    method: str
    gamma: float
    scores: Scores

    @property
    def kept_ratio(self) -> float:
        """Kept body tokens over body tokens (the tokens before the answer line), as the gate budgets them."""
        n = self.scores.answer_start or len(self.keep)
        return float(self.keep[:n].sum() / n) if n else 0.0


def _scores(row: dict[str, Any]) -> Scores:
    text = row["text"]
    return Scores(
        id=str(row["id"]),
        text=text,
        tokens=[text[s:e] for s, e in row["offsets"]],
        token_ids=list(row["token_ids"]),
        surprisal=np.asarray(row["surprisal"], dtype=float),
        anchoring=np.asarray(row["anchoring"], dtype=float),
        answer_start=int(row["answer_start"]),
        key_layers=list(row["key_layers"]),
        row=row,
    )


def _check_gamma(gamma: Any) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, int | float) or not 0 < gamma <= 1:
        raise InputError(
            f"gamma {gamma!r}: must be a number in (0, 1] (the fraction of tokens kept), e.g. 0.5"
        )
    return float(gamma)


def _check_method(method: str) -> str:
    if method not in GATES:
        raise InputError(GATES.unknown(method))
    return method


# ---------------------------------------------------------------------------------------- compressor
class Compressor:
    """Scores rationales with a frozen teacher (surprisal and visual anchoring) and compresses them with any
    registered gate method at a retention ratio gamma: stage 02 and the gate of stage 03, callable.

    The key layers are fixed when the compressor is made: `key_layers` if given, else those a run's stage 02
    chose (`from_run`), else `scoring.key_layers`, else the `scoring.layer_band` rule."""

    def __init__(self, loaded: Loaded, cfg: Config, key_layers: list[int], head_reduce: str = "max"):
        sc = dataclasses.replace(cfg.scoring, key_layers=list(key_layers), head_reduce=head_reduce)
        self.loaded, self.cfg = loaded, dataclasses.replace(cfg, scoring=sc)
        self.key_layers, self.head_reduce = list(key_layers), head_reduce

    @classmethod
    def from_pretrained(
        cls,
        model: str = "embedded",
        params: str | os.PathLike | Config | None = None,
        key_layers: Sequence[int] | None = None,
        head_reduce: str | None = None,
        device: str | None = None,
    ) -> Compressor:
        """A compressor on `model` (see `load_vlm`) with the gate and scoring settings of `params`."""
        from vskip_core.method.scoring import resolve_key_layers

        cfg = _config(params)
        loaded = load_vlm(model, cfg, device=device)
        layers = list(key_layers) if key_layers is not None else resolve_key_layers(loaded.model, cfg.scoring)
        head = head_reduce or ("max" if cfg.scoring.head_reduce == "auto" else cfg.scoring.head_reduce)
        return cls(loaded, cfg, layers, head)

    @classmethod
    def from_run(cls, run: str | os.PathLike, device: str | None = None) -> Compressor:
        """The compressor a pipeline run used: its params (stage 02's params.json), its teacher and the key
        layers and head reduction its stage 02 chose. `run`: a run folder or a run name under results/."""
        import json

        from vskip_core.config import REPO_ROOT

        run_dir = Path(run) if Path(run).is_dir() else REPO_ROOT / "results" / str(run)
        stage = run_dir / "02_dual_scoring"
        if not (stage / "metrics.json").exists():
            raise InputError(f"{stage} has no metrics.json: run stage 02 first (vskip run --stages 02)")
        choice = json.loads((stage / "metrics.json").read_text())
        cfg = load_params(stage / "params.json")
        loaded = load_vlm(cfg.model.teacher, cfg, device=device)
        return cls(loaded, cfg, choice["key_layers"], choice["head_reduce"])

    # ------------------------------------------------------------------------------------------ scoring
    def score_records(
        self,
        records: list[dict[str, Any]],
        examples: list[dict[str, Any]],
        methods: Sequence[str] = ("vskip",),
        out_dir: str | os.PathLike | None = None,
        progress: bool = True,
    ) -> list[dict[str, Any]]:
        """Stage 02 on aligned `records` ({id, rationale}) and `examples` ({id, image or images, question,
        options}): one scores row per scorable record, with the columns `methods` read. With `out_dir`,
        scored shards are written as they are done and a rerun resumes from them."""
        need = {c for m in methods for c in method_columns(_check_method(m))}
        sc = dataclasses.replace(self.cfg.scoring, blank_image=bool(need & set(_BLANK_COLUMNS)))
        cfg = dataclasses.replace(self.cfg, scoring=sc)
        df = score_rationales(
            self.loaded, cfg, records, examples, progress, out_dir=out_dir, require_answer_line=False
        )
        rows = df.to_dict("records") if len(df) else []
        ext = external_columns(methods)
        if ext and rows:
            ctx = {str(e["id"]): user_text(e) for e in examples}
            rows = [{**r, "context": ctx[str(r["id"])]} for r in rows]
            cache = Path(out_dir) / "external" if out_dir is not None else None
            rows, _ = with_external_columns(cfg, rows, ext, cache_dir=cache)
        return rows

    def score(
        self, image: Any, question: str, rationale: str, options: Sequence[str] | None = None, id: str = "0"
    ) -> Scores:
        """The two scores of one rationale's tokens (`image`: a PIL image, or a list of them)."""
        ex = _example(id, image, question, options)
        rows = self.score_records([{"id": id, "rationale": rationale}], [ex], progress=False)
        if not rows:
            raise InputError(f"{id}: nothing to score (empty rationale or no image)")
        return _scores(rows[0])

    # ------------------------------------------------------------------------------------------ gating
    def gate(self, row: dict[str, Any], gamma: float = 0.5, method: str = "vskip") -> Compressed:
        """Compress one scored row (of `score_records`, or of a run's scores.parquet) as stage 03 does."""
        gamma, method = _check_gamma(gamma), _check_method(method)
        cfg = self.cfg
        if int(row["answer_start"]) >= len(row["token_ids"]):  # no answer line: gamma of the whole rationale
            cfg = dataclasses.replace(cfg, gate=dataclasses.replace(cfg.gate, force_keep_answer=False))
        for col in method_columns(method):
            if row.get(col) is None:
                raise InputError(
                    f"{method} reads the score column {col!r}, which this row lacks: {column_fix(col)}"
                )
        keep = keep_mask(row, method, gamma, cfg, seed=cfg.runtime.seed)
        return Compressed(compress_text(row, keep), np.asarray(keep, dtype=bool), method, gamma, _scores(row))

    def compress(
        self,
        image: Any,
        question: str,
        rationale: str,
        gamma: float = 0.5,
        method: str = "vskip",
        options: Sequence[str] | None = None,
    ) -> Compressed:
        """One rationale scored and compressed: `gamma` of its body tokens kept by `method`."""
        gamma, method = _check_gamma(gamma), _check_method(method)
        ex = _example("0", image, question, options)
        rows = self.score_records([{"id": "0", "rationale": rationale}], [ex], [method], progress=False)
        if not rows:
            raise InputError("nothing to compress: the rationale is empty or the image is missing")
        return self.gate(rows[0], gamma, method)

    def generate_rationales(self, examples: list[dict[str, Any]], progress: bool = True) -> list[str]:
        """The teacher's rationales for `examples`, decoded as stage 01 does (greedy, `generation.*`)."""
        g, m = self.cfg.generation, self.loaded
        gens = generate(
            m.model, m.tokenizer, m.processor, examples, g.max_new_tokens, g.batch_size, g.instruction,
            progress=progress, desc="rationales", repetition_penalty=g.repetition_penalty,
        )  # fmt: skip
        return [x["text"] for x in gens]

    def compress_dataset(
        self,
        dataset: Dataset,
        gamma: float = 0.5,
        method: str = "vskip",
        image_column: str = "image",
        question_column: str = "question",
        rationale_column: str = "rationale",
        options_column: str | None = None,
        id_column: str | None = None,
        out_dir: str | os.PathLike | None = None,
        progress: bool = True,
    ) -> Dataset:
        """A `datasets.Dataset` with its rows' rationales compressed: every input column kept, plus
        `compressed_rationale`, `keep_mask`, `kept_ratio`, `surprisal`, `anchoring`, `gate_error` (why a row
        could not be gated at this gamma, else empty) and the distillation columns (`target`, the ratio
        prompt's `prefix` / `instruction` / `assistant_prefill`, `ratio`, `method`). Without
        `rationale_column` in the dataset the teacher writes the rationales first. Batched as stage 02 is
        (`scoring.batch_size`); with `out_dir` a killed call resumes from its scored shards."""
        from datasets import Dataset

        from vskip_core.common.students import ratio_prompt

        gamma, method = _check_gamma(gamma), _check_method(method)
        if not isinstance(dataset, Dataset):
            raise InputError(f"expected a datasets.Dataset, got {type(dataset).__name__}")
        cols = dataset.column_names
        for name, col in (("image_column", image_column), ("question_column", question_column)):
            if col not in cols:
                raise InputError(
                    f"the dataset has no column {col!r} (columns: {cols}); pass {name}=<its name>"
                )
        for name, col in (("options_column", options_column), ("id_column", id_column)):
            if col is not None and col not in cols:
                raise InputError(
                    f"the dataset has no column {col!r} (columns: {cols}); pass {name}=<its name>"
                )
        ids = [str(i) for i in (dataset[id_column] if id_column else range(len(dataset)))]
        if len(set(ids)) != len(ids):
            raise InputError(f"column {id_column!r} has duplicate ids; pass a unique id_column or none")
        examples = [
            _example(i, r[image_column], r[question_column], r[options_column] if options_column else None)
            for i, r in zip(ids, dataset)
        ]
        if rationale_column in cols:
            rationales = list(dataset[rationale_column])
        else:
            rationales = self.generate_rationales(examples, progress)
            dataset = dataset.add_column(rationale_column, rationales)
        records = [{"id": i, "rationale": t or ""} for i, t in zip(ids, rationales)]
        rows = {r["id"]: r for r in self.score_records(records, examples, [method], out_dir, progress)}
        prompt = ratio_prompt(self.cfg, gamma)
        new: dict[str, list] = {k: [] for k in _NEW_COLUMNS}
        for i, text in zip(ids, rationales):
            got, error = None, ""
            if i not in rows:
                error = "not scored: empty rationale or no image"
            else:
                try:
                    got = self.gate(rows[i], gamma, method)
                except GateError as e:
                    error = f"{e.reason}: {e}"
            _, sep, answer = split_answer(text or "")
            kept = got.text if got else None
            new["compressed_rationale"].append(kept)
            new["keep_mask"].append(got.keep.tolist() if got else None)
            new["kept_ratio"].append(got.kept_ratio if got else None)
            new["surprisal"].append(got.scores.surprisal.tolist() if got else None)
            new["anchoring"].append(got.scores.anchoring.tolist() if got else None)
            new["gate_error"].append(error)
            new["target"].append(make_target(kept, answer, sep) if got else None)
            new["method"].append(method)
            new["ratio"].append(gamma)
            for k in ("prefix", "instruction", "assistant_prefill"):
                new[k].append(prompt[k])
        for k, v in new.items():
            if k in dataset.column_names:
                dataset = dataset.remove_columns(k)
            dataset = dataset.add_column(k, v)
        return dataset


_NEW_COLUMNS = (
    "compressed_rationale", "keep_mask", "kept_ratio", "surprisal", "anchoring", "gate_error", "target", "method",
    "ratio", "prefix", "instruction", "assistant_prefill",
)  # fmt: skip


def _example(id: str, image: Any, question: str, options: Sequence[str] | None) -> dict[str, Any]:
    if not isinstance(question, str) or not question.strip():
        raise InputError(f"example {id}: the question must be a non-empty string, got {question!r}")
    images = list(image) if isinstance(image, list | tuple) else None
    ex: dict[str, Any] = {"id": id, "question": question, "family": "custom"}
    if images:
        ex["images"], ex["image"] = images, images[0]
    else:
        ex["image"] = image
    if options:
        ex["options"] = list(options)
    return ex


# ------------------------------------------------------------------------------------- pruned decoding
def generate_pruned(
    vlm: Loaded,
    image: Any,
    question: str,
    method: str = "zspaprune",
    retention: float = 0.333,
    dstp: bool = False,
    max_new_tokens: int = 64,
    params: str | os.PathLike | Config | None = None,
    options: Sequence[str] | None = None,
    return_record: bool = False,
    **prune: Any,
) -> str | dict[str, Any]:
    """Greedy decoding with visual-token pruning: `method` (fastv, divprune, zspaprune, or a registered
    pruner) keeps `retention` of the image tokens; `dstp` re-selects them while decoding. The knobs of
    `prune.*` in `params` apply (keyword arguments override them, e.g. `fastv_layer=2`). Returns the text, or
    with `return_record` the decoder's record (text, kept visual tokens, DSTP re-selections, timings).
    `image` may also be a list of examples ({image, question, options}), answered in one batch: then a list
    is returned."""
    if method not in PRUNERS and method != "none":
        raise InputError(PRUNERS.unknown(method))
    try:
        retention = check_retention(retention)
    except ValueError as e:
        raise InputError(str(e)) from None
    why = unsupported_reason(vlm.model)
    if why:
        raise InputError(f"{vlm.path}: {why}")
    cfg = _config(params)
    spec = PruneSpec.from_config(cfg, method, retention, dstp)
    if prune:
        try:
            spec = dataclasses.replace(spec, **prune)
        except TypeError as e:
            fields = [f.name for f in dataclasses.fields(PruneSpec)]
            raise InputError(f"{e}; the pruning knobs are {fields}") from None
    batch = isinstance(image, list) and image and isinstance(image[0], dict)
    examples = (
        [_example(str(i), e["image"], e["question"], e.get("options")) for i, e in enumerate(image)]
        if batch
        else [_example("0", image, question, options)]
    )
    recs = _generate_pruned(
        vlm, examples, spec, max_new_tokens, batch_size=len(examples), instruction=cfg.generation.instruction
    )
    out = recs if return_record else [r["text"] for r in recs]
    return out if batch else out[0]
