"""Hugging Face safetensors -> unickpt (unickpt.convert.hf.import_hf) and back.

The sources are written with the ``safetensors`` package itself (and an index the way
``transformers`` writes one), with dtypes that matter for byte identity: bf16, fp16 holding NaN
and infinities, int64, bool, a 0-d and an empty tensor. HF -> unickpt -> HF must reproduce every
tensor byte for byte, read back with ``safetensors.torch.load_file``. Hostile sources: an index
naming a file outside the directory (by ``..`` and by symlink), a truncated shard, an index that
disagrees with the shards.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import unickpt
from unickpt import CheckpointNotFoundError, CorruptCheckpointError, UnsafeCheckpointError
from unickpt.convert.export_hf import export_hf
from unickpt.convert.hf import import_hf
from unickpt.engine.load import CheckpointReader
from unickpt.errors import ConversionError


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    special = torch.randn(7, 5, generator=gen).half()
    special[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    return {
        "transformer.wte.weight": torch.randn(50, 16, generator=gen).bfloat16(),
        "transformer.h.0.attn.c_attn.weight": torch.randn(16, 48, generator=gen),
        "transformer.h.0.attn.c_attn.bias": special,
        "transformer.h.0.mlp.mask": torch.rand(9, 3, generator=gen) > 0.5,
        "transformer.h.1.attn.position_ids": torch.arange(33, dtype=torch.int64),
        "transformer.h.1.scale": torch.tensor(2.5),
        "transformer.h.1.empty": torch.empty(0, 4),
        "lm_head.weight": torch.randn(50, 16, generator=gen).bfloat16(),
    }


def _bytes(tensor: torch.Tensor) -> bytes:
    return tensor.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()


def _assert_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert got[name].shape == tensor.shape, name
        assert _bytes(got[name]) == _bytes(tensor), name


def _write_sharded(root: Path, tensors: dict[str, torch.Tensor], files: int = 3) -> None:
    """``files`` shards and an index, as ``save_pretrained`` lays them out."""
    root.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    weight_map = {}
    for i in range(files):
        file = f"model-{i + 1:05d}-of-{files:05d}.safetensors"
        members = {n: tensors[n] for n in names[i::files]}
        save_file(members, str(root / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(members, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))


def _load_export(root: Path) -> dict[str, torch.Tensor]:
    index = root / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    out: dict[str, torch.Tensor] = {}
    for file in files:
        out.update(load_file(str(root / file)))
    return out


def test_sharded_round_trip_is_byte_identical(tmp_path: Path) -> None:
    tensors = _tensors()
    _write_sharded(tmp_path / "hf", tensors)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    calls: list[tuple[int, int]] = []
    manifest = import_hf(tmp_path / "hf", tmp_path / "unickpt", progress=lambda *a: calls.append(a))
    assert calls[-1] == (total, total) and len(calls) == len(tensors)
    assert set(manifest.tensors) == {f"model.{n}" for n in tensors}
    assert manifest.writer["converted_from"]["format"] == "hf-safetensors"
    with CheckpointReader(str(tmp_path / "unickpt"), verify=True) as reader:
        for name, tensor in tensors.items():
            assert _bytes(reader.read(f"model.{name}")) == _bytes(tensor), name
    calls.clear()
    files = export_hf(
        tmp_path / "unickpt",
        tmp_path / "back",
        max_shard_size=2000,
        progress=lambda *a: calls.append(a),
    )
    assert calls[-1] == (total, total) and len(calls) == len(tensors)
    assert len(files) > 2 and files[-1] == "model.safetensors.index.json"
    _assert_identical(_load_export(tmp_path / "back"), tensors)


def test_single_file_directory_or_path_loads_into_a_module(tmp_path: Path) -> None:
    module = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.LayerNorm(4))
    (tmp_path / "hf").mkdir()
    save_file(module.state_dict(), str(tmp_path / "hf" / "model.safetensors"))
    for src, dst in ((tmp_path / "hf", "a"), (tmp_path / "hf" / "model.safetensors", "b")):
        manifest = import_hf(src, tmp_path / dst)
        source = manifest.writer["converted_from"]
        assert source["format"] == "hf-safetensors" and source["path"] == str(src)  # as given
        assert unickpt.inspect(str(tmp_path / dst)).writer["converted_from"] == source
        target = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.LayerNorm(4))
        unickpt.load(str(tmp_path / dst), {"model": target})
        for name, want in module.state_dict().items():
            assert torch.equal(want, target.state_dict()[name]), name
    with pytest.raises(CheckpointNotFoundError, match=r"model\.safetensors"):
        import_hf(tmp_path / "a", tmp_path / "c")


def test_spec_renames_and_drops(tmp_path: Path) -> None:
    tensors = _tensors()
    _write_sharded(tmp_path / "hf", tensors)
    spec = tmp_path / "gpt.yaml"
    spec.write_text(
        "unickpt_spec: 1\n"
        "strict: false\n"
        "rules:\n"
        "  - match: 'position_ids$'\n"
        "    drop: true\n"
        "  - match: '^transformer\\.h\\.(\\d+)\\.'\n"
        "    replicated: true\n"
        "    rename: 'layers.\\1.'\n"
    )
    manifest = import_hf(tmp_path / "hf", tmp_path / "unickpt", spec=spec)
    assert set(manifest.tensors) == {
        "model.transformer.wte.weight",
        "model.layers.0.attn.c_attn.weight",
        "model.layers.0.attn.c_attn.bias",
        "model.layers.0.mlp.mask",
        "model.layers.1.scale",
        "model.layers.1.empty",
        "model.lm_head.weight",
    }
    strict = tmp_path / "strict.yaml"
    strict.write_text("unickpt_spec: 1\nrules:\n  - match: '^transformer'\n    replicated: true\n")
    with pytest.raises(ConversionError, match=r"no rule for 1 key\(s\).*lm_head\.weight"):
        import_hf(tmp_path / "hf", tmp_path / "strict", spec=strict)


def test_index_pointing_outside_the_directory_is_refused(tmp_path: Path) -> None:
    _write_sharded(tmp_path / "hf", _tensors(), files=1)
    save_file({"x": torch.zeros(2)}, str(tmp_path / "outside.safetensors"))
    index = tmp_path / "hf" / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"]["x"] = "../outside.safetensors"
    index.write_text(json.dumps(doc))
    with pytest.raises(UnsafeCheckpointError, match=r"\.\./outside\.safetensors"):
        import_hf(tmp_path / "hf", tmp_path / "out")
    os.symlink(tmp_path / "outside.safetensors", tmp_path / "hf" / "linked.safetensors")
    doc["weight_map"]["x"] = "linked.safetensors"
    index.write_text(json.dumps(doc))
    with pytest.raises(UnsafeCheckpointError, match="resolves outside"):
        import_hf(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_shard_is_named(tmp_path: Path) -> None:
    _write_sharded(tmp_path / "hf", _tensors())
    shard = tmp_path / "hf" / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CorruptCheckpointError, match=r"model-00002-of-00003\.safetensors is trunc"):
        import_hf(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_index_disagreeing_with_the_shards_is_refused(tmp_path: Path) -> None:
    _write_sharded(tmp_path / "hf", _tensors())
    index = tmp_path / "hf" / "model.safetensors.index.json"
    good = json.loads(index.read_text())
    moved = json.loads(index.read_text())
    moved["weight_map"]["lm_head.weight"] = "model-00001-of-00003.safetensors"
    index.write_text(json.dumps(moved))
    with pytest.raises(CorruptCheckpointError, match=r"places tensor 'lm_head\.weight' in"):
        import_hf(tmp_path / "hf", tmp_path / "out")
    missing = json.loads(json.dumps(good))
    missing["weight_map"]["extra"] = "model-00009-of-00009.safetensors"
    index.write_text(json.dumps(missing))
    with pytest.raises(CorruptCheckpointError, match=r"lists 'model-00009.*does not exist"):
        import_hf(tmp_path / "hf", tmp_path / "out")
    unlisted = json.loads(json.dumps(good))
    del unlisted["weight_map"]["lm_head.weight"]
    index.write_text(json.dumps(unlisted))
    with pytest.raises(CorruptCheckpointError, match=r"holds tensor 'lm_head\.weight'.*not list"):
        import_hf(tmp_path / "hf", tmp_path / "out")


def test_s3_source_and_destination_through_storage_options(tmp_path: Path) -> None:
    """HF shards in a bucket -> local unickpt -> HF back into the bucket; the endpoint and keys
    come only from ``storage_options``, which reach the s3:// side whichever it is."""
    pytest.importorskip("moto")
    import boto3
    from s3_server import MotoServer

    from unickpt.storage import LocalStorage, S3Storage

    server = MotoServer()
    server.start()
    try:
        options = {
            "endpoint_url": server.endpoint,
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
            "region_name": "us-east-1",
        }
        with pytest.MonkeyPatch.context() as patch:  # nothing from this machine's AWS setup
            for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
                patch.delenv(name, raising=False)
            patch.setenv("AWS_CONFIG_FILE", os.devnull)
            patch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
            patch.setenv("AWS_EC2_METADATA_DISABLED", "true")
            boto3.client("s3", **options).create_bucket(Bucket="unickpt-hf")
            tensors = _tensors()
            _write_sharded(tmp_path / "hf", tensors)
            local, bucket = (
                LocalStorage(str(tmp_path / "hf")),
                S3Storage("s3://unickpt-hf/src", options),
            )
            for file in local.list():
                bucket.put_atomic(file, local.read(file))
            import_hf("s3://unickpt-hf/src", tmp_path / "unickpt", storage_options=options)
            files = export_hf(
                tmp_path / "unickpt",
                "s3://unickpt-hf/out",
                max_shard_size=3000,
                storage_options=options,
            )
            out = S3Storage("s3://unickpt-hf/out", options)
            assert sorted(out.list()) == sorted(files)
            for file in files:
                (tmp_path / "back").mkdir(exist_ok=True)
                (tmp_path / "back" / file).write_bytes(out.read(file))
        _assert_identical(_load_export(tmp_path / "back"), tensors)
    finally:
        server.stop()


def test_hf_file_without_the_tied_head_loads_into_a_tied_model(tmp_path: Path) -> None:
    """GPT-2-style files omit ``lm_head.weight``; strict loading into the tied model fills it
    through the embedding it shares memory with."""

    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte = torch.nn.Embedding(10, 4)
            self.lm_head = torch.nn.Linear(4, 10, bias=False)
            self.lm_head.weight = self.wte.weight

    source = Tied()
    (tmp_path / "hf").mkdir()
    save_file({"wte.weight": source.wte.weight.detach()}, tmp_path / "hf" / "model.safetensors")
    import_hf(tmp_path / "hf", tmp_path / "u")
    target = Tied()
    unickpt.load(str(tmp_path / "u"), {"model": target})
    assert torch.equal(target.lm_head.weight, source.wte.weight)


def _raw_safetensors(path: Path, entries: dict[str, list[int]], data_bytes: int) -> None:
    """A safetensors file of F32 tensors of shape [2] at the given data offsets."""
    header = json.dumps(
        {n: {"dtype": "F32", "shape": [2], "data_offsets": o} for n, o in entries.items()}
    )
    raw = header.encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(data_bytes))


@pytest.mark.parametrize(
    ("entries", "data_bytes", "message"),
    [
        ({"a": [0, 8], "b": [4, 12]}, 12, "'b' starts at data byte 4, where 8 was expected"),
        ({"a": [0, 8], "b": [0, 8]}, 8, "'b' starts at data byte 0, where 8 was expected"),
        ({"a": [8, 16]}, 16, "'a' starts at data byte 8, where 0 was expected"),
        ({"a": [0, 8]}, 12, "its tensors end at data byte 8, its data at 12"),
    ],
    ids=["overlap", "alias", "hole", "tail"],
)
def test_safetensors_data_must_be_back_to_back(
    tmp_path: Path, entries: dict[str, list[int]], data_bytes: int, message: str
) -> None:
    # what the safetensors library refuses; it keeps a crafted file from aliasing tensors
    _raw_safetensors(tmp_path / "model.safetensors", entries, data_bytes)
    with pytest.raises(CorruptCheckpointError, match=message):
        import_hf(tmp_path, str(tmp_path / "out"))


def test_a_snapshot_of_the_hugging_face_cache_converts(tmp_path: Path) -> None:
    """snapshot_download() returns <repo>/snapshots/<revision>, whose files link to
    <repo>/blobs: a layout, not an escape. Links anywhere else are still refused."""
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    weights = {"w": torch.arange(6.0).reshape(2, 3)}
    save_file(weights, repo / "blobs" / "9f86d08")
    (snapshot / "model.safetensors").symlink_to("../../blobs/9f86d08")
    for src in (snapshot, snapshot / "model.safetensors"):
        out = tmp_path / f"out-{src.name}"
        assert list(import_hf(src, str(out)).tensors) == ["model.w"]
        with CheckpointReader(str(out)) as reader:
            assert torch.equal(reader.read("model.w"), weights["w"])
    save_file(weights, tmp_path / "elsewhere.safetensors")
    (snapshot / "model.safetensors").unlink()
    (snapshot / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(UnsafeCheckpointError, match="resolves outside"):
        import_hf(snapshot, str(tmp_path / "out-escape"))
