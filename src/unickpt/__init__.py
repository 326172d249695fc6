"""unickpt: universal checkpointing for sharded PyTorch training.

Save on any parallel layout, load on any other::

    unickpt.save("ckpt/step_100", {"model": model, "optim": optim}, step=100)
    unickpt.load("ckpt/step_100", {"model": model, "optim": optim})   # in place, resharded
"""

from unickpt.engine import (
    LoadResult,
    SaveHandle,
    SaveResult,
    before_update,
    load,
    release_staging_memory,
    reserve_staging,
    save,
)
from unickpt.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CollectiveError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    InvalidStateError,
    StateChangedError,
    StateMismatchError,
    StorageError,
    UnsafeCheckpointError,
    UnsupportedFormatError,
)
from unickpt.format import Manifest
from unickpt.layout.sharded import ShardedTensor
from unickpt.manager import CheckpointInfo, CheckpointManager
from unickpt.tools import VerifyReport, collect_garbage, inspect, verify

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CollectiveError",
    "CorruptCheckpointError",
    "IncompleteCheckpointError",
    "InvalidStateError",
    "LoadResult",
    "Manifest",
    "SaveHandle",
    "SaveResult",
    "ShardedTensor",
    "StateChangedError",
    "StateMismatchError",
    "StorageError",
    "UnsafeCheckpointError",
    "UnsupportedFormatError",
    "VerifyReport",
    "before_update",
    "collect_garbage",
    "inspect",
    "load",
    "release_staging_memory",
    "reserve_staging",
    "save",
    "verify",
]
