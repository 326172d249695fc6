"""Shared fixtures: small deterministic models and a temp checkpoint root."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from s3_server import BUCKET, MotoServer, s3_env

# Keep child processes and the test process from oversubscribing the two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def ckpt_root(tmp_path: os.PathLike[str]) -> str:
    root = os.path.join(os.fspath(tmp_path), "ckpts")
    os.makedirs(root)
    return root


@pytest.fixture
def unwritable_data_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """Creating any data file fails, as if ``data/`` were a file: saves fail while writing."""
    real_open = os.open

    def refusing(file: str, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_WRONLY and f"{os.sep}data{os.sep}r0" in os.fspath(file):
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory", file)
        return real_open(file, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing)


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    """A real S3 endpoint (moto's server mode, over HTTP) on 127.0.0.1 for one test module."""
    server = MotoServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def env(moto: MotoServer) -> Iterator[dict[str, str]]:
    """The S3 environment for a module's tests (see ``s3_env``), with the bucket created."""
    values = s3_env(moto.endpoint)
    with pytest.MonkeyPatch.context() as patch:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            patch.delenv(name, raising=False)
        for name, value in values.items():
            patch.setenv(name, value)
        boto3.session.Session().client("s3").create_bucket(Bucket=BUCKET)
        yield values
