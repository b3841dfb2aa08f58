import pytest

from vskip_core.config import DEFAULT_PARAMS, ParamsError, load_params, resolve_notebook_args
from vskip_core.method import gating, pruning  # noqa: F401  (the built-in names the params are checked against)


def test_defaults_and_extends():
    d = load_params("params/default.yaml")
    s = load_params("params/smoke.yaml")
    assert s.embedded.hidden_size < d.embedded.hidden_size  # smoke overrides
    assert s.data.image_size == d.data.image_size  # ... and inherits the rest
    assert d.gate.gamma == 0.5


def test_overrides_are_typed():
    cfg = load_params("params/default.yaml", {"gate.gamma": "0.3", "data.n_test": 10})
    assert cfg.gate.gamma == 0.3 and cfg.data.n_test == 10
    assert load_params("params/default.yaml", {"gate.gamma": 1}).gate.gamma == 1.0  # int accepted for float
    assert (
        load_params("params/default.yaml", {"distill.lr": "1e-2"}).distill.lr == 0.01
    )  # YAML 1.1 reads a str


@pytest.mark.parametrize(
    "over, needle",
    [
        ({"gate.gama": 0.5}, "gamma"),
        ({"gaet.gamma": 0.5}, "gate"),
        ({"gate.gamma": 1.5}, "gate.gamma"),
        ({"gate.gamma": 0.0}, "gate.gamma"),
        ({"data.n_test": -1}, "data.n_test"),
        ({"data.n_test": "many"}, "data.n_test"),
        ({"embedded.batch_size": 0}, "embedded.batch_size"),
        ({"model.quantization": "int3"}, "model.quantization"),
        ({"model.dtype": "bf16"}, r"model\.dtype: must be one of .*'bfloat16'.*did you mean 'bfloat16'"),
        ({"data.mmmu_split": "test"}, r"data\.mmmu_split: .*test answers are hidden"),
        ({"gate.methods": ["vskip", "vskp"]}, r"gate\.methods\[1\]: .*'llmlingua2'.*did you mean 'vskip'"),
        ({"data.families": ["colour"]}, r"data\.families\[0\]: must be one of \['attribute'"),
        ({"distill.methods": ["full"]}, r"distill\.methods\[0\]"),
        ({"gamma": 0.5}, "section.field"),
    ],
)
def test_bad_values_name_the_key(over, needle):
    with pytest.raises(ParamsError, match=needle):
        load_params("params/default.yaml", over)


def test_default_params_are_the_dataclass_defaults():
    """Defaults live in one place: params/default.yaml sets nothing, so it loads as `Config()`."""
    from vskip_core.config import Config

    d = load_params(DEFAULT_PARAMS)
    assert d.to_dict() == {**Config().to_dict(), "source": DEFAULT_PARAMS}
    assert d.embedded.verdict_steps > 0 and d.runtime.num_threads == 1  # what the yaml used to set


def test_removed_keys_are_refused_with_their_replacement(tmp_path):
    """An old params file that still sets a removed field fails, saying it was removed and what replaces it;
    no removed key is still a field, and none came from the sections that key the cached teacher."""
    from vskip_core.config import REMOVED_KEYS, Config

    old = tmp_path / "old.yaml"
    old.write_text("extends: params/smoke.yaml\nprune:\n  bench_repeats: 3\n")
    with pytest.raises(
        ParamsError, match=r"prune\.bench_repeats was removed; .*bench_visual_tokens\.py --repeats"
    ):
        load_params(old)
    with pytest.raises(ParamsError, match=r"eval\.seed was removed; use runtime\.seed"):
        load_params(DEFAULT_PARAMS, {"eval.seed": 1})
    fields = {f"{s}.{k}" for s, body in Config().to_dict().items() if isinstance(body, dict) for k in body}
    assert not fields & set(REMOVED_KEYS)
    assert not {k.split(".")[0] for k in REMOVED_KEYS} & {"embedded", "data"}


def test_choices_are_checked_from_the_type_however_the_config_was_built():

    from vskip_core.modeling.adapters import ADAPTERS

    cfg = load_params("params/smoke.yaml")
    cfg.model.attn_implementation = "flash"
    with pytest.raises(ParamsError, match=r"model\.attn_implementation: must be one of \['eager', 'sdpa'\]"):
        cfg.validate()
    cfg = load_params("params/smoke.yaml")
    for fam in ("auto", *ADAPTERS):  # model.family's choices follow the family registry
        cfg.model.family = fam
        cfg.validate()
    cfg.model.family = "mlama"
    with pytest.raises(
        ParamsError, match=r"model\.family: .*'mlama'; did you mean 'mllama'\? Registered: \["
    ):
        cfg.validate()
    cfg = load_params("params/smoke.yaml")
    cfg.prune.methods = ["fastv", "none"]  # none is the unpruned control, always run: not a pruner to compare
    with pytest.raises(ParamsError, match=r"prune\.methods\[1\]: must be one of the registered pruners"):
        cfg.validate()
    cfg = load_params("params/smoke.yaml")
    cfg.distill.methods = ["text_onyl"]
    with pytest.raises(ParamsError, match=r"distill\.methods\[0\]: .*did you mean 'text_only'"):
        cfg.validate()


def test_gate_and_prune_defaults_are_the_registered_defaults():
    from vskip_core import registry
    from vskip_core.config import Config
    from vskip_core.method.gating import default_methods

    assert Config().gate.methods == default_methods() == [n for n in registry.GATES if n != "llmlingua2"]
    assert Config().prune.methods == list(registry.PRUNERS.names())


def test_bad_files(tmp_path):
    with pytest.raises(ParamsError, match="does not exist"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    notmap = tmp_path / "list.yaml"
    notmap.write_text("- 1\n- 2\n")
    with pytest.raises(ParamsError, match="mapping"):
        load_params(notmap)
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"extends: {loop}\n")
    with pytest.raises(ParamsError, match="circular"):
        load_params(loop)


def test_extends_relative_to_file(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("gate:\n  gamma: 0.7\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\ndata:\n  n_test: 5\n")
    cfg = load_params(child)
    assert cfg.gate.gamma == 0.7 and cfg.data.n_test == 5


def test_hash_changes_with_params():
    a = load_params("params/default.yaml")
    b = load_params("params/default.yaml", {"gate.gamma": 0.3})
    assert a.hash() != b.hash() and a.hash("data") == b.hash("data")


def test_notebook_env_redirect(monkeypatch):
    monkeypatch.setenv("VSKIP_PARAMS", "params/smoke.yaml")
    monkeypatch.setenv("VSKIP_RUN", "nbval")
    assert resolve_notebook_args(DEFAULT_PARAMS, "default") == ("params/smoke.yaml", "nbval")
    # explicit (papermill) values win
    assert resolve_notebook_args("params/x.yaml", "mine") == ("params/x.yaml", "mine")


def test_fast_dtype_falls_back_to_float32_on_cpus_without_bf16(monkeypatch):
    import torch

    from vskip_core import runtime

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert runtime.fast_dtype("bfloat16", "cpu") == torch.float32
    assert runtime.fast_dtype("float32", "cpu") == torch.float32
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert runtime.fast_dtype("bfloat16", "cpu") == torch.bfloat16
    assert runtime.fast_dtype("auto", "cpu") == torch.float32


def test_fields_added_at_their_neutral_value_keep_the_cache_keys():
    from vskip_core.config import HASH_NEUTRAL

    neutral = {f"{section}.{key}": v for (section, key), v in HASH_NEUTRAL.items()}
    base = load_params("params/default.yaml", neutral)
    assert (
        base.hash("embedded", "data") == "35b9aa594292"
    )  # at their neutral values: the default teacher's key before the fields existed
    changed = load_params("params/default.yaml", {"data.multistep_rationale": "local"})
    assert changed.hash("embedded", "data") != base.hash("embedded", "data")
    with pytest.raises(ParamsError, match="data.multistep_rationale: local"):
        load_params(
            "params/default.yaml", {"embedded.verdict_reasoning": 4, "data.multistep_rationale": "list"}
        )
    changed = load_params(
        "params/default.yaml", {"embedded.verdict_reasoning": 4, "data.multistep_rationale": "local"}
    )
    assert changed.hash("embedded", "data") != base.hash("embedded", "data")


def test_instruction_tuning_fields_are_checked_and_change_the_key_only_when_on():
    base = load_params("params/default.yaml")
    off = {"embedded.direct_share": 0.0, "embedded.instruct_share": 0.0}
    old = load_params("params/default.yaml", off).hash("embedded", "data")
    assert old == "4622ea9a7394"  # off: the teacher before issue 32 keeps its cache key
    for key in ("embedded.direct_share", "embedded.instruct_share", "embedded.instruct_after"):
        with pytest.raises(ParamsError, match=key):
            load_params("params/default.yaml", {key: 1.5})
        changed = load_params("params/default.yaml", {key: 0.6})
        assert changed.hash("embedded", "data") != base.hash("embedded", "data")
    on = load_params("params/default.yaml", {"embedded.instruct_reasoning": True})
    assert on.hash("embedded", "data") != base.hash("embedded", "data")
    with pytest.raises(ParamsError, match="embedded.direct_weight"):
        load_params("params/default.yaml", {"embedded.direct_weight": 0})
