"""Conversion between unickpt and other frameworks' checkpoints (docs/CONVERT.md)."""

from unickpt.convert.dcp import import_dcp
from unickpt.convert.deepspeed import import_deepspeed
from unickpt.convert.export_hf import export_hf
from unickpt.convert.hf import import_hf
from unickpt.convert.megatron import import_megatron
from unickpt.convert.spec import Rule, Spec, shipped_specs
from unickpt.convert.torchfile import load_torch_file, release_pages

__all__ = [
    "Rule",
    "Spec",
    "export_hf",
    "import_dcp",
    "import_deepspeed",
    "import_hf",
    "import_megatron",
    "load_torch_file",
    "release_pages",
    "shipped_specs",
]
