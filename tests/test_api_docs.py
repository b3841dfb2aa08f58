"""Every code block of docs/API.md runs as written (the dataset block also on the stand-in Llama-3.2-Vision)."""

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "API.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.fixture
def cleanup():
    yield
    from vskip_core.registry import GATES, PRUNERS

    for reg, name in ((GATES, "longest_words"), (PRUNERS, "stride")):
        reg.unregister(name)


def test_the_page_has_a_block_per_call():
    text = "\n".join(BLOCKS)
    for call in (
        "Compressor.from_pretrained",
        ".compress(",
        ".compress_dataset(",
        "generate_pruned(",
        "register_gate(",
    ):
        assert call in text, call


def test_every_block_runs(cleanup, tmp_path, capsys, one_thread):
    for i, block in enumerate(BLOCKS):
        exec(compile(block.replace("/tmp/", f"{tmp_path}/"), f"docs/API.md block {i}", "exec"), {})
    out = capsys.readouterr().out
    assert "compressed_rationale" in out and "zspaprune True" in out


def test_the_dataset_block_runs_on_the_llama_standin(tmp_path, capsys):
    block = next(b for b in BLOCKS if "compress_dataset" in b)
    block = block.replace("standin:qwen2_vl", "standin:mllama").replace("qwen2vl_7b", "llama32_11b_vision")
    exec(compile(block.replace("/tmp/", f"{tmp_path}/"), "docs/API.md (mllama)", "exec"), {})
    assert "compressed_rationale" in capsys.readouterr().out
