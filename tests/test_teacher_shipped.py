"""The shipped teacher (assets/teacher/): it is the default recipe's, its files are checked, and a build
installs it instead of training."""

import json

import pytest

from vskip_core import teacher as T
from vskip_core.config import load_params
from vskip_core.modeling.loading import embedded_dir
from vskip_core.runtime import file_sha256


def _fake_shipped(folder, key):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights")
    sha = {n: file_sha256(folder / n) for n in ("config.json", "model.safetensors")}
    (folder / T.SHIPPED_MANIFEST).write_text(json.dumps({"key": key, "sha256": sha}))
    return folder


def test_the_shipped_teacher_is_the_default_recipes():
    """Changing the recipe (embedded or data params, data.GENERATOR_VERSION) without `make teacher` fails here:
    every user would otherwise train another teacher than the README's."""
    man = T.shipped_manifest()
    assert man is not None, (
        "assets/teacher/ has no shipped.json: run `make teacher` and commit assets/teacher/"
    )
    key = embedded_dir(load_params("params/default.yaml")).name
    assert man["key"] == key, (
        f"the shipped teacher is {man['key']}, the default params ask for {key}: `make teacher`"
    )
    assert T.shipped_teacher(key) == T.SHIPPED_DIR  # every file matches its sha256
    assert {"config.json", "model.safetensors", "tokenizer.json", "vskip_build.json"} <= set(man["sha256"])
    assert man["built_on"]["cpu_model"] and man["torch"]


def test_shipped_files_are_checked(tmp_path):
    folder = _fake_shipped(tmp_path / "teacher", "teacher-abc-g2")
    assert T.shipped_teacher("teacher-abc-g2", folder) == folder
    assert T.shipped_teacher("teacher-other-g2", folder) is None  # another recipe: not used
    (folder / "model.safetensors").write_bytes(b"version https://git-lfs.github.com/spec/v1")
    with pytest.raises(T.ShippedTeacherError, match="make teacher"):
        T.shipped_teacher("teacher-abc-g2", folder)


def test_build_installs_the_shipped_teacher_without_training(tmp_path, monkeypatch, capsys):
    cfg = load_params("params/smoke.yaml", {"runtime.cache_dir": str(tmp_path / "cache")})
    key = embedded_dir(cfg).name
    monkeypatch.setattr(T, "SHIPPED_DIR", _fake_shipped(tmp_path / "teacher", key))
    monkeypatch.setattr(T, "_setup", lambda *a, **k: pytest.fail("trained instead of installing"))
    out = T.build_teacher(cfg)
    assert out == embedded_dir(cfg) and (out / "model.safetensors").read_bytes() == b"weights"
    assert "shipped" in capsys.readouterr().out
    assert T.build_teacher(cfg) == out  # now from the cache


def test_another_recipe_says_it_trains(tmp_path, monkeypatch, capsys):
    cfg = load_params("params/smoke.yaml", {"runtime.cache_dir": str(tmp_path / "cache")})
    monkeypatch.setattr(T, "SHIPPED_DIR", _fake_shipped(tmp_path / "teacher", "teacher-other-g2"))

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop

    monkeypatch.setattr(T, "_setup", stop)
    with pytest.raises(Stop):
        T.build_teacher(cfg)
    assert "training it here" in capsys.readouterr().out
