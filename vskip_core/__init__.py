"""vskip: V-Skip chain-of-thought compression with ZSPAPrune and DSTP visual-token pruning.

The public API (docs/API.md); everything else in the package is the pipeline's and may change:

    from vskip_core import Compressor, load_vlm, generate_pruned
    from vskip_core import register_gate, register_pruner, register_family   # add a method in one file
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> module; imported on first use, so `import vskip_core.config` stays light (no torch)
_PUBLIC = {
    "Compressor": "vskip_core.api",
    "Compressed": "vskip_core.api",
    "Scores": "vskip_core.api",
    "InputError": "vskip_core.api",
    "load_vlm": "vskip_core.api",
    "generate_pruned": "vskip_core.api",
    "load_params": "vskip_core.config",
    "Config": "vskip_core.config",
}
__all__ = [
    "Compressed",
    "Compressor",
    "Config",
    "InputError",
    "Scores",
    "__version__",
    "generate_pruned",
    "load_params",
    "load_vlm",
]

if TYPE_CHECKING:
    from vskip_core.api import Compressed, Compressor, InputError, Scores, generate_pruned, load_vlm
    from vskip_core.config import Config, load_params


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'vskip_core' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
