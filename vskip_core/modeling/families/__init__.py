"""The built-in model families, one file each; importing this package registers them. The order is the
registry's: detection tries families in it (Qwen2-VL before Qwen2.5-VL, which shares its processor)."""

# isort: off
from vskip_core.modeling.families import qwen2_vl  # noqa: F401
from vskip_core.modeling.families import qwen2_5_vl  # noqa: F401
from vskip_core.modeling.families import mllama  # noqa: F401
# isort: on
