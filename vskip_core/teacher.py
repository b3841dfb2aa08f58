"""Build the embedded teacher: a tiny `Qwen2VLForConditionalGeneration` trained in-repo on the benchmark.

    from vskip_core.teacher import build_teacher; build_teacher(load_params("params/default.yaml"))

A byte-level BPE tokenizer is trained on benchmark text, then four phases (`phases`) run through one training
loop (`run_phase`: lr schedule, clipping, history, checkpoints):

1. `vision_pretraining`: the vision tower learns dense per-token labels (colour, shape, size, price digits,
   cell) through `VisionProbe`, whose colour/shape/size heads are tied to the language model's word embeddings.
2. `lookup_drills`: short "Describe the triangle." -> "The triangle is a small red triangle ..." examples.
3. `end_to_end`: question -> rationale + answer, anchors and verdict words weighted, the probe loss alongside
   (2 and 3 share one optimizer and one lr schedule).
4. `verdict`: colour-comparison drills (loss on "same" / "different" only) + full examples, language model only.

Why each phase is there, and what was tried and measured: docs/TEACHER.md. The result is saved with
`save_pretrained` under `.cache/teacher-<hash of embedded + data params>-g<data.GENERATOR_VERSION>/`, so later
stages load it like a hub model; a killed build resumes from its last checkpoint (every `CKPT_EVERY` steps).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vskip_core.config import RANK_DESIGNS, REPO_ROOT, TEACHER_PHASES, Config
from vskip_core.data.embedded import (
    COLOURS,
    HELDOUT_INSTRUCTIONS,
    SHAPES,
    SIZES,
    TRAIN_INSTRUCTIONS,
    instruct_variant,
    make_compare_drill,
    make_example,
    make_lookup_drill,
    make_reasoning_drill,
)
from vskip_core.data.real import examples as benchmark_examples
from vskip_core.method.scoring import blank_image
from vskip_core.metrics import family_metrics, score_example
from vskip_core.modeling.decoding import generate
from vskip_core.modeling.loading import (
    ANSWER_PREFIX,
    collate,
    embedded_config,
    embedded_dir,
    encode,
    image_processor_for,
    load_model,
    save_model,
    train_tokenizer,
    user_text,
)
from vskip_core.runtime import (
    atomic_write_json,
    build_dir_once,
    cpu_info,
    file_sha256,
    git_info,
    resolve_device,
    seed_everything,
)
from vskip_core.runtime import progress as tqdm

CKPT_EVERY = 200
HELDOUT_PER_FAMILY = 50  # notebook 00: test examples per family for each held-out instruction sentence
SANITY_PER_SOURCE = 10  # notebook 00's short evaluation of a hub teacher: test examples per real source
LM_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")


def tokenizer_corpus(cfg: Config, n: int = 3000) -> list[str]:
    """The text the teacher's BPE tokenizer is trained on: prompts, rationales and answers of the stream."""

    texts = []
    for i in range(n):
        ex = make_example(cfg, "teacher", 10_000_000 + i)
        texts += [user_text(ex), ex["rationale"], f"{ANSWER_PREFIX} {ex['answer']}"]
    texts += ["user", "assistant", "ratio", "Keep 0.5 of the reasoning."]
    if cfg.embedded.instruct_share > 0:  # the sentences it is taught to tolerate (never the held-out ones)
        texts += list(TRAIN_INSTRUCTIONS)
    return texts


# ---------------------------------------------------------------------------------------- vision labels
class VisionProbe(nn.Module):
    """Heads on merged visual tokens: colour, shape, size, 3 digits (each with a 'none' class), cell, and with
    `rank` the object's price rank in its scene (for the `image` multi-step design).

    With `words` (from `probe_words`) the colour, shape and size heads are tied to the language model's input
    embeddings: class k's logit is the scaled cosine between the visual token and the embedding of the word
    naming k, so pretraining puts each visual token next to the words describing its object. The price digits
    stay linear heads (tied to the same ten digit embeddings, d0, d1 and d2 could not differ)."""

    def __init__(
        self,
        hidden: int,
        n_cells: int,
        embed: nn.Embedding | None = None,
        words: dict[str, list[list[int]]] | None = None,
        rank: bool = False,
    ) -> None:
        super().__init__()
        n_classes = {"colour": len(COLOURS), "shape": len(SHAPES), "size": len(SIZES)}
        n_classes |= {"d0": 10, "d1": 10, "d2": 10}
        if (embed is None) != (words is None):
            raise ValueError("a tied VisionProbe needs both the LM's input embedding and probe_words(tok)")
        self.tied = words is not None
        self._embed = [embed]  # a list, so the model's embedding is not registered (and saved) twice
        tied = ("colour", "shape", "size") if self.tied else ()
        self.words = {k: words[k] for k in tied} if words else {}
        self.heads = nn.ModuleDict(
            {k: nn.Linear(hidden, n + 1) for k, n in n_classes.items() if k not in tied}
        )
        self.heads["cell"] = nn.Linear(hidden, n_cells)
        if rank:  # the price rank of the token's object: most expensive / cheapest / other (+ none)
            self.heads["rank"] = nn.Linear(hidden, 4)
        if self.tied:
            self.none = nn.ParameterDict({k: nn.Parameter(torch.randn(hidden) * 0.02) for k in tied})
            self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {k: h(feats) for k, h in self.heads.items()}
        if self.tied:
            emb = self._embed[0].weight
            f = F.normalize(feats, dim=-1)
            for k, ids in self.words.items():
                cls = torch.stack([emb[i].mean(0) for i in (torch.tensor(x, device=emb.device) for x in ids)])
                cls = F.normalize(torch.cat([self.none[k][None], cls]), dim=-1)
                out[k] = self.scale * f @ cls.T
        return out


def probe_words(tok) -> dict[str, list[list[int]]]:
    """Token ids of the word naming each class of the tied heads, as the rationales write it (" purple")."""

    def ids(w: str) -> list[int]:
        return tok(w, add_special_tokens=False)["input_ids"]

    return {
        "colour": [ids(" " + c) for c in COLOURS],
        "shape": [ids(" " + s) for s in SHAPES],
        "size": [ids(" " + s) for s in SIZES],
    }


def token_labels(scene: dict[str, Any], image_size: int, rank: bool = False) -> dict[str, torch.Tensor]:
    """Labels per merged token (raster order over the (H/28, W/28) grid), 0 = no object in that cell. `rank`:
    also the price rank of the cell's object in the scene (1 most expensive, 2 cheapest, 3 other)."""
    g = image_size // 28
    cell_px = image_size // scene["grid"]
    by_cell = {o["cell"]: o for o in scene["objects"]}
    colours, shapes = list(COLOURS), list(SHAPES)
    lab: dict[str, list[int]] = {k: [] for k in ("colour", "shape", "size", "d0", "d1", "d2", "cell")}
    value = {o["cell"]: float(o["price"][1:]) for o in scene["objects"]}
    top, bottom = max(value, key=value.get), min(value, key=value.get)
    for r in range(g):
        for c in range(g):
            cy, cx = r * 28 + 14, c * 28 + 14
            cell = (cy // cell_px) * scene["grid"] + cx // cell_px
            o = by_cell.get(cell)
            lab["cell"].append(cell)
            if rank:
                lab.setdefault("rank", []).append(
                    0 if o is None else 1 if cell == top else 2 if cell == bottom else 3
                )
            if o is None:
                for k in ("colour", "shape", "size", "d0", "d1", "d2"):
                    lab[k].append(0)
                continue
            digits = [ch for ch in o["price"] if ch.isdigit()]
            lab["colour"].append(colours.index(o["colour"]) + 1)
            lab["shape"].append(shapes.index(o["shape"]) + 1)
            lab["size"].append(SIZES.index(o["size"]) + 1)
            for j in range(3):
                lab[f"d{j}"].append(int(digits[j]) + 1)
    return {k: torch.tensor(v) for k, v in lab.items()}


def _rank(cfg: Config) -> bool:
    """The vision tower also learns each object's price rank when the multi-step rationale reads it off the image."""
    return cfg.data.multistep_rationale in RANK_DESIGNS


def visual_features(model, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    out = model.model.visual(pixel_values, grid_thw=grid_thw)
    return out.pooler_output if hasattr(out, "pooler_output") else out


# ----------------------------------------------------------------------------------------- loss weights
def target_weights(
    tok, ex: dict[str, Any], anchor_weight: float, decision_weight: float | None = None
) -> torch.Tensor:
    """Per-target-token loss weights: `anchor_weight` on tokens overlapping an anchor span or the answer line
    (a direct answer's: its `answer_weight`), `decision_weight` (default `anchor_weight`) on the words where
    the reasoning branches (`decisions`), none on the `prefilled` characters (a direct answer's `Answer:`)."""
    text = ex["rationale"]
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = [(a["start"], a["end"], anchor_weight) for a in ex["anchors"]]
    dw = anchor_weight if decision_weight is None else decision_weight
    spans += [(d["start"], d["end"], dw) for d in ex.get("decisions", [])]
    ans_start = text.rfind("Answer:")
    if ans_start >= 0:  # look-up drills have no answer line
        spans.append((ans_start, len(text), ex.get("answer_weight", anchor_weight)))
    base = 0.0 if ex.get("loss_on") == "decisions" else 1.0  # comparison drills: the verdict only
    if base == 0.0:
        spans = [(d["start"], d["end"], dw) for d in ex.get("decisions", [])]
    w = [max([base] + [v for s2, e2, v in spans if s < e2 and e > s2]) for s, e in enc["offset_mapping"]]
    given = ex.get("prefilled", 0)
    w = [0.0 if e <= given else x for x, (_, e) in zip(w, enc["offset_mapping"])]
    return torch.tensor(w + [base])  # + <|im_end|>


def _encode_target(ex: dict[str, Any], tok, proc) -> dict[str, Any]:
    """A training example's inputs and target, with its added sentence if it has one (`instruct_variant`)."""
    return encode(
        ex,
        tok,
        proc,
        target=ex["rationale"],
        instruction=ex.get("instruction", ""),
        prefix=ex.get("prefix", ""),
    )


def lm_batch(
    examples: list[dict[str, Any]],
    tok,
    proc,
    anchor_weight: float,
    items: list[dict[str, Any]] | None = None,
    decision_weight: float | None = None,
) -> dict[str, torch.Tensor]:
    if items is None:
        items = [_encode_target(ex, tok, proc) for ex in examples]
    batch = collate(items, tok.pad_token_id, padding_side="right")
    B, L = batch["input_ids"].shape
    labels = torch.full((B, L), -100, dtype=torch.long)
    weights = torch.zeros((B, L))
    for b, (it, ex) in enumerate(zip(items, examples)):
        n, s = len(it["input_ids"]), it["target_start"]
        labels[b, s:n] = it["input_ids"][s:n]
        weights[b, s:n] = target_weights(tok, ex, anchor_weight, decision_weight)
    batch["labels"] = labels
    batch["weights"] = weights
    return batch


def length_buckets(
    examples: list[dict[str, Any]], tok, proc, anchor_weight: float, decision_weight: float | None = None
) -> list[tuple[list[dict[str, Any]], dict[str, torch.Tensor]]]:
    """One training batch as two micro-batches of similar length, cut where the padded token count is least
    (multi-step examples are much longer than the rest: padded together, much of the compute is padding)."""
    items = [_encode_target(ex, tok, proc) for ex in examples]
    order = sorted(range(len(items)), key=lambda i: len(items[i]["input_ids"]))
    lens = [len(items[i]["input_ids"]) for i in order]
    n = len(order)
    cut = min(range(1, n + 1), key=lambda c: c * lens[c - 1] + (n - c) * lens[-1] * (c < n))
    groups = [g for g in (order[:cut], order[cut:]) if g]
    return [
        (
            [examples[i] for i in g],
            lm_batch(
                [examples[i] for i in g], tok, proc, anchor_weight, [items[i] for i in g], decision_weight
            ),
        )
        for g in groups
    ]


def weighted_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, denom: torch.Tensor | None = None
) -> torch.Tensor:
    """Weighted next-token NLL over the target tokens, divided by the weights' sum (or `denom`: the weight
    of the whole batch when this is one micro-batch of it)."""
    logits, labels, weights = logits[:, :-1], labels[:, 1:], weights[:, 1:]
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view(labels.shape)
    d = weights.sum() if denom is None else denom.to(weights.device)
    return (nll * weights).sum() / d.clamp_min(1e-6)


# -------------------------------------------------------------------------------------------- training
FULL_OFFSET = 5_000_000  # teacher-stream indices of end_to_end's full examples (disjoint from pretraining's)
VERDICT_OFFSET = 7_000_000  # and of the verdict phase's full examples (none seen in end_to_end)


def family_for(cfg: Config, i: int) -> str | None:
    """Family of example `i` of the teacher's stream: drawn by `embedded.family_weights` (a pure function of
    `i`, so a resumed build sees the same stream), or None (the benchmark's own rotation) without weights."""
    w = cfg.embedded.family_weights
    if not w:
        return None
    return random.Random(f"family:{i}").choices(cfg.data.families, weights=w)[0]


def _lr(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to a tenth at `total` (a factor of the peak lr)."""
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


def _verdict_lr(step: int, total: int) -> float:
    """The verdict phase's factor: no warm-up, cosine to a tenth counted from step + 1."""
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step + 1) / total))


@dataclass
class Build:
    """What a build trains, and the state a killed build resumes from (`work/ckpt.pt`)."""

    cfg: Config
    work: Path  # the .building folder
    device: str
    tok: Any
    proc: Any
    model: nn.Module
    probe: VisionProbe
    vision: list[nn.Parameter]  # vision tower + merger
    language: list[nn.Parameter]  # the rest of the model (the language model and its embeddings)
    optimizers: dict[str, torch.optim.Optimizer]  # "vision", "joint", "language" (see `_setup`)
    state: dict[str, Any]  # step counters, history, seconds
    t_start: float  # when this run of the build started (a resumed build adds the seconds before)

    def save(self) -> None:
        self.state["seconds"] = self.state.get("seconds_base", 0.0) + (time.time() - self.t_start)
        blob = {"model": self.model.state_dict(), "probe": self.probe.state_dict()}
        blob |= {_CKPT_KEYS[k]: opt.state_dict() for k, opt in self.optimizers.items()}
        blob |= {"state": self.state, "rng": torch.get_rng_state()}
        torch.save(blob, self.work / "ckpt.pt.tmp")
        (self.work / "ckpt.pt.tmp").replace(self.work / "ckpt.pt")

    def resume(self) -> None:
        ckpt = self.work / "ckpt.pt"
        if ckpt.exists():
            blob = torch.load(ckpt, map_location=self.device, weights_only=False)
            self.model.load_state_dict(blob["model"])
            self.probe.load_state_dict(blob["probe"])
            for k, opt in self.optimizers.items():
                opt.load_state_dict(blob[_CKPT_KEYS[k]])
            self.state = blob["state"]
            torch.set_rng_state(blob["rng"])
        self.state["seconds_base"] = self.state.get("seconds", 0.0)


_CKPT_KEYS = {"vision": "opt_v", "joint": "opt", "language": "opt_p"}  # the optimizers' keys in ckpt.pt


def _setup(cfg: Config, work: Path, device: str, t_start: float) -> Build:
    """Tokenizer (trained on benchmark text, or the one saved by a killed build), model, probe, optimizers."""
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    e = cfg.embedded
    tok_dir = work / "tokenizer"
    if (tok_dir / "tokenizer.json").exists():
        tok = AutoTokenizer.from_pretrained(tok_dir)
    else:
        tok = train_tokenizer(tokenizer_corpus(cfg), e.vocab_size)
        tok.save_pretrained(tok_dir)
    proc = image_processor_for(cfg)
    model = Qwen2VLForConditionalGeneration(embedded_config(cfg, tok)).to(device)
    n_cells = cfg.data.grid**2
    if e.probe_tied:
        probe = VisionProbe(
            e.hidden_size, n_cells, model.get_input_embeddings(), probe_words(tok), rank=_rank(cfg)
        ).to(device)
    else:
        probe = VisionProbe(e.hidden_size, n_cells, rank=_rank(cfg)).to(device)
    vision = list(model.model.visual.parameters())
    vision_ids = {id(p) for p in vision}
    language = [p for p in model.parameters() if id(p) not in vision_ids]
    optimizers = {
        # vision_pretraining: the vision tower and the probe
        "vision": torch.optim.AdamW(vision + list(probe.parameters()), lr=e.pretrain_lr, weight_decay=0.01),
        # lookup_drills and end_to_end: everything, the vision side at lr x vision_lr_mult
        "joint": torch.optim.AdamW(
            [
                {"params": language, "lr": e.lr},
                {"params": vision + list(probe.parameters()), "lr": e.lr * e.vision_lr_mult},
            ],
            lr=e.lr,
            betas=(0.9, 0.98),
            weight_decay=0.01,
        ),
        # verdict: the language model alone
        "language": torch.optim.AdamW(language, lr=e.verdict_lr, weight_decay=0.01),
    }
    state = {"pretrain_step": 0, "train_step": 0, "verdict_step": 0, "history": [], "seconds": 0.0}
    return Build(cfg, work, device, tok, proc, model, probe, vision, language, optimizers, state, t_start)


# ---------------------------------------------------------------------------------------------- phases
@dataclass
class Phase:
    """One phase of the build: which steps of which counter, which optimizer and lr schedule, what one step
    trains (`step`: forward and backward, returns the history fields), which parameters it clips and freezes."""

    name: str  # a key of config.TEACHER_PHASES
    counter: str  # state key counting its steps (lookup_drills and end_to_end share one, and their schedule)
    start: int
    stop: int
    optimizer: str  # a key of Build.optimizers
    lrs: Callable[[int], list[float]]  # lr of each param group at a step of the counter
    batch: Callable[[Build, int], Any]  # a step's examples, encoded (pure data: prefetched in a thread)
    step: Callable[[Build, Any], dict[str, float]]  # forward and backward of one batch; the history fields
    clip: list[nn.Parameter]  # gradient norm clipped to 1 over these
    frozen: list[nn.Parameter] = field(default_factory=list)  # requires_grad off during the phase
    log_lr: bool = True  # history rows carry the first group's lr


def phases(b: Build) -> list[Phase]:
    """The recipe, in order (docs/TEACHER.md says why each phase is there)."""
    e = b.cfg.embedded
    total = e.drill_steps + e.train_steps  # lookup_drills + end_to_end: one warm-up and cosine over both

    def joint(step: int) -> list[float]:
        f = _lr(step, total, e.warmup_steps)
        return [e.lr * f, e.lr * e.vision_lr_mult * f]

    def pretrain(step: int) -> list[float]:
        return [e.pretrain_lr * _lr(step, e.pretrain_steps, min(50, e.warmup_steps))]

    def verdict_lr(step: int) -> list[float]:
        return [e.verdict_lr * _verdict_lr(step, e.verdict_steps)]

    every = list(b.model.parameters())
    return [
        Phase("vision_pretraining", "pretrain_step", 0, e.pretrain_steps, "vision", pretrain,
              pretraining_batch, vision_pretraining, b.vision, log_lr=False),
        Phase("lookup_drills", "train_step", 0, e.drill_steps, "joint", joint, drill_batch, lookup_drills,
              every),
        Phase("end_to_end", "train_step", e.drill_steps, total, "joint", joint, full_batch, end_to_end, every),
        Phase("verdict", "verdict_step", 0, e.verdict_steps, "language", verdict_lr, verdict_batch, verdict,
              b.language, frozen=b.vision),
    ]  # fmt: skip


def run_phase(b: Build, phase: Phase, progress: bool = True) -> None:
    """The one training loop: lr schedule, one step, clipping, history, a checkpoint every `CKPT_EVERY`. The next
    step's batch is built in a second thread while this one trains (the data are a function of the step alone,
    so the weights are the same as without it)."""
    st, opt = b.state, b.optimizers[phase.optimizer]
    done = min(max(st[phase.counter], phase.start), phase.stop) - phase.start
    bar = tqdm(total=phase.stop - phase.start, initial=done, desc=phase.name, disable=not progress)
    for p in phase.frozen:
        p.requires_grad_(False)
    with ThreadPoolExecutor(1) as pool:
        ahead = pool.submit(phase.batch, b, st[phase.counter]) if st[phase.counter] < phase.stop else None
        while st[phase.counter] < phase.stop:
            step = st[phase.counter]
            data = ahead.result()  # type: ignore[union-attr]
            if step + 1 < phase.stop:
                ahead = pool.submit(phase.batch, b, step + 1)
            _train_step(b, phase, opt, step, data)
            bar.update(1)
            bar.set_postfix(loss=f"{st['history'][-1]['loss']:.3f}")
            if st[phase.counter] % CKPT_EVERY == 0:
                b.save()
    bar.close()
    for p in phase.frozen:
        p.requires_grad_(True)


def _train_step(b: Build, phase: Phase, opt, step: int, data: Any) -> None:
    """lr schedule, forward and backward, clipping, the optimizer step and the history row."""
    lrs = phase.lrs(step)
    for g, lr in zip(opt.param_groups, lrs, strict=True):
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    logged = phase.step(b, data)
    torch.nn.utils.clip_grad_norm_(phase.clip, 1.0)
    opt.step()
    logged |= {"lr": lrs[0]} if phase.log_lr else {}
    b.state["history"].append({"phase": TEACHER_PHASES[phase.name], "step": step, **logged})
    b.state[phase.counter] += 1


def _probe_loss(b: Build, exs: list[dict[str, Any]], feats: torch.Tensor):
    """Summed cross-entropy of every probe head on the examples' merged visual tokens: (loss, logits, labels)."""
    per = [token_labels(x["scene"], b.cfg.data.image_size, _rank(b.cfg)) for x in exs]
    labels = {k: torch.cat([lab[k] for lab in per]) for k in per[0]}
    logits = b.probe(feats)
    loss = sum(F.cross_entropy(logits[k], labels[k].to(b.device)) for k in logits)
    return loss, logits, labels


LmBatch = tuple[list[dict[str, Any]], list[tuple[list[dict[str, Any]], dict[str, torch.Tensor]]]]


def _lm_batch(b: Build, exs: list[dict[str, Any]]) -> LmBatch:
    """Rationale examples and their two length buckets (`length_buckets`), encoded."""
    e = b.cfg.embedded
    return exs, length_buckets(exs, b.tok, b.proc, e.anchor_weight, e.decision_weight)


def _lm_step(b: Build, data: LmBatch, probe_weight: float | None) -> dict[str, float]:
    """Forward and backward of a batch of rationale examples as two length buckets (gradient accumulation: the
    loss of the whole batch), plus `probe_weight` x the probe loss on their visual tokens (None: no probe)."""
    device = b.device
    exs, parts = data
    denom = sum(batch["weights"][:, 1:].sum() for _, batch in parts)
    captured: dict[str, torch.Tensor] = {}  # the merged visual tokens of the current forward
    hook = b.model.model.visual.register_forward_hook(
        lambda _m, _i, out: captured.__setitem__("feats", getattr(out, "pooler_output", out))
    )
    lm_total, probe_total = 0.0, 0.0
    try:
        for part, batch in parts:
            res = b.model(**{k: batch[k].to(device) for k in LM_INPUTS})
            w = batch["weights"].to(device)
            lm_loss = weighted_lm_loss(res.logits, batch["labels"].to(device), w, denom)
            if probe_weight is None:
                lm_loss.backward()
            else:
                probe_loss = torch.zeros((), device=device)
                if probe_weight > 0:
                    probe_loss = _probe_loss(b, part, captured["feats"])[0] * (len(part) / len(exs))
                (lm_loss + probe_weight * probe_loss).backward()
                probe_total += probe_loss.item()
            lm_total += lm_loss.item()
    finally:
        hook.remove()
    return {"loss": lm_total} if probe_weight is None else {"loss": lm_total, "probe_loss": probe_total}


def pretraining_batch(b: Build, step: int) -> tuple[list[dict[str, Any]], Any]:
    n = b.cfg.embedded.batch_size
    exs = [make_example(b.cfg, "teacher", step * n + j) for j in range(n)]
    return exs, b.proc(images=[x["image"] for x in exs], return_tensors="pt")


def vision_pretraining(b: Build, data: tuple[list[dict[str, Any]], Any]) -> dict[str, float]:
    """The vision tower learns, for every merged image token, the colour, shape, size and price digits of the
    object in its cell and the cell itself (through `VisionProbe`)."""
    exs, vis = data
    feats = visual_features(b.model, vis["pixel_values"].to(b.device), vis["image_grid_thw"].to(b.device))
    loss, logits, labels = _probe_loss(b, exs, feats)
    loss.backward()
    with torch.no_grad():
        acc = {k: (logits[k].argmax(-1).cpu() == labels[k]).float().mean().item() for k in logits}
    return {"loss": loss.item(), **{f"acc_{k}": v for k, v in acc.items()}}


def _variant(b: Build, ex: dict[str, Any], key: str) -> dict[str, Any]:
    """`data.instruct_variant` under the recipe's shares (a direct answer weighted `direct_weight`)."""
    e = b.cfg.embedded
    ex = instruct_variant(ex, key, e.direct_share, e.instruct_share, e.instruct_after)
    return ex | {"answer_weight": e.direct_weight} if ex.get("direct") else ex


def drill_batch(b: Build, step: int) -> LmBatch:
    n = b.cfg.embedded.drill_batch_size
    idx = range(step * n, step * n + n)
    return _lm_batch(b, [_variant(b, make_lookup_drill(b.cfg, "teacher", i), f"drill:{i}") for i in idx])


def lookup_drills(b: Build, data: LmBatch) -> dict[str, float]:
    """Short look-up drills ("Describe the triangle." -> "The triangle is a small red triangle with the price
    $4.57, at the top left."): the step every family's rationale contains."""
    return _lm_step(b, data, b.cfg.embedded.probe_weight)


def full_batch(b: Build, step: int) -> LmBatch:
    cfg, e = b.cfg, b.cfg.embedded
    first = FULL_OFFSET + (step - e.drill_steps) * e.batch_size
    idx = range(first, first + e.batch_size)
    return _lm_batch(
        b, [_variant(b, make_example(cfg, "teacher", i, family_for(cfg, i)), str(i)) for i in idx]
    )


def end_to_end(b: Build, data: LmBatch) -> dict[str, float]:
    """Question -> rationale + answer, anchors, answer and decision words weighted, the probe loss alongside."""
    return _lm_step(b, data, b.cfg.embedded.probe_weight)


def verdict_batch(b: Build, step: int) -> LmBatch:
    cfg, e = b.cfg, b.cfg.embedded
    nc, nf, nr = e.verdict_compare, e.verdict_full, e.verdict_reasoning
    exs = [make_compare_drill(cfg, "teacher", step * nc + j, blank=e.verdict_blank) for j in range(nc)]
    share = e.instruct_share if e.instruct_reasoning else 0.0
    exs += [
        instruct_variant(
            make_reasoning_drill(cfg, "teacher", step * nr + j, e.reasoning_presence),
            f"reason:{step * nr + j}",
            instruct_share=share,
            instruct_after=e.instruct_after,
        )
        for j in range(nr)
    ]
    first = VERDICT_OFFSET + step * nf
    exs += [
        _variant(b, make_example(cfg, "teacher", i, family_for(cfg, i)), str(i))
        for i in range(first, first + nf)
    ]
    return _lm_batch(b, exs)


def verdict(b: Build, data: LmBatch) -> dict[str, float]:
    """Colour-comparison drills ("It is blue; we need red: different.", loss on the verdict only) + full
    examples, the language model alone."""
    return _lm_step(b, data, None)


# ------------------------------------------------------------------------------------------- the build
# The default teacher, built once and committed: training on CPU computes differently on another instruction
# set (docs/TEACHER.md), so every user starts from these weights. `make teacher` rebuilds and replaces them.
SHIPPED_DIR = REPO_ROOT / "assets" / "teacher"
SHIPPED_MANIFEST = "shipped.json"


class ShippedTeacherError(RuntimeError):
    pass


def shipped_manifest(folder: Path | None = None) -> dict[str, Any] | None:
    f = Path(folder or SHIPPED_DIR) / SHIPPED_MANIFEST
    return json.loads(f.read_text()) if f.exists() else None


def shipped_teacher(key: str, folder: Path | None = None) -> Path | None:
    """The shipped teacher's folder when it was built from the recipe `key` (the cache folder's name,
    `teacher-<hash of embedded + data params>-g<version>`), its files checked against the manifest's sha256;
    None when none is shipped or it is another recipe's."""
    folder = Path(folder or SHIPPED_DIR)
    man = shipped_manifest(folder)
    if man is None or man["key"] != key:
        return None
    for name, digest in man["sha256"].items():
        f = Path(folder) / name
        if not f.is_file() or file_sha256(f) != digest:
            raise ShippedTeacherError(
                f"{f} is missing or differs from its sha256 in {SHIPPED_MANIFEST} (a partial checkout or a "
                f"git-lfs pointer?). Fix: `git checkout -- {folder}`, or rebuild it: `make teacher` (~20 min)."
            )
    return Path(folder)


def install_shipped(src: Path, out: Path) -> None:
    """Copy the shipped teacher into the cache folder the later stages load (`runtime.build_dir_once`: a
    killed or concurrent copy never leaves a folder that looks complete)."""
    build_dir_once(out, lambda tmp: shutil.copytree(src, tmp, dirs_exist_ok=True), "config.json")


def ship_teacher(cfg: Config, folder: Path | None = None) -> Path:
    """Build these params' teacher (reusing a build in the cache, never an installed shipped copy) and make it
    the shipped one: its files, and a manifest with the recipe key, sha256 of each file and where it was built."""
    folder = Path(folder or SHIPPED_DIR)
    cached = embedded_dir(cfg)
    if (cached / SHIPPED_MANIFEST).exists():  # the cache holds the installed shipped copy: build it anew
        shutil.rmtree(cached)
    path = build_teacher(cfg, use_shipped=False)
    info = build_info(path)
    files = sorted(p.name for p in path.iterdir() if p.is_file() and p.name != SHIPPED_MANIFEST)
    tmp = Path(folder).with_name(Path(folder).name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in files:
        shutil.copy2(path / name, tmp / name)
    manifest = {
        "key": path.name,
        "sha256": {name: file_sha256(tmp / name) for name in files},
        "build_seconds": info.get("build_seconds"),
        "built_on": info.get("built_on")
        or cpu_info(),  # builds before issue 32 recorded none: this machine's
        "torch": info.get("torch") or torch.__version__,
        "shipped_at": git_info(),  # the commit that shipped it (the recipe is `key`)
    }
    atomic_write_json(tmp / SHIPPED_MANIFEST, manifest)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return Path(folder)


def build_teacher(cfg: Config, progress: bool = True, force: bool = False, use_shipped: bool = True) -> Path:
    """The embedded teacher's folder: from the cache, else the shipped one when it is these params' recipe,
    else trained here (~20 min on 2 CPUs; a killed build resumes). `force` trains it anew."""

    out = embedded_dir(cfg)
    if (out / "config.json").exists() and not force:
        return out
    if use_shipped and not force:
        src = shipped_teacher(out.name)
        if src is not None:
            install_shipped(src, out)
            if progress:
                shown = src.relative_to(REPO_ROOT) if src.is_relative_to(REPO_ROOT) else src
                print(f"teacher: the shipped build ({out.name}, copied from {shown}/)")
            return out
        man = shipped_manifest()
        if progress and man is not None:
            print(
                f"teacher: the shipped build is recipe {man['key']}, these params ask for {out.name}: "
                "training it here (~20 min on 2 CPUs; `make teacher` ships it)"
            )
    work = out.with_name(out.name + ".building")
    work.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.runtime.seed)
    b = _setup(cfg, work, resolve_device(cfg.runtime.device), time.time())
    b.resume()
    b.model.train()
    for phase in phases(b):
        run_phase(b, phase, progress)
    b.model.eval()
    _save_final(b, out)
    return out


def _save_final(b: Build, out: Path) -> None:
    """Save like a hub checkpoint (model, tokenizer, image processor, the build's params), then swap it in."""

    cfg = b.cfg
    seconds = b.state.get("seconds_base", 0.0) + (time.time() - b.t_start)
    final = out.with_name(out.name + ".final")
    if final.exists():
        shutil.rmtree(final)
    extra = {
        "build_seconds": seconds,
        "built_on": cpu_info(),  # training computes differently on another instruction set
        "torch": torch.__version__,
        "config_hash": cfg.hash("embedded", "data"),
        "embedded": cfg.to_dict()["embedded"],
        "data": cfg.to_dict()["data"],
    }
    save_model(b.model, b.tok, b.proc, final, extra=extra)
    atomic_write_json(final / "history.json", b.state["history"])
    final.rename(out)
    shutil.rmtree(b.work, ignore_errors=True)


def build_info(path: Path) -> dict[str, Any]:
    return json.loads((path / "vskip_build.json").read_text())


def history(path: Path) -> list[dict[str, Any]]:
    return json.loads((path / "history.json").read_text())


def evaluate_teacher(
    cfg: Config,
    loaded,
    n_per_family: int,
    blank: bool = False,
    progress: bool = True,
    split: str = "test",
    instruction: str = "",
    assistant_prefill: str = "",
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Greedy full-rationale generation on `n_per_family` held-out examples per family (per source on the real
    benchmarks; at most the split), with the real images or blank ones (same background, no objects; grey for
    real images), an `instruction` sentence after the question, and the assistant turn started with
    `assistant_prefill` ("Answer:": a direct answer, scored with the prefill). Returns (family metrics,
    per-example records)."""

    embedded = cfg.data.source == ["embedded"]
    n = n_per_family * (len(cfg.data.families) if embedded else len(cfg.data.source))
    exs = benchmark_examples(cfg, split, n)
    blanks = [blank_image(x) for x in exs] if blank else None
    gens = generate(
        loaded.model,
        loaded.tokenizer,
        loaded.processor,
        exs,
        cfg.generation.max_new_tokens,
        cfg.generation.batch_size,
        instruction=instruction,
        blank_images=blanks,
        progress=progress,
        desc="blank-image eval" if blank else "eval",
        assistant_prefill=assistant_prefill,
        repetition_penalty=cfg.generation.repetition_penalty,
    )
    for g in gens:
        g["text"] = assistant_prefill + g["text"]
    scored = [score_example(x, g["text"]) for x, g in zip(exs, gens)]
    recs = [
        {
            **s,
            "question": x["question"],
            "gold": x["rationale"],
            "response": g["text"],
            "n_tokens": len(g["token_ids"]),
        }
        for x, g, s in zip(exs, gens, scored)
    ]
    return family_metrics(exs, scored), recs


def prompt_report(
    cfg: Config,
    loaded,
    n_per_family: int,
    n_heldout: int = HELDOUT_PER_FAMILY,
    sentences: tuple[str, ...] = HELDOUT_INSTRUCTIONS,
    plain: dict[str, Any] | None = None,
    progress: bool = True,
    split: str = "test",
) -> list[dict[str, Any]]:
    """How the teacher answers as an instruction-tuned VLM would (issue 32): one row per prompt, with
    rationale (`plain`: evaluate_teacher's metrics, if already computed), direct (the turn prefilled with
    `Answer:`) on `n_per_family` test examples per family, and each held-out sentence (never trained) after the
    question on the first `n_heldout` of them, each beside the plain prompt on the same examples. A row:
    prompt, family, score (`metrics.FAMILY_SCORE`), yes_ratio (existence), n, delta (score - plain's). `split`:
    "val" to choose a recipe on examples the reported figures do not use."""
    from vskip_core.metrics import FAMILY_SCORE

    def rows(prompt: str, fm: dict[str, Any], ref: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        out = []
        for fam, m in fm.items():
            score = m[FAMILY_SCORE[fam]]
            r = {
                "prompt": prompt,
                "family": fam,
                "score": score,
                "n": m["n"],
                "yes_ratio": m.get("yes_ratio"),
            }
            out.append(r | {"delta": None if ref is None else score - ref[fam][FAMILY_SCORE[fam]]})
        return out

    if plain is None:
        plain = evaluate_teacher(cfg, loaded, n_per_family, progress=progress, split=split)[0]
    direct = evaluate_teacher(
        cfg, loaded, n_per_family, progress=progress, split=split, assistant_prefill=ANSWER_PREFIX
    )[0]
    out = rows("with rationale", plain) + rows("direct (Answer:)", direct)
    n = min(n_heldout, n_per_family)
    base = plain if n == n_per_family else evaluate_teacher(cfg, loaded, n, progress=progress, split=split)[0]
    if n != n_per_family:
        out += rows(f"with rationale, first {n}", base)
    for s in sentences:
        out += rows(
            s, evaluate_teacher(cfg, loaded, n, progress=progress, split=split, instruction=s)[0], base
        )
    return out


def load_teacher(cfg: Config, progress: bool = True):
    """The teacher as a `models.Loaded`: the embedded one (built first if needed, cached) or the configured hub
    checkpoint / local folder / stand-in."""

    if cfg.model.teacher == "embedded":
        build_teacher(cfg, progress=progress)
    return load_model(cfg)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from vskip_core.arguments import parse_sets
    from vskip_core.config import load_params
    from vskip_core.runtime import configure_threads

    ap = argparse.ArgumentParser(
        prog="python -m vskip_core.teacher", description="build and ship the teacher"
    )
    ap.add_argument("--params", default="params/default.yaml")
    ap.add_argument(
        "--set", action="append", default=[], help="dotted override, e.g. embedded.train_steps=600"
    )
    ap.add_argument("--ship", action="store_true", help=f"make it the shipped teacher ({SHIPPED_DIR.name}/)")
    args = ap.parse_args(argv)
    cfg = load_params(args.params, parse_sets(args.set))
    configure_threads(cfg.runtime.num_threads)
    path = ship_teacher(cfg) if args.ship else build_teacher(cfg, use_shipped=False)
    print(f"teacher: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
