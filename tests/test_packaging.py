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


def test_no_import_cycle_anywhere_in_the_package_root_included():
    """Function-level imports included; no module imports the package root (its lazy public names import
    `vskip_core.api`, so a module importing the root would close a cycle through the whole package)."""
    import ast
    from pathlib import Path

    import grimp

    pkg = Path(__file__).resolve().parents[1] / "vskip_core"
    root = [  # `from vskip_core import x` reads x off the root package (grimp resolves it to the submodule)
        str(f.relative_to(pkg))
        for f in pkg.rglob("*.py")
        if f.name != "__init__.py" or f.parent != pkg
        for node in ast.walk(ast.parse(f.read_text()))
        if isinstance(node, ast.ImportFrom) and node.module == "vskip_core" and node.level == 0
    ]
    assert not root, f"import from the submodule instead (import vskip_core.x as x): {root}"
    g = grimp.build_graph("vskip_core", include_external_packages=False)
    for m in g.modules:
        for n in g.find_modules_directly_imported_by(m):
            assert not g.chain_exists(importer=n, imported=m), f"cycle: {m} -> {n} -> ... -> {m}"
