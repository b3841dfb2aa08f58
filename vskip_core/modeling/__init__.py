"""Loading, encoding and decoding of vision-language models. Importing it registers the built-in model families
(`vskip_core.modeling.families`), so any `vskip_core.modeling.*` import sees them in `registry.FAMILIES`."""

from vskip_core.modeling import families  # noqa: F401
