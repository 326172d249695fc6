"""PyTorch DCP checkpoints -> unickpt (unickpt.convert.dcp.import_dcp).

* Two gloo ranks train the tiny transformer with FSDP2 (uneven dim-0 shards: vocabulary 61) and
  Adam, and save it with ``dcp.save({"model": ..., "optim": ...})`` from ``get_state_dict``, both
  in the default nested optimizer form and with ``flatten_optimizer_state_dict=True``. Each is
  converted and loaded into a plain model + fresh Adam at world size 1: every parameter and Adam
  state entry equals the full (gathered) source bit for bit, and the hyper-parameters come back.
* A single-process ``dcp.save`` of a plain dict (nested dicts, a list holding a tensor, bf16,
  plain values, a value that is not JSON and one that needs unsafe unpickling).
* Hostile input: a ``.metadata`` pickle that calls ``os.system`` is refused before anything
  runs; a storage entry pointing outside the directory is refused; a truncated data file is
  reported by name.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.fsdp import fully_shard

import unickpt
from unickpt import CorruptCheckpointError, UnsafeCheckpointError
from unickpt.convert.dcp import import_dcp
from unickpt.engine.load import CheckpointReader
from unickpt.storage import MemoryStorage

from dist_harness import run_distributed
from models import lm_loss, make_model

STEPS = 2
LR = 3e-3

# dcp.save in one process says so even when told (no_dist=True)
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def _save_fsdp_dcp(rank: int, world_size: int, nested: str, flat: str) -> dict[str, Any]:
    """Train FSDP2 + Adam, save both DCP forms, return the full state (rank 0's is used)."""
    model = make_model(0)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    opt = torch.optim.Adam(model.parameters(), lr=LR, betas=(0.8, 0.95))
    for step in range(STEPS):
        opt.zero_grad()
        lm_loss(model, step).backward()
        opt.step()
    for path, flatten in ((nested, False), (flat, True)):
        options = StateDictOptions(flatten_optimizer_state_dict=flatten)
        model_sd, optim_sd = get_state_dict(model, opt, options=options)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd, optim_sd = get_state_dict(model, opt, options=full)
    return {"model": model_sd, "optim": optim_sd}


def test_fsdp2_adam_from_two_ranks_loads_into_plain_adam(tmp_path: Path) -> None:
    nested, flat = str(tmp_path / "dcp_nested"), str(tmp_path / "dcp_flat")
    reference = run_distributed(2, _save_fsdp_dcp, nested, flat)[0]
    assert len(list(Path(nested).glob("*.distcp"))) == 2  # both ranks wrote data
    expected_state = reference["optim"]["state"]
    for source in (nested, flat):
        dst = str(tmp_path / f"{Path(source).name}_unickpt")
        import_dcp(source, dst)
        model = make_model(1)  # a different init: a load that does nothing is caught
        opt = torch.optim.Adam(model.parameters(), lr=1.0)
        unickpt.load(dst, {"model": model, "optim": opt})
        names = {id(p): n for n, p in model.named_parameters()}
        for name, param in model.named_parameters():
            want = reference["model"][name]
            assert param.dtype == want.dtype and torch.equal(param.detach(), want), name
        assert len(opt.state) == len(expected_state) == len(list(model.parameters()))
        for param, state in opt.state.items():
            want_state = expected_state[names[id(param)]]
            assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
            for key, value in state.items():
                assert torch.equal(value, want_state[key]), (source, names[id(param)], key)
        assert float(state["step"]) == STEPS
        (group,) = opt.param_groups
        assert group["lr"] == LR and group["betas"] == (0.8, 0.95)


def _dcp_with_empty_shards(rank: int, world_size: int, path: str) -> None:
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,))
    rows = torch.arange(8.0).reshape(4, 2)
    frozen = torch.nn.Module()
    frozen.w = torch.nn.Parameter(torch.zeros(5, 0, 3), requires_grad=False)
    fully_shard(frozen)  # FSDP2 saves its [3, 0, 3] and [2, 0, 3] pieces as [0, 0, 3]
    state = {
        "empty": distribute_tensor(torch.zeros(4, 0), mesh, [Shard(0)]),
        "rows": distribute_tensor(rows, mesh, [Shard(0)]),
        "frozen": frozen.state_dict(),
    }
    dcp.save(state, checkpoint_id=path)


def test_a_tensor_with_no_elements_sharded_over_ranks_converts(tmp_path: Path) -> None:
    # DCP writes one empty chunk per rank, [2, 0] at rows 0 and 2, where a unickpt manifest
    # has one of the whole shape: the stricter tiling check refused them (audit R).
    source, target = str(tmp_path / "dcp"), str(tmp_path / "unickpt")
    run_distributed(2, _dcp_with_empty_shards, source)
    import_dcp(source, target)
    state = {
        "empty": torch.ones(4, 0),
        "rows": torch.zeros(4, 2),
        "frozen": {"w": torch.ones(5, 0, 3)},
    }
    unickpt.load(target, state)
    assert state["empty"].shape == (4, 0)
    assert torch.equal(state["rows"], torch.arange(8.0).reshape(4, 2))


def test_an_item_whose_pickle_is_damaged_is_corrupt_not_unsafe(tmp_path: Path) -> None:
    # A bad opcode in an item was an UnsafeCheckpointError with torch's advice to turn
    # weights_only off; a non-tensor item was then skipped with a warning (audit S).
    src, dst = str(tmp_path / "dcp"), str(tmp_path / "unickpt")
    dcp.save(
        {"w": torch.ones(3), "sched": {"milestones": [10, 20]}}, checkpoint_id=src, no_dist=True
    )
    (data,) = Path(src).glob("*.distcp")
    raw = bytearray(data.read_bytes())
    for at in [i for i in range(len(raw)) if raw.startswith(b"PK\x03\x04", i)]:
        name_length, extra_length = (
            int.from_bytes(raw[at + 26 : at + 28], "little"),
            int.from_bytes(raw[at + 28 : at + 30], "little"),
        )
        if raw[at + 30 : at + 30 + name_length].endswith(b"data.pkl"):
            raw[at + 30 + name_length + extra_length] = 0x7F  # no pickle opcode
    data.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError, match=r"cannot be unpickled") as error:
        import_dcp(src, dst)
    assert not isinstance(error.value, UnsafeCheckpointError)


class _Opaque:
    """A value only a full unpickler can rebuild: refused by weights_only loading."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))

    def __init__(self, marker: str) -> None:
        self.marker = marker


def test_single_process_plain_dict(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    linear = torch.nn.Linear(5, 3)
    state = {
        "model": linear.state_dict(),
        "extra": {"table": torch.arange(12, dtype=torch.int64).reshape(3, 4), "epoch": 3},
        "half": torch.randn(4, 6).bfloat16(),
        "pair": [torch.ones(2), {"k": 1}],
        "sched": {"milestones": [10, 20], "name": "step"},
        "blob": b"\x00\x01",
        "opaque": _Opaque(str(marker)),
    }
    src, dst = str(tmp_path / "dcp"), str(tmp_path / "unickpt")
    dcp.save(state, checkpoint_id=src, no_dist=True)
    with pytest.warns(UserWarning, match="import_dcp") as caught:
        manifest = import_dcp(src, dst)
    (message,) = [str(w.message) for w in caught if "import_dcp" in str(w.message)]
    assert "2 non-tensor value(s)" in message and "blob (bytes, not JSON)" in message
    assert "opaque (needs trust_pickle" in message
    assert not marker.exists()
    assert set(manifest.tensors) == {
        "model.weight",
        "model.bias",
        "extra.table",
        "half",
        "pair.0",
    }
    assert manifest.objects == {
        "extra.epoch": 3,
        "pair.1.k": 1,
        "sched.milestones": [10, 20],
        "sched.name": "step",
    }
    with CheckpointReader(dst) as reader:
        assert torch.equal(reader.read("model.weight"), linear.weight.detach())
        assert torch.equal(reader.read("extra.table"), state["extra"]["table"])
        half = reader.read("half")
        assert half.dtype == torch.bfloat16 and torch.equal(half, state["half"])
    target = torch.nn.Linear(5, 3)
    unickpt.load(dst, {"model": target}, strict=False)
    assert torch.equal(target.weight, linear.weight) and torch.equal(target.bias, linear.bias)


def _small_dcp(path: Path) -> None:
    dcp.save(
        {"model": {"w": torch.arange(64.0).reshape(8, 8)}}, checkpoint_id=str(path), no_dist=True
    )


def test_malicious_metadata_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    src = tmp_path / "evil"
    src.mkdir()
    (src / ".metadata").write_bytes(pickle.dumps(_Opaque(str(marker))))
    with pytest.raises(UnsafeCheckpointError, match=r"global posix\.system .*trust-pickle"):
        import_dcp(str(src), str(tmp_path / "out"))
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_storage_entry_outside_the_directory_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "dcp"
    _small_dcp(src)
    metadata = pickle.loads((src / ".metadata").read_bytes())  # our own file: trusted here
    for info in metadata.storage_data.values():
        info.relative_path = "../outside.distcp"
    (src / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UnsafeCheckpointError, match=r"outside\.distcp"):
        import_dcp(str(src), str(tmp_path / "out"))


def test_truncated_data_file_is_named(tmp_path: Path) -> None:
    src = tmp_path / "dcp"
    _small_dcp(src)
    (data,) = src.glob("*.distcp")
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(CorruptCheckpointError, match=rf"{data.name} is truncated"):
        import_dcp(str(src), str(tmp_path / "out"))


def test_any_storage_backend_and_large_items(tmp_path: Path) -> None:
    """Items above WHOLE_RECORD_BYTES are read through a file view (torch.load seeks in it)
    rather than fetched whole; through a non-local backend, both ways."""
    big = torch.randn(700, 1000, generator=torch.Generator().manual_seed(0))  # 2.8 MB
    state = {"model": {"big": big, "small": torch.arange(10)}, "meta": {"epoch": 4}}
    dcp.save(state, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    source = MemoryStorage("convert-dcp", "src")
    for path in (tmp_path / "dcp").iterdir():
        source.put_atomic(path.name, path.read_bytes())
    manifest = import_dcp("memory://convert-dcp/src", "memory://convert-dcp/dst")
    assert manifest.objects == {"meta.epoch": 4}
    assert manifest.writer["converted_from"] == {
        "format": "torch-dcp",
        "path": "memory://convert-dcp/src",  # as given
        "items": 3,
    }
    with CheckpointReader("memory://convert-dcp/dst") as reader:
        assert torch.equal(reader.read("model.big"), big)
        assert torch.equal(reader.read("model.small"), torch.arange(10))
