"""The model-family registry: a family registered from outside vskip_core (one class, one decorator) is chosen by
`model.family`, loads a checkpoint through the generic loading path, and the plan reads its facts."""

import pytest
import torch

from vskip_core import registry
from vskip_core.config import DataConfig, ParamsError, load_params
from vskip_core.data.embedded import make_example
from vskip_core.infra.plan import KNOWN_CONFIGS, make_plan
from vskip_core.modeling import adapters as A
from vskip_core.modeling.families.qwen2_vl import Qwen2VLAdapter

TOY_NOTE = "toy checkpoints: nothing to accept"


class ToyQwen2VLAdapter(Qwen2VLAdapter):
    """Qwen2-VL under another name, chosen only by `model.family`, with plan facts of its own."""

    family = "toy_qwen2_vl"
    detect = False  # never picked instead of qwen2_vl

    def lm_tokens_per_image(self, image_tokens: float) -> float:
        return image_tokens + 2  # <|vision_start|> and <|vision_end|> around the image pads

    def hub_access_note(self, name: str) -> str:
        return TOY_NOTE

    hub_configs = {
        "toy/Toy-VL-2B": {
            k: v for k, v in KNOWN_CONFIGS["Qwen/Qwen2-VL-2B-Instruct"].items() if k != "model_type"
        }
    }


@pytest.fixture(scope="module")
def toy(request):
    A.register_family(ToyQwen2VLAdapter)
    request.addfinalizer(lambda: registry.FAMILIES.unregister("toy_qwen2_vl"))
    return A.get_adapter("toy_qwen2_vl")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


def _cfg(cache, **over):
    o = {"runtime.cache_dir": str(cache), "runtime.results_dir": str(cache / "results")}
    return load_params("params/standin/colab_qwen2vl_2b.yaml", {**o, **over})


def test_register_family_puts_an_instance_in_the_registry(toy):
    assert isinstance(toy, ToyQwen2VLAdapter) and registry.FAMILIES.get("toy_qwen2_vl") is toy
    assert A.ADAPTERS["toy_qwen2_vl"] is toy and list(A.ADAPTERS)[:3] == ["qwen2_vl", "qwen2_5_vl", "mllama"]
    with pytest.raises(ValueError, match="already registered"):
        A.register_family(type("Other", (Qwen2VLAdapter,), {"family": "toy_qwen2_vl"}))
    with pytest.raises(TypeError, match="Adapter subclass"):
        A.register_family(object)


def test_a_family_that_is_not_detected_is_chosen_only_by_name(toy, cache):
    from vskip_core.modeling.loading import collate, encode, load_model, model_inputs

    auto = load_model(_cfg(cache))
    assert auto.family == "qwen2_vl"  # the toy serves qwen2_vl checkpoints but does not claim them
    loaded = load_model(_cfg(cache, **{"model.family": "toy_qwen2_vl"}))
    assert loaded.family == "toy_qwen2_vl" and loaded.adapter is toy and A.adapter_for(loaded.model) is toy
    assert A.adapter_for(auto.model).family == "qwen2_vl"
    ex = make_example(DataConfig(), "test", 0)
    item = encode(ex, loaded.tokenizer, loaded.processor, target="Answer: A")
    assert torch.equal(
        item["input_ids"], toy.encode(ex, loaded.tokenizer, loaded.processor, "Answer: A")["input_ids"]
    )
    batch = collate([item, item], loaded.tokenizer.pad_token_id)
    with torch.no_grad():
        ours = loaded.model(**model_inputs(batch, "cpu")).logits
        ref = auto.model(**model_inputs(batch, "cpu")).logits
    assert torch.equal(ours, ref)  # the same checkpoint, loaded through the toy adapter


def test_a_declared_family_must_serve_the_checkpoint(toy, cache):
    from vskip_core.modeling.loading import load_model

    with pytest.raises(ValueError, match=r"model.family='mllama' but .* is a qwen2_vl checkpoint"):
        load_model(_cfg(cache, **{"model.family": "mllama"}))


def test_the_plan_reads_the_family_facts(toy, cache):
    base = make_plan(_cfg(cache), gpu="T4")
    plan = make_plan(_cfg(cache, **{"model.family": "toy_qwen2_vl"}), gpu="T4")
    assert base.teacher.family == "qwen2_vl" and plan.teacher.family == "toy_qwen2_vl"
    assert "[toy_qwen2_vl]" in plan.report()
    assert plan.seq.prompt_mean == pytest.approx(base.seq.prompt_mean + 2 * base.seq.images_mean)
    assert TOY_NOTE in plan.notes and TOY_NOTE not in base.notes


def test_unknown_family_names_the_registered_ones(toy, cache):
    with pytest.raises(
        ParamsError, match=r"model\.family: .*'toy_qwen2'; did you mean 'toy_qwen2_vl'\?"
    ) as e:
        _cfg(cache, **{"model.family": "toy_qwen2"})
    assert "'qwen2_vl', 'qwen2_5_vl', 'mllama', 'toy_qwen2_vl'" in str(e.value)
    with pytest.raises(registry.UnknownName, match="unknown model family 'qwen3_vl'.*register_family"):
        A.get_adapter("qwen3_vl")


def test_collate_and_pruned_decoding_ask_the_adapters():
    from vskip_core.modeling import pruned_decoding

    assert pruned_decoding.SUPPORTED_MODEL_TYPES == ("qwen2_vl", "qwen2_5_vl")
    mllama = type("M", (), {"config": type("C", (), {"model_type": "mllama"})()})()
    assert "Mllama reads its image through cross-attention" in pruned_decoding.unsupported_reason(mllama)
    assert A.adapter_for_item({"input_ids": 0, "cross_attention_mask": 0}).family == "mllama"
    assert (
        A.adapter_for_item({"input_ids": 0, "mm_token_type_ids": 0, "image_grid_thw": 0}).family == "qwen2_vl"
    )
    with pytest.raises(ValueError, match="no registered family encodes items with keys"):
        A.adapter_for_item({"input_ids": 0})


def test_the_plan_sizes_a_hub_id_the_family_knows(toy, cache):
    o = {"runtime.cache_dir": str(cache), "model.family": "toy_qwen2_vl"}
    hub = make_plan(load_params("params/colab_qwen2vl_2b.yaml", o), gpu="T4")
    toy_plan = make_plan(
        load_params("params/colab_qwen2vl_2b.yaml", {**o, "model.teacher": "toy/Toy-VL-2B"}), gpu="T4"
    )
    assert toy_plan.teacher.origin == "ToyQwen2VLAdapter.hub_configs"
    assert toy_plan.teacher.params == hub.teacher.params and toy_plan.teacher.family == "toy_qwen2_vl"


def test_a_registered_family_gets_a_model_standin(toy, cache):
    import json

    from vskip_core.modeling.standins import resolve

    path = resolve(_cfg(cache), "standin:toy_qwen2_vl")  # built from the toy adapter's tiny_* builders
    assert (
        json.loads((cache / "standins" / "toy_qwen2_vl-v2" / "config.json").read_text())["model_type"]
        == "qwen2_vl"
    )
    gen = json.loads((cache / "standins" / "toy_qwen2_vl-v2" / "generation_config.json").read_text())
    assert gen["top_k"] == toy.standin_generation["top_k"] and path.endswith("toy_qwen2_vl-v2")
    with pytest.raises(
        ValueError, match="unknown stand-in 'standin:toy_qwen3'; valid: .*standin:toy_qwen2_vl"
    ):
        resolve(_cfg(cache), "standin:toy_qwen3")
