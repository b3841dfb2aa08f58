import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def smoke_cfg(tmp_path):
    """The smoke params with caches and results in a temp folder."""
    from vskip_core.config import load_params

    return load_params(
        "params/smoke.yaml",
        {"runtime.cache_dir": str(tmp_path / "cache"), "runtime.results_dir": str(tmp_path / "results")},
    )
