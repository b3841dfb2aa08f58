"""Build the embedded teacher: a tiny `Qwen2VLForConditionalGeneration` trained in-repo on the benchmark.

Recipe (each step measured in the notebook 00 report):
1. A byte-level BPE tokenizer trained on benchmark text (digits are single tokens).
2. **Vision pretraining**: the vision tower + merger learn dense per-token labels: for every merged image
   token, the colour, shape, size and the three price digits of the object in its cell, and the cell index.
   The colour, shape and size heads are *tied to the language model's word embeddings* (`VisionProbe`), so
   each visual token lands next to the embeddings of the words that describe its object.
3. **Look-up drills**: `drill_steps` steps of "Describe the triangle." -> "The triangle is a small red
   triangle with the price $4.57, at the top left." (`data.make_lookup_drill`): the one skill every family
   needs, at a third of a full example's length.
4. **End to end**: next-token loss on rationale + answer only (prompt and image tokens masked), tokens
   inside visual-anchor spans and the answer line weighted `anchor_weight`x, vision lr x`vision_lr_mult`,
   plus `probe_weight` x the phase-2 probe loss so the visual tokens stay decodable. Batches are cut into
   two micro-batches by length (same loss, a quarter less padding).
   A fresh stream of examples (split "teacher", disjoint from train/val/test), never repeated.
5. **Verdict phase**: `verdict_steps` steps of 16 colour-comparison drills on blank images ("It is blue; we
   need red: different.", loss on the verdict only, `data.make_compare_drill`) + 16 full examples, language
   model only, lr 5e-4 decaying (cosine) to a tenth.

Measured (greedy; 200 test examples per family for the first and last, 100 otherwise): untied probe, no
drills, 1000 full steps: attribute 0.41, reading ANLS 0.49; tied probe, 730 full steps: attribute 1.00,
ANLS 0.84; tied + 300 drills + 500 full steps: attribute 1.00, ANLS 1.00 (exact 1.00), existence F1 0.65
("It is orange, not red." needed a comparison with a colour 25 tokens back, which stayed at chance); with
existence rationales that put the two colours side by side and `decision_weight` on the verdict: F1 0.67-0.80
over rebuilds and family shares (0.80 with `family_weights` [1, 2, 1, 2], 200 per family).
Why the verdict phase: after step 4 the teacher wrote both colours right and then the wrong verdict in 34 of
175 shape-present existence examples ("It is blue; we need blue: different."); teacher-forced on blank images
it gave "different" to all 36 colour pairs: the verdict came from the image and question, not from the two
words beside it. The same comparison drills mixed into steps 3-4 at their lr taught nothing (blank pairs
still all one verdict, existence F1 0.42 and 0.41, 25% of drills / + 4 per full step); alone on the built
teacher at lr 3e-4 they are learned in ~100 steps. As a fifth phase (measured on the default teacher, 200 per
family): constant lr 3e-4, 8 full examples a step: existence F1 0.85-0.88, attribute 0.97-0.98; constant
5e-4: F1 0.89-0.97 but attribute 0.81-0.91 (the answer copy of one template broke); 5e-4 with the cosine decay
and 16 full: F1 0.99, attribute 0.99, ANLS 1.00 (0.975 / 0.985 / 1.00 with drills on unrelated real scenes).
The default build (all five phases): attribute 0.965, existence F1 0.995 (yes-ratio 0.48), ANLS 1.00.
Multi-step (options A-D, most / least expensive) stays near chance (0.24-0.30) with every recipe and every
rationale design tried (see `data._multistep`).
The default build takes 16.5 min at 1 torch thread on an idle 2-core VM (pretraining 800 steps ~2.5 min, drills
~0.7 s/step, full steps ~0.8 s/step, then 150 verdict steps), and is deterministic there: two builds (one from a
clean clone), bit-identical weights.

The result is saved with `save_pretrained` (model, tokenizer, image processor) under
`.cache/teacher-<hash of embedded + data params>-g<data.GENERATOR_VERSION>/`, so later runs and stages load
it like a hub model.
Training checkpoints every `CKPT_EVERY` steps; a killed build resumes from the last one.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vskip_core.config import Config
from vskip_core.data.embedded import (
    COLOURS,
    SHAPES,
    SIZES,
    make_compare_drill,
    make_example,
    make_lookup_drill,
)
from vskip_core.modeling.loading import (
    collate,
    embedded_config,
    embedded_dir,
    encode,
    image_processor_for,
    save_model,
    train_tokenizer,
)

CKPT_EVERY = 200
SANITY_PER_SOURCE = 10  # notebook 00's short evaluation of a hub teacher: test examples per real source
LM_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")


def tokenizer_corpus(cfg: Config, n: int = 3000) -> list[str]:
    from vskip_core.modeling.loading import ANSWER_PREFIX, user_text

    texts = []
    for i in range(n):
        ex = make_example(cfg, "teacher", 10_000_000 + i)
        texts += [user_text(ex), ex["rationale"], f"{ANSWER_PREFIX} {ex['answer']}"]
    texts += ["user", "assistant", "ratio", "Keep 0.5 of the reasoning."]
    return texts


# ---------------------------------------------------------------------------------------- vision labels
class VisionProbe(nn.Module):
    """Heads on merged visual tokens: colour, shape, size, 3 digits (each with a 'none' class), cell.

    With `words` (head -> one token-id list per class, from `probe_words`), the colour, shape and size heads
    are *tied to the language model's input embeddings*: the logit of class k is the scaled cosine between the
    visual token and the embedding of the word naming k (" purple", " diamond"), plus a free 'none' vector.
    Vision pretraining then puts each visual token near the embeddings of the words that describe its object,
    so the language model reads an image token like the words it would write, and copying "purple" from the
    image is the same operation as copying it from text. The three price digits stay linear heads: tied to the
    same ten digit embeddings, d0, d1 and d2 would be one function and could not tell $4.57 from $7.54."""

    def __init__(
        self,
        hidden: int,
        n_cells: int,
        embed: nn.Embedding | None = None,
        words: dict[str, list[list[int]]] | None = None,
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


def token_labels(scene: dict[str, Any], image_size: int) -> dict[str, torch.Tensor]:
    """Labels per merged token (raster order over the (H/28, W/28) grid), 0 = no object in that cell."""
    g = image_size // 28
    cell_px = image_size // scene["grid"]
    by_cell = {o["cell"]: o for o in scene["objects"]}
    colours, shapes = list(COLOURS), list(SHAPES)
    lab: dict[str, list[int]] = {k: [] for k in ("colour", "shape", "size", "d0", "d1", "d2", "cell")}
    for r in range(g):
        for c in range(g):
            cy, cx = r * 28 + 14, c * 28 + 14
            cell = (cy // cell_px) * scene["grid"] + cx // cell_px
            o = by_cell.get(cell)
            lab["cell"].append(cell)
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


def visual_features(model, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    out = model.model.visual(pixel_values, grid_thw=grid_thw)
    return out.pooler_output if hasattr(out, "pooler_output") else out


# ----------------------------------------------------------------------------------------- loss weights
def target_weights(
    tok, ex: dict[str, Any], anchor_weight: float, decision_weight: float | None = None
) -> torch.Tensor:
    """Per-target-token loss weights: `anchor_weight` on tokens overlapping an anchor span or the answer,
    `decision_weight` (default `anchor_weight`) on the words where the reasoning branches (`decisions`)."""
    text = ex["rationale"]
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = [(a["start"], a["end"], anchor_weight) for a in ex["anchors"]]
    dw = anchor_weight if decision_weight is None else decision_weight
    spans += [(d["start"], d["end"], dw) for d in ex.get("decisions", [])]
    ans_start = text.rfind("Answer:")
    if ans_start >= 0:  # look-up drills have no answer line
        spans.append((ans_start, len(text), anchor_weight))
    base = 0.0 if ex.get("loss_on") == "decisions" else 1.0  # comparison drills: the verdict only
    if base == 0.0:
        spans = [(d["start"], d["end"], dw) for d in ex.get("decisions", [])]
    w = [max([base] + [v for s2, e2, v in spans if s < e2 and e > s2]) for s, e in enc["offset_mapping"]]
    return torch.tensor(w + [base])  # + <|im_end|>


def lm_batch(
    examples: list[dict[str, Any]],
    tok,
    proc,
    anchor_weight: float,
    items: list[dict[str, Any]] | None = None,
    decision_weight: float | None = None,
) -> dict[str, torch.Tensor]:
    if items is None:
        items = [encode(ex, tok, proc, target=ex["rationale"]) for ex in examples]
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
    """One training batch as two micro-batches of similar length, cut where the padded token count is least.
    A multi-step example is ~155 tokens, the others ~90: padded together, a third of the compute is padding."""
    items = [encode(ex, tok, proc, target=ex["rationale"]) for ex in examples]
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
def family_for(cfg: Config, i: int) -> str | None:
    """Family of example `i` of the teacher's stream: drawn by `embedded.family_weights` (a pure function of
    `i`, so a resumed build sees the same stream), or None (the benchmark's own rotation) without weights."""
    w = cfg.embedded.family_weights
    if not w:
        return None
    return random.Random(f"family:{i}").choices(cfg.data.families, weights=w)[0]


def _lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


def build_teacher(cfg: Config, progress: bool = True, force: bool = False) -> Path:
    """Train (or reuse from cache) the embedded teacher; returns its folder. Resumes a killed build."""
    from tqdm.auto import tqdm
    from transformers import Qwen2VLForConditionalGeneration

    from vskip_core.runtime import atomic_write_json, resolve_device, seed_everything

    out = embedded_dir(cfg)
    if (out / "config.json").exists() and not force:
        return out
    work = out.with_name(out.name + ".building")
    work.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.runtime.seed)
    device = resolve_device(cfg.runtime.device)
    e = cfg.embedded
    t_start = time.time()

    tok_dir = work / "tokenizer"
    if (tok_dir / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tok_dir)
    else:
        tok = train_tokenizer(tokenizer_corpus(cfg), e.vocab_size)
        tok.save_pretrained(tok_dir)
    proc = image_processor_for(cfg)
    model = Qwen2VLForConditionalGeneration(embedded_config(cfg, tok)).to(device)
    n_cells = cfg.data.grid**2
    if e.probe_tied:
        probe = VisionProbe(e.hidden_size, n_cells, model.get_input_embeddings(), probe_words(tok)).to(device)
    else:
        probe = VisionProbe(e.hidden_size, n_cells).to(device)

    vis_params = list(model.model.visual.parameters())
    vis_ids = {id(p) for p in vis_params}
    lm_params = [p for p in model.parameters() if id(p) not in vis_ids]
    opt_v = torch.optim.AdamW(vis_params + list(probe.parameters()), lr=e.pretrain_lr, weight_decay=0.01)
    opt = torch.optim.AdamW(
        [
            {"params": lm_params, "lr": e.lr},
            {"params": vis_params + list(probe.parameters()), "lr": e.lr * e.vision_lr_mult},
        ],
        lr=e.lr,
        betas=(0.9, 0.98),
        weight_decay=0.01,
    )
    # Phase 3 (the verdict phase, recipe step 5): the language model alone, its own optimizer.
    opt_p = torch.optim.AdamW(lm_params, lr=e.verdict_lr, weight_decay=0.01)
    state: dict[str, Any] = {
        "pretrain_step": 0,
        "train_step": 0,
        "verdict_step": 0,
        "history": [],
        "seconds": 0.0,
    }
    ckpt = work / "ckpt.pt"
    if ckpt.exists():
        blob = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(blob["model"])
        probe.load_state_dict(blob["probe"])
        opt_v.load_state_dict(blob["opt_v"])
        opt.load_state_dict(blob["opt"])
        opt_p.load_state_dict(blob["opt_p"])
        state = blob["state"]
        torch.set_rng_state(blob["rng"])

    def save_ckpt() -> None:
        state["seconds"] = state.get("seconds_base", 0.0) + (time.time() - t_start)
        blob = {
            "model": model.state_dict(),
            "probe": probe.state_dict(),
            "opt_v": opt_v.state_dict(),
            "opt": opt.state_dict(),
            "opt_p": opt_p.state_dict(),
            "state": state,
            "rng": torch.get_rng_state(),
        }
        torch.save(blob, work / "ckpt.pt.tmp")
        (work / "ckpt.pt.tmp").replace(ckpt)

    state["seconds_base"] = state.get("seconds", 0.0)
    model.train()
    # Phase 1: vision pretraining on dense per-token labels.
    bar = tqdm(
        total=e.pretrain_steps,
        initial=state["pretrain_step"],
        desc="vision pretraining",
        disable=not progress,
    )
    while state["pretrain_step"] < e.pretrain_steps:
        step = state["pretrain_step"]
        exs = [make_example(cfg, "teacher", step * e.batch_size + j) for j in range(e.batch_size)]
        vis = proc(images=[x["image"] for x in exs], return_tensors="pt")
        feats = visual_features(model, vis["pixel_values"].to(device), vis["image_grid_thw"].to(device))
        labels = [token_labels(x["scene"], cfg.data.image_size) for x in exs]
        logits = probe(feats)
        loss = sum(
            F.cross_entropy(logits[k], torch.cat([lab[k] for lab in labels]).to(device)) for k in logits
        )
        for g in opt_v.param_groups:
            g["lr"] = e.pretrain_lr * _lr(step, e.pretrain_steps, min(50, e.warmup_steps))
        opt_v.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vis_params, 1.0)
        opt_v.step()
        with torch.no_grad():
            acc = {
                k: (logits[k].argmax(-1).cpu() == torch.cat([lab[k] for lab in labels])).float().mean().item()
                for k in logits
            }
        state["history"].append(
            {"phase": "vision", "step": step, "loss": loss.item(), **{f"acc_{k}": v for k, v in acc.items()}}
        )
        state["pretrain_step"] += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", digits=f"{acc['d2']:.2f}")
        if state["pretrain_step"] % CKPT_EVERY == 0:
            save_ckpt()
    bar.close()

    # Phase 2: end to end. The first `drill_steps` steps train on short look-up drills ("Describe the
    # triangle." -> "The triangle is a small red triangle with the price $4.57, ..."), the rest on full
    # question -> rationale + answer examples; one optimizer and one lr schedule over both.
    offset = 5_000_000  # stream indices disjoint from phase 1
    total = e.drill_steps + e.train_steps
    bar = tqdm(total=total, initial=state["train_step"], desc="end-to-end", disable=not progress)
    captured: dict[str, torch.Tensor] = {}  # the merged visual tokens of the current step, for the probe loss
    hook = model.model.visual.register_forward_hook(
        lambda _m, _i, out: captured.__setitem__("feats", getattr(out, "pooler_output", out))
    )
    while state["train_step"] < total:
        step = state["train_step"]
        drill = step < e.drill_steps
        if drill:
            n = e.drill_batch_size
            exs = [make_lookup_drill(cfg, "teacher", step * n + j) for j in range(n)]
        else:
            k, n = step - e.drill_steps, e.batch_size
            exs = [
                make_example(cfg, "teacher", i, family_for(cfg, i))
                for i in range(offset + k * n, offset + k * n + n)
            ]
        f = _lr(step, total, e.warmup_steps)
        opt.param_groups[0]["lr"] = e.lr * f
        opt.param_groups[1]["lr"] = e.lr * e.vision_lr_mult * f
        opt.zero_grad(set_to_none=True)
        parts = length_buckets(exs, tok, proc, e.anchor_weight, e.decision_weight)
        denom = sum(b["weights"][:, 1:].sum() for _, b in parts)
        lm_total, probe_total = 0.0, 0.0
        for part, batch in parts:  # gradient accumulation over the micro-batches: the loss of the whole batch
            res = model(**{k: batch[k].to(device) for k in LM_INPUTS})
            lm_loss = weighted_lm_loss(
                res.logits, batch["labels"].to(device), batch["weights"].to(device), denom
            )
            probe_loss = torch.zeros((), device=device)
            if e.probe_weight > 0:  # keep the dense scene labels decodable from the visual tokens
                labels = [token_labels(x["scene"], cfg.data.image_size) for x in part]
                logits = probe(captured["feats"])
                probe_loss = sum(
                    F.cross_entropy(logits[k], torch.cat([lab[k] for lab in labels]).to(device))
                    for k in logits
                ) * (len(part) / len(exs))
            (lm_loss + e.probe_weight * probe_loss).backward()
            lm_total += lm_loss.item()
            probe_total += probe_loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        state["history"].append(
            {
                "phase": "drill" if drill else "lm",
                "step": step,
                "loss": lm_total,
                "probe_loss": probe_total,
                "lr": e.lr * f,
            }
        )
        state["train_step"] += 1
        bar.update(1)
        bar.set_postfix(loss=f"{lm_total:.3f}", phase="drill" if drill else "full")
        if state["train_step"] % CKPT_EVERY == 0:
            save_ckpt()
    bar.close()
    hook.remove()

    # Phase 3: the verdict phase. After phase 2 the teacher writes "It is blue; we need blue:" and then
    # "different" about one time in five: it takes the verdict from weaker cues (the image, the question) and
    # never learned to compare the two words (on blank images it says "different" to all 36 colour pairs).
    # Comparison drills on blank images leave the two words as the only cue; mixed with full examples, at a
    # low lr decaying to a tenth, with the vision tower frozen. Mixed into phase 2 at its lr, the same drills
    # taught nothing (blank pairs still all one verdict, existence F1 0.42; README, teacher).
    bar = tqdm(total=e.verdict_steps, initial=state["verdict_step"], desc="verdict", disable=not progress)
    for p in vis_params:
        p.requires_grad_(False)
    offset_v = 7_000_000  # full examples of the teacher stream not seen in phase 2
    while state["verdict_step"] < e.verdict_steps:
        step = state["verdict_step"]
        nc, nf = e.verdict_compare, e.verdict_full
        exs = [make_compare_drill(cfg, "teacher", step * nc + j, blank=e.verdict_blank) for j in range(nc)]
        exs += [
            make_example(cfg, "teacher", i, family_for(cfg, i))
            for i in range(offset_v + step * nf, offset_v + (step + 1) * nf)
        ]
        opt_p.zero_grad(set_to_none=True)
        parts = length_buckets(exs, tok, proc, e.anchor_weight, e.decision_weight)
        denom = sum(b["weights"][:, 1:].sum() for _, b in parts)
        lm_total = 0.0
        for _, batch in parts:
            res = model(**{k: batch[k].to(device) for k in LM_INPUTS})
            loss = weighted_lm_loss(
                res.logits, batch["labels"].to(device), batch["weights"].to(device), denom
            )
            loss.backward()
            lm_total += loss.item()
        torch.nn.utils.clip_grad_norm_(lm_params, 1.0)
        lr_v = e.verdict_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step + 1) / e.verdict_steps)))
        for g in opt_p.param_groups:
            g["lr"] = lr_v
        opt_p.step()
        state["history"].append({"phase": "verdict", "step": step, "loss": lm_total, "lr": lr_v})
        state["verdict_step"] += 1
        bar.update(1)
        bar.set_postfix(loss=f"{lm_total:.3f}")
        if state["verdict_step"] % CKPT_EVERY == 0:
            save_ckpt()
    bar.close()
    for p in vis_params:
        p.requires_grad_(True)

    model.eval()
    seconds = state.get("seconds_base", 0.0) + (time.time() - t_start)
    final = out.with_name(out.name + ".final")
    if final.exists():
        shutil.rmtree(final)
    save_model(
        model,
        tok,
        proc,
        final,
        extra={
            "build_seconds": seconds,
            "config_hash": cfg.hash("embedded", "data"),
            "embedded": cfg.to_dict()["embedded"],
            "data": cfg.to_dict()["data"],
        },
    )
    atomic_write_json(final / "history.json", state["history"])
    final.rename(out)
    shutil.rmtree(work, ignore_errors=True)
    return out


def build_info(path: Path) -> dict[str, Any]:
    return json.loads((path / "vskip_build.json").read_text())


def history(path: Path) -> list[dict[str, Any]]:
    return json.loads((path / "history.json").read_text())


def evaluate_teacher(
    cfg: Config, loaded, n_per_family: int, blank: bool = False, progress: bool = True, split: str = "test"
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Greedy full-rationale generation on `n_per_family` held-out examples per family (per source on the real
    benchmarks; at most the split), with the real images or blank ones (same background, no objects; grey for
    real images). Returns (family metrics, per-example records)."""
    from vskip_core.data.real import examples as benchmark_examples
    from vskip_core.method.scoring import blank_image
    from vskip_core.metrics import family_metrics, score_example
    from vskip_core.modeling.decoding import generate

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
        blank_images=blanks,
        progress=progress,
        desc="blank-image eval" if blank else "eval",
        repetition_penalty=cfg.generation.repetition_penalty,
    )
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


def load_teacher(cfg: Config, progress: bool = True):
    """The teacher as a `models.Loaded`: the embedded one (built first if needed, cached) or the configured hub
    checkpoint / local folder / stand-in."""
    from vskip_core.modeling.loading import load_model

    if cfg.model.teacher == "embedded":
        build_teacher(cfg, progress=progress)
    return load_model(cfg)
