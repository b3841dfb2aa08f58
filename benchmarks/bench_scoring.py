"""Scoring benchmark: peak memory and time of the hooked visual-anchoring capture against the naive
`output_attentions=True` path, with a plain forward as the floor. Writes `results/bench/scoring.json`.

    .venv/bin/python benchmarks/bench_scoring.py [--lengths 256 1024 2048] [--repeats 5] [--threads 1]

**Model and sequences.** A Qwen2VLForConditionalGeneration with the embedded teacher's default architecture
(4 decoder layers, hidden 256, 8 heads, 4 key/value heads, vocabulary 640; vision depth 4, one 112 px image =
16 image tokens), random weights (timing and memory do not depend on training), built from its config. One
sequence per length T (batch 1): a 42-token prompt (4 text tokens, the image as 18 tokens with its start/end
markers, 20 text tokens), then T - 42 "rationale" tokens: every rationale row is a query row of the capture,
the worst case. Every method gets the same model and sequence.

**Methods** (key layers = the default band: layers 1 and 2 of 4; heads reduced by max):
- `plain`: `model(**inputs)`, sdpa attention, no scores: the floor.
- `hooked`: `vskip_core.method.scoring.teacher_forced_scores` on the sdpa model: the full scoring pass (surprisal of
  every rationale token + anchoring captured on the key layers).
- `naive`: eager model, `output_attentions=True`, then the same rows / image columns of the key layers
  (`naive_anchor_maps`) and the same reduction.
- `hooked_eager` (extra): the hooked path on an eager model (what a model loaded for notebook 00 would use).
- `hooked_all`: what stage 02 captures per pass: every candidate layer (all 4), both query rows (`both`), so the
  key layers can be chosen afterwards. Stage 02 runs it twice per rationale (the image, then a blank image).

**How memory is measured.** tracemalloc does not see torch's allocations, so each (method, length) runs in a
fresh subprocess: build the model and inputs, run the method once on a short sequence (lazy initialisation of
kernels and thread pools), then read the process's peak resident set size (`ru_maxrss`, a high-water mark),
run the method once at length T and read it again. The difference is the extra resident memory the call
needed at its peak (activations, attention maps, captured rows), in MiB. Memory freed and reused by the
allocator does not count twice; the warm-up at 64 tokens leaves at most a few MiB of reusable pages.

**How time is measured.** One more subprocess per length builds every method, calls each once (warm-up), then
runs `--repeats` rounds calling the methods in turn (interleaved, so load changes hit all alike); wall clock
(`time.perf_counter`), the median per method reported. On a few shared cores torch's spin-waiting threads
oversubscribe them, so the default is one torch thread per measurement (`--threads 0` = torch's default). Absolute times stay noisy under load; the ratios are the figures to read. The naive memory
subprocess also runs the hooked path once and reports the largest difference between the two (they must
agree).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT_TOKENS = 42  # 4 text tokens, <vision_start>, 16 image tokens, <vision_end>, 20 text tokens
VOCAB = 640
IMAGE, V_START, V_END, VIDEO, PAD, EOS = 5, 3, 4, 6, 0, 2
KEY_LAYERS = [1, 2]
ALL_LAYERS = [0, 1, 2, 3]  # what stage 02 captures: every candidate layer, the key layers chosen afterwards


def build_model(attn: str):
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = {
        "vocab_size": VOCAB,
        "hidden_size": 256,
        "intermediate_size": 768,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 4, 4]},
        "bos_token_id": PAD,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
    }
    vision = {
        "depth": 4,
        "embed_dim": 128,
        "hidden_size": 256,
        "num_heads": 4,
        "mlp_ratio": 4,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    conf = Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=V_START,
        vision_end_token_id=V_END,
        tie_word_embeddings=False,
    )
    conf._attn_implementation = attn
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(conf).eval()


def build_inputs(T: int):
    """One sequence of T tokens: text, <vision_start>, 16 image tokens, <vision_end>, text; the rationale
    is everything after the prompt. Returns (inputs, spans)."""
    import torch

    g = torch.Generator().manual_seed(T)
    n_img = 16  # a 112 px image: grid (1, 8, 8), merge 2 -> 16 tokens
    head = torch.randint(10, VOCAB, (4,), generator=g).tolist()
    ids = head + [V_START] + [IMAGE] * n_img + [V_END]
    ids += torch.randint(10, VOCAB, (T - len(ids),), generator=g).tolist()
    input_ids = torch.tensor([ids])
    start = PROMPT_TOKENS
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": (input_ids == IMAGE).long(),
        "pixel_values": torch.randn(n_img * 4, 3 * 2 * 14 * 14, generator=g),
        "image_grid_thw": torch.tensor([[1, 8, 8]]),
    }
    return inputs, [(start, T - start)]


def method(name: str):
    """(model, call) for a method; call(inputs, spans) runs it once and returns the anchoring (or None)."""
    import torch

    from vskip_core.method import scoring as S

    if name == "plain":
        model = build_model("sdpa")

        def call(inputs, spans):
            with torch.no_grad():
                model(**inputs)

    elif name in ("hooked", "hooked_eager"):
        model = build_model("sdpa" if name == "hooked" else "eager")

        def call(inputs, spans):
            return S.teacher_forced_scores(model, inputs, spans, KEY_LAYERS).anchoring(KEY_LAYERS, "max")[0]

    elif name == "hooked_all":
        model = build_model("sdpa")

        def call(inputs, spans):
            ps = S.teacher_forced_scores(model, inputs, spans, ALL_LAYERS, "both")
            return ps.anchoring(KEY_LAYERS, "max", "predict")[0]

    elif name == "naive":
        model = build_model("eager")

        def call(inputs, spans):
            qi, qv = S.query_rows(spans)
            ki, kv = S.image_key_columns(model, inputs)
            maps = S.naive_anchor_maps(model, inputs, qi, ki, kv, KEY_LAYERS)
            mass = {i: maps[i].sum(-1) for i in KEY_LAYERS}
            return S.reduce_anchoring(mass, KEY_LAYERS, "max")[0].numpy()

    else:
        raise ValueError(f"unknown method {name!r}")
    return model, call


METHODS = ("plain", "hooked", "naive", "hooked_eager", "hooked_all")


def _threads(threads: int) -> None:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)


def measure_memory(name: str, T: int, threads: int) -> dict:
    """In a fresh subprocess: the ru_maxrss rise of one call at T tokens, after a 64-token warm-up. The naive
    run then also runs the hooked (sdpa) path and reports the largest difference between the two."""
    import gc

    import numpy as np

    _threads(threads)
    _, call = method(name)
    warm, warm_spans = build_inputs(64)
    call(warm, warm_spans)
    inputs, spans = build_inputs(T)
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out = call(inputs, spans)
    res = {"peak_mem_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}
    if name == "naive":  # the two paths must agree: the hooked path on the sdpa model (same weights)
        from vskip_core.method import scoring as S

        sdpa = build_model("sdpa")
        hooked = S.teacher_forced_scores(sdpa, inputs, spans, KEY_LAYERS).anchoring(KEY_LAYERS, "max")[0]
        res["max_abs_diff_hooked_vs_naive"] = float(np.abs(hooked - out).max())
    return res


def measure_time(T: int, repeats: int, threads: int) -> dict:
    """In one subprocess: every method once as warm-up, then `repeats` rounds calling each method in turn
    (interleaved, so a change of load hits all methods alike). Median seconds per method."""
    _threads(threads)
    calls = {m: method(m)[1] for m in METHODS}
    inputs, spans = build_inputs(T)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for m in METHODS:
        calls[m](inputs, spans)
    for _ in range(repeats):
        for m in METHODS:
            t0 = time.perf_counter()
            calls[m](inputs, spans)
            times[m].append(time.perf_counter() - t0)
    return {"time_s": {m: statistics.median(v) for m, v in times.items()}, "times_s": times}


def run_child(*args: str) -> dict:
    cmd = [sys.executable, __file__, "--child", *args]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run; 0 = torch's default")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench" / "scoring.json"))
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "memory":
            res = measure_memory(rest[0], int(rest[1]), int(rest[2]))
        else:
            res = measure_time(int(rest[0]), int(rest[1]), int(rest[2]))
        print(json.dumps(res))
        return

    import torch

    from vskip_core.runtime import atomic_write_json, environment

    lengths = {}
    t_start = time.time()
    for T in args.lengths:
        mem = {m: run_child("memory", m, str(T), str(args.threads)) for m in METHODS}
        tim = run_child("time", str(T), str(args.repeats), str(args.threads))
        hooked = ("naive", "hooked", "hooked_eager", "hooked_all")
        row = {f"peak_mem_{m}_mb": mem[m]["peak_mem_mb"] for m in hooked}
        row["peak_mem_plain_forward_mb"] = mem["plain"]["peak_mem_mb"]
        row.update({f"time_{m}_s": tim["time_s"][m] for m in hooked})
        row["time_plain_forward_s"] = tim["time_s"]["plain"]
        row["mem_ratio_naive_over_hooked_all"] = row["peak_mem_naive_mb"] / max(
            row["peak_mem_hooked_all_mb"], 1e-9
        )
        row["time_ratio_hooked_all_over_plain"] = row["time_hooked_all_s"] / row["time_plain_forward_s"]
        row["mem_ratio_naive_over_hooked"] = row["peak_mem_naive_mb"] / max(row["peak_mem_hooked_mb"], 1e-9)
        row["time_ratio_hooked_over_plain"] = row["time_hooked_s"] / row["time_plain_forward_s"]
        row["time_ratio_naive_over_plain"] = row["time_naive_s"] / row["time_plain_forward_s"]
        row["time_ratio_naive_over_hooked"] = row["time_naive_s"] / row["time_hooked_s"]
        row["max_abs_diff_hooked_vs_naive"] = mem["naive"]["max_abs_diff_hooked_vs_naive"]
        row["all_times_s"] = tim["times_s"]
        lengths[str(T)] = row
        print(
            f"T={T:5d}  peak MiB naive {row['peak_mem_naive_mb']:8.1f}  "
            f"hooked {row['peak_mem_hooked_mb']:7.1f} (x{row['mem_ratio_naive_over_hooked']:.1f} less)  "
            f"plain {row['peak_mem_plain_forward_mb']:7.1f} | time s naive {row['time_naive_s']:.3f}  "
            f"hooked {row['time_hooked_s']:.3f}  plain {row['time_plain_forward_s']:.3f}  "
            f"(hooked/plain x{row['time_ratio_hooked_over_plain']:.2f}) "
            f"| max diff {row['max_abs_diff_hooked_vs_naive']:.1e} | stage 02's capture (all layers, both rows): "
            f"{row['peak_mem_hooked_all_mb']:.1f} MiB (x{row['mem_ratio_naive_over_hooked_all']:.1f} less), "
            f"x{row['time_ratio_hooked_all_over_plain']:.2f} the plain forward",
            flush=True,
        )
    longest = lengths[str(max(args.lengths))]
    result = {
        "benchmark": "scoring: hooked visual-anchoring capture vs output_attentions",
        "lengths": lengths,
        "goal": {
            "at_tokens": max(args.lengths),
            "mem_ratio_naive_over_hooked_min": 10.0,
            "time_ratio_hooked_over_plain_max": 1.5,
            "mem_met": longest["mem_ratio_naive_over_hooked"] >= 10.0,
            "time_met": longest["time_ratio_hooked_over_plain"] <= 1.5,
            "stage02_mem_met": longest["mem_ratio_naive_over_hooked_all"] >= 10.0,
            "stage02_time_met": longest["time_ratio_hooked_all_over_plain"] <= 1.5,
        },
        "setup": {
            "model": "Qwen2VLForConditionalGeneration: 4 layers, hidden 256, 8 heads / 4 kv, random weights",
            "batch": 1,
            "image_tokens": 16,
            "query_rows": "every token after the 42-token prompt",
            "key_layers": KEY_LAYERS,
            "head_reduce": "max",
            "repeats": args.repeats,
            "threads": args.threads or torch.get_num_threads(),
            "memory": "ru_maxrss rise of one call in a fresh subprocess after a 64-token warm-up",
            "time": "median wall clock over interleaved rounds of all methods in one subprocess",
            "note": "2 CPU cores shared with other jobs while measured: absolute times are noisy",
        },
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "env": {
            k: v for k, v in environment().items() if k in ("versions", "git", "device", "torch_threads")
        },
        "load_average_at_end": os.getloadavg(),
        "seconds": time.time() - t_start,
    }
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
