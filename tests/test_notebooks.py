import ast
import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_source_notebook_is_clean(path):
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell.get("outputs", []) == [], f"{path.name}: committed outputs; clear them"
            assert cell.get("execution_count") is None, f"{path.name}: execution counts committed"
    src = json.dumps(nb)
    assert "image/png" not in src and "base64" not in src


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_parameters_cell_holds_literals_then_load_params(path):
    nb = json.loads(path.read_text())
    cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    tagged = [i for i, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: exactly one cell tagged 'parameters'"
    params = cells[tagged[0]]
    tree = ast.parse("".join(params["source"]))
    names = set()
    for node in tree.body:
        assert isinstance(node, ast.Assign), f"{path.name}: parameters cell must only assign literals"
        ast.literal_eval(node.value)  # raises if not a literal
        names |= {t.id for t in node.targets}
    assert names == {"params_file", "run", "overrides"}
    assert "load_params(params_file, overrides)" in "".join(cells[tagged[0] + 1]["source"])


def test_notebook_names_are_numbered():
    assert NOTEBOOKS and all(p.stem[:2].isdigit() and p.stem[2] == "_" for p in NOTEBOOKS)


def test_index_links_each_stage_source_and_executed_copy():
    # make lab opens index.ipynb: a stage added or renamed must not leave it pointing nowhere
    import re

    root = Path(__file__).resolve().parents[1]
    index = json.loads((root / "index.ipynb").read_text())
    text = "".join("".join(c["source"]) for c in index["cells"])
    links = set(re.findall(r"\]\(([^)]+)\)", text))
    for path in NOTEBOOKS:
        stage = path.stem
        assert f"notebooks/{stage}.ipynb" in links, f"index.ipynb: no link to {stage}'s source"
        assert f"results/default/{stage}/executed.ipynb" in links, f"index.ipynb: no link to {stage}'s run"
    for link in links:
        if not link.startswith("results/"):
            assert (root / link).exists(), f"index.ipynb links {link}, which does not exist"
