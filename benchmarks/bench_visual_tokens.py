"""Visual-token pruning benchmark: prefill time and decode time per token against retention, for every method of
`vskip_core.method.pruning` with and without DSTP, on images with enough visual tokens to matter. Writes
`results/bench/visual_tokens.json`.

    .venv/bin/python benchmarks/bench_visual_tokens.py [--jobs embedded@448 embedded@896 qwen2_vl@448
        qwen2_5_vl@448] [--size 448] [--repeats 5] [--new-tokens 32] [--examples 1] [--threads 1]

**Models** (random weights: time does not depend on training; the embedded teacher was trained at 112 px, so
its answers at 448 px would mean nothing anyway, and the decode length is fixed by ignoring the end token):
- `embedded`: a Qwen2VLForConditionalGeneration with the embedded teacher's default architecture (params file's
  `embedded` section: 4 decoder layers, hidden 256, 8 heads, 4 key/value heads; vision depth 4).
- `qwen2_vl`, `qwen2_5_vl`: small models of the two real classes built from config through
  `vskip_core.modeling.adapters` (`tiny_config`: 8 decoder layers, hidden 512, 8 heads, 2 key/value heads, vision depth 2).
  Qwen2.5-VL differs in its windowed vision tower and its rotary index code; the language model is the same.
- Llama-3.2-Vision (Mllama) is not measured: its image is read through cross-attention layers, not tokens in
  the sequence, so these pruners (and position-preserving DSTP swaps) do not apply (vskip_core.method.pruning).

**Inputs.** Benchmark examples (test split) rendered at the job's size in px (448 -> a 32x32 patch grid -> 256
visual tokens after the 2x2 merge; 896 -> 1024) through the project's own encoder (`encode` + `collate`),
batch 1. Default jobs: the embedded architecture at S and 2S px, the two real classes at S px, where S =
`--size` (448).

**Settings.** `unpruned`, then each method (FastV K = `prune.fastv_layer`, DivPrune, prompt-aware) at each
retention of `prune.retentions`, in the `drop` variant (the sequence and KV cache really shorten), with and
without DSTP (`prune.dstp_interval`, `prune.dstp_shift_threshold`; its prefill is full length by design, see the
module docstring), plus the `mask` variant of each method at the middle retention (masking only: no saving
expected).

**Timing.** One warm-up call per setting, then `--repeats` rounds; in each round every setting runs once on each
of `--examples` examples (interleaved, so load changes hit all alike). Wall clock (`time.perf_counter`) inside
`pruned_generate`: `prefill_s` = vision tower + selection + language-model prefill up to the first token;
`lm_prefill_s` = the language-model part alone; `decode_s_per_token` = the rest over the decoded steps.
Medians over all rounds and examples (also the minima, `*_min`, the figure least disturbed by other jobs on a
shared machine; `*_ratio_min` compares minima). One torch thread by default: more threads spin-wait against other
jobs on a shared machine.

**Ratios.** `*_ratio` = setting / unpruned (medians); `dstp_decode_overhead` / `dstp_prefill_overhead` = host +
DSTP / the host alone at the same retention (DSTP's own cost). Ideals: `ideal_visual` = the retained fraction of visual tokens
(k / n); `ideal_seq_prefill` = kept prompt tokens / all prompt tokens, averaged over decoder layers (FastV keeps
everything in layers < K); `ideal_seq_decode` = the same for the KV length at the midpoint of decoding.
`closeness_*` = achieved saving / ideal saving = (1 - ratio) / (1 - ideal), 1.0 = ideal. The ideals are linear in
the tokens kept; prefill attention is quadratic in the sequence length, so a prefill saving can beat them
(closeness > 1) once attention dominates (long prompts); decoding also pays a fixed cost per token (weights,
per-layer overhead) that no pruning removes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from vskip_core.config import load_params  # noqa: E402
from vskip_core.method import pruning as vt  # noqa: E402

TINY = {"hidden": 512, "layers": 8, "heads": 8, "kv_heads": 2, "vision_depth": 2, "vision_dim": 64}
MLLAMA_NOTE = (
    "not measured: Llama-3.2-Vision reads the image through cross-attention layers (no visual tokens in the "
    "sequence, no positions), so FastV's layer-K token drop and position-preserving DSTP swaps do not apply"
)


def build(cfg, name: str):
    """(model, tokenizer) with random weights."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    from vskip_core.modeling.adapters import VISION_ATTENTION, get_adapter
    from vskip_core.modeling.loading import embedded_config, train_tokenizer
    from vskip_core.teacher import tokenizer_corpus

    tok = train_tokenizer(tokenizer_corpus(cfg, n=300), cfg.embedded.vocab_size)
    torch.manual_seed(0)
    if name == "embedded":
        conf, cls = embedded_config(cfg, tok), Qwen2VLForConditionalGeneration
    else:
        conf = get_adapter(name).tiny_config(tok, **TINY)
        cls = Qwen2VLForConditionalGeneration if name == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration
    # as the project's loader does: eager language model (attention maps), sdpa vision tower
    attn = {"": "eager", "text_config": "eager", "vision_config": VISION_ATTENTION}
    model = cls._from_config(conf, attn_implementation=attn)
    return model.eval(), tok


def batches(cfg, tok, image_size: int, n: int):
    from vskip_core.data.embedded import make_example
    from vskip_core.modeling.loading import collate, encode, image_processor_for

    big = load_params(cfg.source, {"data.image_size": image_size})
    proc = image_processor_for(big)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    out = []
    for i in range(n):
        b = collate([encode(make_example(big, "test", i), tok, proc)], tok.pad_token_id)
        b["prompt_mask"] = vt.user_text_mask(b["input_ids"], tok.convert_tokens_to_ids("<|vision_end|>"), end)
        out.append(b)
    return out


def settings(cfg) -> list[tuple[str, vt.PruneSpec]]:
    mid = sorted(cfg.prune.retentions)[len(cfg.prune.retentions) // 2]
    out = [("unpruned", vt.PruneSpec.from_config(cfg, "none", 1.0, variant="drop"))]
    for m in cfg.prune.methods:
        for dstp in (False, True):
            for r in cfg.prune.retentions:
                out.append(
                    (f"{m}{'+dstp' if dstp else ''}", vt.PruneSpec.from_config(cfg, m, r, dstp, "drop"))
                )
        out.append((f"{m} (mask)", vt.PruneSpec.from_config(cfg, m, mid, False, "mask")))
    return out


def run_once(model, tok, batch, spec, new_tokens: int) -> dict[str, float]:
    inputs = {
        k: batch[k]
        for k in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")
    }
    res = vt.pruned_generate(
        model,
        inputs,
        spec,
        new_tokens,
        None,
        tok.pad_token_id,
        prompt_mask=batch["prompt_mask"],
        ignore_eos=True,
    )
    t = res.timings
    return {
        "prefill_s": t["prefill_s"],
        "lm_prefill_s": t["lm_prefill_s"],
        "vision_s": t["vision_s"],
        "decode_s_per_token": t["decode_s"] / max(1, t["decode_steps"]),
        "visual_tokens": res.visual_tokens,
        "n_visual": res.n_visual,
        "k": res.kept.shape[1],
        "swapped_in": statistics.fmean(res.swapped_in),
        "fastv_layer": res.layers["fastv_layer"],
    }


def ideals(spec, k: int, n: int, prompt_len: int, new_tokens: int, n_layers: int, K: int) -> dict[str, float]:
    pruned = 0 if spec.method == "none" else (n_layers - K if spec.method == "fastv" else n_layers)
    dropped = n - k
    seq = (n_layers * prompt_len - pruned * dropped) / (n_layers * prompt_len)
    mid = prompt_len + new_tokens / 2
    dec = (n_layers * mid - pruned * dropped) / (n_layers * mid)
    return {"ideal_visual": k / n, "ideal_seq_prefill": seq, "ideal_seq_decode": dec}


def closeness(ratio: float, ideal: float) -> float | None:
    return (1 - ratio) / (1 - ideal) if ideal < 1 else None


def bench_model(cfg, name: str, image_size: int, args) -> dict:
    model, tok = build(cfg, name)
    data = batches(cfg, tok, image_size, args.examples)
    sets = settings(cfg)
    for _, spec in sets:  # warm-up
        run_once(model, tok, data[0], spec, 4)
    times: dict[int, list[dict[str, float]]] = {i: [] for i in range(len(sets))}
    t0 = time.time()
    for _ in range(args.repeats):
        for i, (_, spec) in enumerate(sets):
            for b in data:
                times[i].append(run_once(model, tok, b, spec, args.new_tokens))
    n_layers = model.config.text_config.num_hidden_layers
    prompt_len = int(data[0]["input_ids"].shape[1])
    rows = []
    for i, (label, spec) in enumerate(sets):
        ts = times[i]
        row = {"setting": label, "method": spec.name, "variant": spec.variant, "retention": spec.retention}
        for key in ("prefill_s", "lm_prefill_s", "vision_s", "decode_s_per_token"):
            row[key] = statistics.median(t[key] for t in ts)
            row[key + "_min"] = min(t[key] for t in ts)
        row.update({k: ts[0][k] for k in ("k", "n_visual", "visual_tokens")})
        row["swapped_in_per_run"] = statistics.fmean(t["swapped_in"] for t in ts)
        row.update(
            ideals(
                spec, row["k"], row["n_visual"], prompt_len, args.new_tokens, n_layers, ts[0]["fastv_layer"]
            )
        )
        rows.append(row)
    base = rows[0]
    for r in rows:
        for key in ("prefill_s", "lm_prefill_s", "decode_s_per_token"):
            name = key.replace("_s", "").replace("_per_token", "")
            r[name + "_ratio"] = r[key] / base[key]
            r[name + "_ratio_min"] = r[key + "_min"] / base[key + "_min"]
        r["closeness_lm_prefill_visual"] = closeness(r["lm_prefill_ratio"], r["ideal_visual"])
        r["closeness_lm_prefill_seq"] = closeness(r["lm_prefill_ratio"], r["ideal_seq_prefill"])
        r["closeness_decode_visual"] = closeness(r["decode_ratio"], r["ideal_visual"])
        r["closeness_decode_seq"] = closeness(r["decode_ratio"], r["ideal_seq_decode"])
    host = {(r["method"], r["retention"], r["variant"]): r for r in rows}
    for r in rows:  # DSTP's own cost: host + DSTP over the host alone, same retention and variant
        h = host.get((r["method"].removesuffix("+dstp"), r["retention"], r["variant"]))
        if r["method"].endswith("+dstp") and h:
            r["dstp_decode_overhead"] = r["decode_s_per_token"] / h["decode_s_per_token"]
            r["dstp_prefill_overhead"] = r["prefill_s"] / h["prefill_s"]
    params = sum(p.numel() for p in model.parameters())
    return {
        "class": type(model).__name__,
        "image_size": image_size,
        "params_millions": params / 1e6,
        "decoder_layers": n_layers,
        "hidden": model.config.text_config.hidden_size,
        "prompt_tokens": prompt_len,
        "n_visual": rows[0]["n_visual"],
        "runs_per_setting": len(times[0]),
        "seconds": time.time() - t0,
        "rows": rows,
    }


def print_table(name: str, res: dict) -> None:
    print(
        f"\n== {name}: {res['class']} {res['params_millions']:.1f} M params, {res['decoder_layers']} layers, "
        f"{res['n_visual']} visual of {res['prompt_tokens']} prompt tokens, {res['runs_per_setting']} runs/setting"
    )
    head = f"{'setting':20s} {'ret':>6s} {'k':>4s} {'prefill':>8s} {'lm_pref':>8s} {'dec/tok':>8s}"
    head += f" {'pref x':>7s} {'lm x':>6s} {'dec x':>6s} {'lm xmin':>7s} {'dec xmin':>8s}"
    head += f" {'ideal':>6s} {'seq':>6s} {'close(seq)':>10s}"
    head += f" {'dstp dec x':>10s}"
    print(head)
    for r in res["rows"]:
        c, o = r["closeness_lm_prefill_seq"], r.get("dstp_decode_overhead")
        print(
            f"{r['setting']:20s} {r['retention']:6.3f} {r['k']:4d} {r['prefill_s'] * 1e3:7.1f}m "
            f"{r['lm_prefill_s'] * 1e3:7.1f}m {r['decode_s_per_token'] * 1e3:7.2f}m {r['prefill_ratio']:7.3f} "
            f"{r['lm_prefill_ratio']:6.3f} {r['decode_ratio']:6.3f} {r['lm_prefill_ratio_min']:7.3f} "
            f"{r['decode_ratio_min']:8.3f} {r['ideal_visual']:6.3f} "
            f"{r['ideal_seq_prefill']:6.3f} {'' if c is None else f'{c:10.2f}'}"
            f" {'' if o is None else f'{o:10.3f}'}"
        )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params/default.yaml")
    ap.add_argument("--jobs", nargs="+", default=None, help="model@pixels, e.g. embedded@448 qwen2_5_vl@448")
    ap.add_argument("--size", type=int, default=448, help="S px of the default jobs (448: 256 visual tokens)")
    ap.add_argument("--repeats", type=int, default=5, help="rounds per setting (medians reported)")
    ap.add_argument("--new-tokens", type=int, default=32, help="decoded tokens per run (end token ignored)")
    ap.add_argument("--examples", type=int, default=1, help="distinct examples per round")
    ap.add_argument(
        "--threads", type=int, default=-1, help="torch threads; -1 = runtime.num_threads, 0 = default"
    )
    ap.add_argument("--out", default=str(ROOT / "results" / "bench" / "visual_tokens.json"))
    args = ap.parse_args(argv)
    cfg = load_params(args.params)
    size = args.size
    jobs = args.jobs or [f"embedded@{size}", f"embedded@{2 * size}", f"qwen2_vl@{size}", f"qwen2_5_vl@{size}"]
    for j in jobs:
        name, _, px = j.partition("@")
        if name not in ("embedded", "qwen2_vl", "qwen2_5_vl") or not px.isdigit() or int(px) % 28:
            ap.error(
                f"bad job {j!r}: use model@pixels, model in embedded|qwen2_vl|qwen2_5_vl, pixels a multiple of 28"
            )
    threads = cfg.runtime.num_threads if args.threads < 0 else args.threads
    if threads > 0:
        torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = {
        "settings": {
            "params": args.params,
            "jobs": jobs,
            "repeats": args.repeats,
            "examples": args.examples,
            "new_tokens": args.new_tokens,
            "torch_threads": torch.get_num_threads(),
            "prune": cfg.to_dict()["prune"],
            "variant_note": "drop = real shortening; DSTP prefill is full length (masked) by design",
        },
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "load_avg_start": os.getloadavg(),
            "torch": torch.__version__,
        },
        "models": {},
        "mllama": MLLAMA_NOTE,
    }
    for j in jobs:
        name, _, px = j.partition("@")
        res = bench_model(cfg, name, int(px), args)
        out["models"][j] = res
        print_table(j, res)
    out["machine"]["load_avg_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
