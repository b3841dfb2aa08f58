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


@pytest.fixture
def one_thread():
    """One torch thread for the test, the count before it restored after (a teacher built later in the session
    must train with the thread count it was built with: float sums depend on it)."""
    from vskip_core.runtime import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """A smoke-sized embedded teacher (6 drill + 40 full steps, ~20 s), shared by the whole session."""
    from vskip_core.config import load_params
    from vskip_core.teacher import build_teacher

    tmp = tmp_path_factory.mktemp("teacher")
    cfg = load_params(
        "params/smoke.yaml",
        {
            "runtime.cache_dir": str(tmp),
            "embedded.drill_steps": 6,
            "embedded.drill_batch_size": 4,
            "embedded.train_steps": 40,
            "embedded.pretrain_steps": 10,
            "embedded.lr": 3e-3,
            # the design the recorded outputs in test_visual_tokens / test_gating were made with
            "data.multistep_rationale": "list",
            "embedded.verdict_reasoning": 0,
            "embedded.direct_share": 0.0,
            "embedded.instruct_share": 0.0,
            "distill.student_per_ratio": False,  # the unit tests of one ratio-conditioned student per method
        },
    )
    path = build_teacher(cfg, progress=False)
    return cfg, path
