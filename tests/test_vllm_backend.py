"""Stage 01's optional vLLM backend against a fake `vllm` module (vLLM needs a GPU): the engine gets the HF path's
image cap, each prompt gets exactly the images `adapters.interleave` puts in it, in its order, and the sampling
params are the HF decode's; Llama-3.2-Vision is refused up front."""

import sys
import types

import pytest
from PIL import Image

from vskip_core.config import load_params
from vskip_core.data.embedded import make_example
from vskip_core.modeling import adapters as A
from vskip_core.modeling.decoding import params_decoding_config
from vskip_core.stages import generation as G


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    cfg = load_params("params/smoke.yaml")
    texts = [e["question"] + " " + e["rationale"] for e in (make_example(cfg, "train", i) for i in range(80))]
    out = {}
    for fam in ("qwen2_vl", "mllama"):
        d = tmp_path_factory.mktemp(fam)
        A.build_tiny(fam, texts, path=d)
        out[fam] = d
    return out


@pytest.fixture
def fake_vllm(monkeypatch):
    """A `vllm` module that records what the backend hands it."""
    seen: dict = {"llm": [], "generate": []}

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    class LLM:
        def __init__(self, **kw):
            seen["llm"].append(kw)

        def generate(self, prompts, sampling_params, use_tqdm=True):
            seen["generate"].append((prompts, sampling_params))
            done = types.SimpleNamespace(token_ids=[5, 6, 7])
            return [types.SimpleNamespace(outputs=[done]) for _ in prompts]

    mod = types.ModuleType("vllm")
    mod.LLM, mod.SamplingParams = LLM, SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setattr(G, "_VLLM", {})
    return seen


def _cfg(path, **sets):
    return load_params(
        "params/smoke.yaml",
        {
            "model.teacher": str(path),
            "model.max_image_tokens": 256,
            "generation.repetition_penalty": 1.05,
            "generation.max_new_tokens": 33,
            **sets,
        },
    )


def _multi_image_example(cfg):
    ex = make_example(cfg, "test", 5)
    a, b, c = ex["image"], Image.new("RGB", (112, 56), (200, 30, 30)), Image.new("RGB", (56, 56), (0, 0, 255))
    return dict(
        ex,
        question="Is <image 2> brighter than <image 1>? Look again at <image 2>.",
        images=[a, b, c],  # image 3 is never referenced
    )


def test_vllm_gets_the_interleaved_images_the_cap_and_the_hf_decode(tiny_dirs, fake_vllm):
    cfg = _cfg(tiny_dirs["qwen2_vl"])
    exs = [_multi_image_example(cfg), make_example(cfg, "test", 1)]
    recs = G.generate_vllm(cfg, exs)
    assert [r["token_ids"] for r in recs] == [[5, 6, 7]] * 2 and all("time_s" in r for r in recs)

    (llm_kw,) = fake_vllm["llm"]
    assert llm_kw["mm_processor_kwargs"] == {"max_pixels": 256 * 28 * 28}  # the HF path's cap
    assert llm_kw["generation_config"] == "vllm"  # the checkpoint's generation_config.json plays no part

    (prompts, sp), *_ = fake_vllm["generate"]
    for ex, p in zip(exs, prompts):
        _, want = A.interleave(ex, cfg.generation.instruction)
        got = p["multi_modal_data"]["image"]
        assert len(got) == len(want) and all(g is w for g, w in zip(got, want)), ex["id"]
        assert p["prompt"].count("<|vision_start|><|image_pad|><|vision_end|>") == len(want)
    assert len(prompts[0]["multi_modal_data"]["image"]) == 2  # referenced images only, in reference order
    assert prompts[0]["multi_modal_data"]["image"][0] is exs[0]["images"][1]

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dirs["qwen2_vl"])
    dec = params_decoding_config(cfg)
    assert sp.kw["temperature"] == 0.0 and sp.kw["top_p"] == 1.0 and sp.kw["top_k"] in (0, -1)
    assert sp.kw["max_tokens"] == dec["max_new_tokens"] == 33
    assert sp.kw["repetition_penalty"] == dec["repetition_penalty"] == 1.05
    assert sp.kw["stop_token_ids"] == [tok.convert_tokens_to_ids("<|im_end|>")]


def test_vllm_engine_is_rebuilt_when_the_cap_changes(tiny_dirs, fake_vllm):
    ex = [make_example(load_params("params/smoke.yaml"), "test", 1)]
    G.generate_vllm(_cfg(tiny_dirs["qwen2_vl"]), ex)
    G.generate_vllm(_cfg(tiny_dirs["qwen2_vl"]), ex)
    G.generate_vllm(_cfg(tiny_dirs["qwen2_vl"], **{"model.max_image_tokens": 64}), ex)
    assert [k["mm_processor_kwargs"]["max_pixels"] for k in fake_vllm["llm"]] == [256 * 784, 64 * 784]


def test_vllm_refuses_llama_vision_up_front(tiny_dirs, fake_vllm, monkeypatch):
    cfg = _cfg(tiny_dirs["mllama"])
    ex = [make_example(cfg, "test", 1)]
    with pytest.raises(ValueError, match="transformers backend"):
        G.generate_vllm(cfg, ex)
    assert fake_vllm["llm"] == []  # no engine was built
    monkeypatch.setitem(
        sys.modules, "vllm", None
    )  # and without vllm installed: the same answer, not "install"
    with pytest.raises(ValueError, match="transformers backend"):
        G.generate_vllm(cfg, ex)


def test_vllm_extra_is_pinned_and_colab_never_installs_it():
    """The extra names the one vLLM release that resolves beside the project's torch/transformers pins, and no
    Colab cell installs vLLM (any vLLM install replaces the runtime's CUDA torch with the one vLLM pins)."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["vllm"] == ["vllm==0.30.0"]
    colab = (root / "docs" / "COLAB.md").read_text()
    assert not [line for line in colab.splitlines() if line.lstrip().startswith("!") and "vllm" in line]
