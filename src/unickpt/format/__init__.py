"""The on-disk format: manifest.json plus safetensors data files (spec: docs/FORMAT.md)."""

from unickpt.format.manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    Chunk,
    Manifest,
    TensorMeta,
    commit_manifest,
    read_manifest,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST",
    "Chunk",
    "Manifest",
    "TensorMeta",
    "commit_manifest",
    "read_manifest",
]
