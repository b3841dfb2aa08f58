"""The conda file and the Makefile must not drift from pyproject.toml (the source of truth)."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_environment_yml_has_the_same_pins():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {d.split("==")[0]: d for d in deps if "==" in d}
    assert "torch" in pins, (
        "torch must stay pinned (a loose torch pulls a multi-GB CUDA build on CPU machines)"
    )
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    for pin in pins.values():
        assert pin in pip, f"environment.yml lacks {pin}"


def test_makefile_targets_exist():
    mk = (ROOT / "Makefile").read_text()
    for target in ("reproduce:", "test:", "lab:", "bench:"):
        assert re.search(rf"^{target}", mk, re.M), target
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_progress_bars_come_from_runtime_progress():
    # runtime.progress is the one bar: under the pipeline it is mirrored on the terminal and leaves a text line in
    # the executed notebook; a direct tqdm.auto bar there is a widget saved at "0%" (a cold teacher build did that)
    pkg = ROOT / "vskip_core"
    direct = [
        p.relative_to(pkg).as_posix()
        for p in pkg.rglob("*.py")
        if p.name != "runtime.py" and re.search(r"^\s*(from tqdm|import tqdm)", p.read_text(), re.M)
    ]
    assert direct == [], f"import the bar as `from vskip_core.runtime import progress as tqdm` in {direct}"
