"""Conversion between unickpt and other frameworks' checkpoints (docs/CONVERT.md)."""

from unickpt.convert.spec import Rule, Spec, shipped_specs
from unickpt.convert.torchfile import load_torch_file, release_pages

__all__ = ["Rule", "Spec", "load_torch_file", "release_pages", "shipped_specs"]
