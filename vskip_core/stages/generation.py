"""Batched generation with the frozen teacher (or any student), and the resumable rationale writer."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from vskip_core.arguments import parse_sets, parse_shard, stage_parser
from vskip_core.common.artifacts import (  # noqa: F401  (re-exported: notebooks 01-02 read them here)
    example_for,
    is_kept,
    kept_rationales,
    load_rationales,
)
from vskip_core.config import ParamsError, load_params
from vskip_core.data.real import example_at, find_anchors_for
from vskip_core.metrics import score_example
from vskip_core.modeling.adapters import detect_family, get_adapter
from vskip_core.modeling.decoding import generate, params_decoding_config
from vskip_core.runtime import ShardedWriter, results_dir
from vskip_core.runtime import progress as tqdm
from vskip_core.teacher import load_teacher

# ------------------------------------------------------------------------------------- vLLM backend
_VLLM: dict[str, Any] = {}


def generate_vllm(cfg, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stage 01's rationales through vLLM (GPU; a separate install, see docs/COLAB.md), as the transformers path
    makes them: the same prompts (the checkpoint's chat template through the family adapter) with exactly the
    images `adapters.interleave` puts in them, in that order; the same image cap (`model.max_image_tokens`, as
    `mm_processor_kwargs`); the same decoding (`decoding_config` of `generation.*`: greedy = temperature 0, the
    repetition penalty, max_new_tokens, stop at the end-of-turn token) with the checkpoint's
    generation_config.json ignored; the same record fields as `generate`. Llama-3.2-Vision is refused (vLLM does
    not serve it). Scoring stays in transformers, which exposes attention. One engine per process and cap."""

    name, g = cfg.model.teacher, cfg.generation
    if name != "embedded":  # refuse an unservable family before anything is installed or loaded
        ad = get_adapter(detect_family(name, cfg.model.family))
        if ad.not_in_vllm:
            raise ValueError(
                f"{name} is a {ad.family} checkpoint, which vLLM cannot serve ({ad.not_in_vllm}); generate "
                f"its rationales with the transformers backend (drop --backend vllm)"
            )
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        raise ImportError(
            "the vllm backend needs the vllm package (GPU only, its own environment: pip install -e '.[vllm]' "
            "installs vLLM's torch, see docs/COLAB.md); or generate with transformers (drop --backend vllm)"
        ) from None
    if name == "embedded":
        raise ValueError("vLLM serves hub checkpoints; the embedded teacher generates with transformers")
    from transformers import AutoTokenizer

    cap = ad.image_cap(cfg)
    key = (name, tuple(sorted(cap.items())))
    if key not in _VLLM:
        n_img = cfg.data.max_images or 7  # MMMU: up to 7 images per question
        dtype = {"auto": "auto", "bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}
        _VLLM[key] = (
            LLM(
                model=name,
                dtype=dtype.get(cfg.model.dtype, "auto"),
                seed=cfg.runtime.seed,
                limit_mm_per_prompt={"image": n_img},
                mm_processor_kwargs=cap,
                generation_config="vllm",  # vLLM's neutral defaults, not the checkpoint's (eos list included)
            ),
            AutoTokenizer.from_pretrained(name),
        )
    llm, tok = _VLLM[key]
    end = ad.end_token_id(tok)
    dec = params_decoding_config(cfg)
    sp = SamplingParams(
        max_tokens=dec["max_new_tokens"],
        temperature=0.0,  # greedy, as every decode (decoding_config)
        top_p=1.0,
        top_k=-1,  # off
        repetition_penalty=dec["repetition_penalty"],  # transformers' semantics: prompt and output tokens
        stop_token_ids=[end],
        seed=cfg.runtime.seed,
    )
    prompts = []
    for ex in examples:
        messages, images = ad.messages(ex, g.instruction)
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompts.append({"prompt": text, "multi_modal_data": {"image": images}})
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    dt = (time.perf_counter() - t0) / max(1, len(examples))
    res = []
    for o in outs:
        ids = list(o.outputs[0].token_ids)
        ids = ids[: ids.index(end)] if end in ids else ids
        res.append({"text": tok.decode(ids, skip_special_tokens=True), "token_ids": ids, "time_s": dt})
    return res


# ------------------------------------------------------------------------------ rationale generation (01)
def _record(ex: dict[str, Any], gen: dict[str, Any], index: int, split: str) -> dict[str, Any]:

    s = score_example(ex, gen["text"])
    return {
        "id": ex["id"],
        "index": index,
        "split": split,
        "family": ex["family"],
        "rationale": gen["text"],
        "token_ids": gen["token_ids"],
        "parsed_answer": s["parsed"],
        "correct": bool(s["correct"] == 1.0),
        "has_answer_line": not s["unparsed"],
        "time_s": gen["time_s"],
        "anchors": find_anchors_for(gen["text"], ex),
    }


def rationale_shards(cfg, out_dir: str | Path, split: str | None = None, n: int | None = None):
    """Stage 01's shard folder (out_dir/shards/, `shard-NNNNN.jsonl`, shard k = examples k*size ...): its
    fingerprint is what the rationales depend on (generation, data, model and teacher params, split and
    examples), so shards written under other params are discarded."""

    split, n, _ = plan_shards(cfg, split, n)
    fingerprint = f"{cfg.hash('generation', 'data', 'model', 'embedded')}-{split}-{n}"
    return ShardedWriter(Path(out_dir) / "shards", fingerprint, "jsonl")


def generate_rationales(
    cfg,
    loaded,
    out_dir: str | Path,
    split: str | None = None,
    n: int | None = None,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
    on_shard_done=None,
    backend: str = "transformers",
) -> Path:
    """Teacher rationales for examples 0..n-1 of `split`, written in shards of `generation.shard_size`
    (`rationale_shards`). A killed run resumes at the first missing shard: no example lost, none duplicated;
    shards written under other params are discarded. `shard=(i, n)` takes every n-th shard (several
    workers/GPUs), `merge_rationales` joins them. Returns the merged `rationales.jsonl` when every shard
    exists. `backend="vllm"` generates with vLLM from `model.teacher` (a hub id or local folder; `loaded` may
    then be None)."""

    g = cfg.generation
    split, n, n_shards = plan_shards(cfg, split, n)
    if not (0 <= shard[0] < shard[1]):
        raise ValueError(f"shard {shard[0]}/{shard[1]}: need 0 <= i < n (worker i of n)")
    if backend not in ("transformers", "vllm"):
        raise ValueError(f"backend {backend!r}: expected 'transformers' or 'vllm'")
    shards = rationale_shards(cfg, out_dir, split, n)
    mine = [k for k in range(n_shards) if k % shard[1] == shard[0]]
    todo = [k for k in mine if not shards.path(k).exists()]
    bar = tqdm(
        total=sum(min(g.shard_size, n - k * g.shard_size) for k in mine),
        desc=f"rationales ({split})",
        disable=not progress,
    )
    bar.update(sum(min(g.shard_size, n - k * g.shard_size) for k in mine if k not in todo))
    for k in todo:
        idx = list(range(k * g.shard_size, min(n, (k + 1) * g.shard_size)))
        exs = [example_at(cfg, split, i) for i in idx]
        if backend == "vllm":
            gens = generate_vllm(cfg, exs)
            bar.update(len(exs))
        else:
            gens = []
            for s in range(0, len(exs), g.batch_size):
                gens += generate(
                    loaded.model,
                    loaded.tokenizer,
                    loaded.processor,
                    exs[s : s + g.batch_size],
                    g.max_new_tokens,
                    g.batch_size,
                    instruction=g.instruction,
                    repetition_penalty=g.repetition_penalty,
                )
                bar.update(len(exs[s : s + g.batch_size]))
        shards.write([_record(ex, gen, i, split) for ex, gen, i in zip(exs, gens, idx)], key=k)
        if on_shard_done is not None:
            on_shard_done(k)
    bar.close()
    return merge_rationales(cfg, out_dir, split, n)


def plan_shards(cfg, split: str | None = None, n: int | None = None) -> tuple[str, int, int]:
    """(split, examples, shards) that stage 01 writes for these params."""
    g = cfg.generation
    split = split or g.split
    if n is None:
        n = g.n_examples or cfg.split_size(split)
    return split, n, (n + g.shard_size - 1) // g.shard_size


def merge_rationales(cfg, out_dir: str | Path, split: str | None = None, n: int | None = None) -> Path:
    """Join the shards into rationales.jsonl (atomic); raises if a shard is missing (another worker's)."""
    shards = rationale_shards(cfg, out_dir, split, n)
    n_shards = plan_shards(cfg, split, n)[2]
    missing = [k for k in range(n_shards) if not shards.path(k).exists()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {n_shards} shards missing in {shards.dir} (first: "
            f"{missing[0]}); run the other --shard workers, then merge again"
        )
    return shards.merge(Path(out_dir) / "rationales.jsonl", [shards.path(k) for k in range(n_shards)])


def keep_report(cfg, recs: list[dict[str, Any]]):
    """Per family (and in total): rationales generated, non-empty, with an answer line, correct, and kept by
    `is_kept`, with the kept share in percent."""
    import pandas as pd

    rows = [
        {
            "family": r["family"],
            "generated": 1,
            "non-empty": bool(r["token_ids"]),
            "with answer line": bool(r["token_ids"]) and r["has_answer_line"],
            "correct": bool(r["token_ids"]) and r["correct"],
            "kept": is_kept(cfg, r),
        }
        for r in recs
    ]
    table = pd.DataFrame(rows).groupby("family").sum().astype(int)
    table.loc["total"] = table.sum()
    table["kept %"] = (100 * table["kept"] / table["generated"]).round(1)
    return table


def main(argv: list[str] | None = None) -> int:
    """Stage 01 outside the notebook, for several GPUs: each worker writes its shards of the rationales into
    results/<run>/01_rationale_generation/shards/ (one process per GPU, `CUDA_VISIBLE_DEVICES=i`); `--merge`
    joins them. The pipeline (or notebook 01) then finds every shard written and only merges and reports."""

    ap = stage_parser("stages.generation", main.__doc__, workers=True)
    ap.add_argument("--merge", action="store_true", help="only join the shards into rationales.jsonl")
    ap.add_argument("--backend", default="transformers", choices=["transformers", "vllm"])
    a = ap.parse_args(argv)
    try:
        cfg = load_params(a.params, parse_sets(a.set))
        shard = parse_shard(a.shard)
    except (ParamsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = results_dir(cfg, a.run) / "01_rationale_generation"
    _, _, n_shards = plan_shards(cfg)
    try:
        if a.merge:
            path = merge_rationales(cfg, out)
        else:
            loaded = load_teacher(cfg) if a.backend == "transformers" else None
            path = generate_rationales(cfg, loaded, out, shard=shard, backend=a.backend)
    except (ImportError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        if a.merge:
            print(f"error: {e}", file=sys.stderr)
            return 1
        have = len(rationale_shards(cfg, out).shards())
        print(f"worker {a.shard}: done; {have} of {n_shards} shards written under {out / 'shards'}")
        return 0
    print(f"all {n_shards} shards written -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
