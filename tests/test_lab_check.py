"""`make lab-check` must be able to fail: on a notebook with each fault it is built to find, in headless
Chromium, it reports every one (skipped where Chromium is not installed)."""

import shutil

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook, new_output

from vskip_core.infra import lab_check

pytestmark = pytest.mark.skipif(
    not (shutil.which("chromium") and shutil.which("chromedriver")), reason="no Chromium here"
)
PRICES = "<p>the price $5.21, at the bottom right. So the answer is $5.21</p>"


def test_lab_check_finds_each_fault_and_passes_the_fixed_output(tmp_path, monkeypatch, capsys):
    from vskip_core.plots import HTML

    run = "labcheck-test"
    monkeypatch.setattr(lab_check, "ROOT", tmp_path)
    faulty = new_notebook(cells=[
        new_code_cell("a", outputs=[new_output("display_data", data={"text/html": PRICES, "text/plain": "a"})]),
        new_code_cell("b", outputs=[new_output("stream", name="stderr", text="FutureWarning: something\n")]),
        new_code_cell("c", outputs=[new_output("display_data", data={
            "text/plain": "eval:   0%|          | 0/12 [00:00<?, ?it/s]",
            "application/vnd.jupyter.widget-view+json": {"model_id": "m", "version_major": 2, "version_minor": 0}})]),
        new_code_cell("d", outputs=[new_output("display_data", data={
            "text/html": "<table><tr>" + "<td>wide cell content</td>" * 80 + "</tr></table>", "text/plain": "d"})]),
    ])  # fmt: skip
    fixed = new_notebook(cells=[
        new_code_cell("a", outputs=[new_output("display_data", data={"text/html": HTML(PRICES).data,
                                                                      "text/plain": "a"})]),
        new_code_cell("b", outputs=[new_output("stream", name="stdout", text="eval: 100%|##########| 12/12\n")]),
    ])  # fmt: skip
    for name, nb in (("00_faulty", faulty), ("01_fixed", fixed)):
        (tmp_path / "results" / run / name).mkdir(parents=True)
        nbformat.write(nb, tmp_path / "results" / run / name / "executed.ipynb")
    assert lab_check.main(["--run", run]) == 1
    out = capsys.readouterr().out
    assert "00_faulty" in out and "errors: 1, math: 1, wide: 1, zero_bars: 1" in out
    assert "01_fixed" in out and "ok" in out.split("01_fixed")[1].splitlines()[0]
    assert (tmp_path / "results" / run / "lab" / "00_faulty.png").exists()
