"""Executing plans: streaming shards to storage on save, ranged reads into place on load."""

from unickpt.engine.load import LoadResult, load
from unickpt.engine.save import SaveResult, save

__all__ = ["LoadResult", "SaveResult", "load", "save"]
