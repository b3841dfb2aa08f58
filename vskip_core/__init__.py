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
    "register_gate": "vskip_core.method.gating",
    "UnitContext": "vskip_core.method.gating",
    "register_pruner": "vskip_core.method.pruning",
    "register_family": "vskip_core.modeling.adapters",
    "Adapter": "vskip_core.modeling.adapters",
}
__all__ = [
    "Adapter",
    "Compressed",
    "Compressor",
    "Config",
    "generate_pruned",
    "InputError",
    "load_params",
    "load_vlm",
    "register_family",
    "register_gate",
    "register_pruner",
    "Scores",
    "UnitContext",
    "__version__",
]

if TYPE_CHECKING:
    from vskip_core.api import Compressed, Compressor, InputError, Scores, generate_pruned, load_vlm
    from vskip_core.config import Config, load_params
    from vskip_core.method.gating import UnitContext, register_gate
    from vskip_core.method.pruning import register_pruner
    from vskip_core.modeling.adapters import Adapter, register_family


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'vskip_core' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
