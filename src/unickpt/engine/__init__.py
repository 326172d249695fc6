"""Executing plans: streaming shards to storage on save, ranged reads into place on load."""

from unickpt.engine.background import SaveHandle, before_update, release_staging_memory
from unickpt.engine.load import LoadResult, load
from unickpt.engine.result import SaveResult
from unickpt.engine.save import reserve_staging, save

__all__ = [
    "LoadResult",
    "SaveHandle",
    "SaveResult",
    "before_update",
    "load",
    "release_staging_memory",
    "reserve_staging",
    "save",
]
