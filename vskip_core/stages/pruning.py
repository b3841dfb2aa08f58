"""Stage 07 plumbing around the pruning methods: the distilled student to combine them with."""

from __future__ import annotations

from typing import Any


def load_student(cfg, run_dir) -> tuple[Any, str, str]:
    """The V-Skip student to combine with pruning: (loaded or None, prompt prefix, what happened). Looks for
    `<run_dir>/04_qlora_distillation/adapters/<prune.student_adapter>/`; absent module or adapter -> None."""
    from pathlib import Path

    name = cfg.prune.student_adapter
    if not name:
        return None, "", "prune.student_adapter is empty: student combination skipped"
    adapter = Path(run_dir) / "04_qlora_distillation" / "adapters" / name
    try:
        from vskip_core.stages.distillation import load_student as _load
        from vskip_core.stages.distillation import ratio_prefix
    except ImportError as e:
        return None, "", f"vskip_core.stages.distillation is not available ({e}): student combination skipped"
    if not (adapter / "adapter_config.json").exists():
        return None, "", f"no student adapter at {adapter} (run stage 04 first): student combination skipped"
    prefix = ratio_prefix(cfg.prune.student_ratio)
    return _load(cfg, adapter), prefix, f"student {adapter} prompted with {prefix.strip()!r}"
