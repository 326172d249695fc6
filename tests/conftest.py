"""Shared fixtures: small deterministic models and a temp checkpoint root."""

from __future__ import annotations

import os

import pytest

# Keep child processes and the test process from oversubscribing the two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def ckpt_root(tmp_path: os.PathLike[str]) -> str:
    root = os.path.join(os.fspath(tmp_path), "ckpts")
    os.makedirs(root)
    return root
