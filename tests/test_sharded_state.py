"""Hand-rolled sharding (unickpt.ShardedTensor, stage-local keys) and Stateful objects."""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import re
from typing import Any

import pytest
import torch

import unickpt

from dist_harness import run_distributed

FULL = torch.arange(40, dtype=torch.float32).reshape(10, 4)


def _save_pp_tp(rank: int, world_size: int, path: str) -> None:
    rows = slice(rank * 5, rank * 5 + 5)  # TP-style row shard of a global (10, 4)
    state = {
        "shared": unickpt.ShardedTensor(FULL[rows].clone(), FULL.shape, (rank * 5, 0)),
        # PP-style: a key only this stage has, and a replicated scalar every rank holds
        f"stage{rank}": {"w": torch.full((3,), float(rank))},
        "step": torch.tensor(7),
    }
    unickpt.save(path, state, step=7)


def _load_uneven(rank: int, world_size: int, path: str) -> list[torch.Tensor]:
    bounds = [(0, 3), (3, 10)][rank]
    local = torch.zeros(bounds[1] - bounds[0], 4)
    state = {
        "shared": unickpt.ShardedTensor(local, (10, 4), (bounds[0], 0)),
        f"stage{rank}": {"w": torch.zeros(3)},
        "step": torch.tensor(0),
    }
    result = unickpt.load(path, state, strict=False)
    assert result.unexpected_keys == [f"stage{1 - rank}.w"]
    assert result.bytes_read == result.bytes_needed
    return [local, state[f"stage{rank}"]["w"], state["step"]]


def test_sharded_tensor_and_stage_local_keys_across_layouts(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(os.fspath(tmp_path), "ck")
    run_distributed(2, _save_pp_tp, path)
    manifest = unickpt.inspect(path)
    assert len(manifest.tensors["shared"].chunks) == 2
    assert manifest.writer["world_size"] == 2

    full = {
        "shared": torch.zeros(10, 4),
        "stage0": {"w": torch.zeros(3)},
        "stage1": {"w": torch.zeros(3)},
        "step": torch.tensor(0),
    }
    unickpt.load(path, full)  # world 1: the whole model, every stage
    assert torch.equal(full["shared"], FULL)
    assert torch.equal(full["stage1"]["w"], torch.ones(3)) and int(full["step"]) == 7

    uneven = run_distributed(2, _load_uneven, path)
    assert torch.equal(uneven[0][0], FULL[0:3]) and torch.equal(uneven[1][0], FULL[3:10])
    assert torch.equal(uneven[1][1], torch.ones(3)) and int(uneven[0][2]) == 7


def _fsdp2_with_an_empty_weight(rank: int, world_size: int, path: str) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(0, 4), torch.nn.Linear(4, 3))
    reference = {key: value.clone() for key, value in model.state_dict().items()}
    fully_shard(model)
    unickpt.save(path, {"model": model})
    return reference


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op:UserWarning")
def test_fsdp2_shards_of_a_weight_with_no_elements_save(tmp_path: pathlib.Path) -> None:
    # FSDP2 gives each rank a [0, 0] piece of a [4, 0] weight: refused as not the [2, 0] shard
    # its placement implies (audit R).
    path = str(tmp_path / "fsdp")
    reference = run_distributed(2, _fsdp2_with_an_empty_weight, path)[0]
    model = torch.nn.Sequential(torch.nn.Linear(0, 4), torch.nn.Linear(4, 3))
    unickpt.load(path, {"model": model})
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference[key]), key


def test_overlapping_sharded_tensors_are_refused(tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(unickpt.InvalidStateError, match="does not fit in global shape"):
        unickpt.ShardedTensor(torch.zeros(6, 4), (10, 4), (5, 0))
    for offsets in [(4,), (4, 0, 0)]:  # a bare zip() ValueError before
        with pytest.raises(unickpt.InvalidStateError, match="must have as many dimensions"):
            unickpt.ShardedTensor(torch.zeros(4, 6), (8, 6), offsets)
    state = {"t": unickpt.ShardedTensor(torch.zeros(5, 4), (10, 4), (0, 0))}
    with pytest.raises(unickpt.InvalidStateError, match=r"'t'.*do not tile.*gap"):
        unickpt.save(os.path.join(os.fspath(tmp_path), "ck"), state)


def test_scheduler_and_stateful_objects_round_trip(tmp_path: os.PathLike[str]) -> None:
    model = torch.nn.Linear(3, 3)
    optim = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optim, step_size=2, gamma=0.5)
    for _ in range(5):
        optim.step()
        scheduler.step()
    path = os.path.join(os.fspath(tmp_path), "ck")
    unickpt.save(path, {"model": model, "optim": optim, "sched": scheduler})

    model2 = torch.nn.Linear(3, 3)
    optim2 = torch.optim.SGD(model2.parameters(), lr=1.0)
    scheduler2 = torch.optim.lr_scheduler.StepLR(optim2, step_size=2, gamma=0.5)
    unickpt.load(path, {"model": model2, "optim": optim2, "sched": scheduler2})
    assert scheduler2.state_dict() == scheduler.state_dict()
    assert optim2.param_groups[0]["lr"] == optim.param_groups[0]["lr"] == 0.25
    scheduler.step(), scheduler2.step()
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()


def test_optimizer_state_follows_names_whatever_the_group_order(tmp_path: pathlib.Path) -> None:
    """Converted checkpoints list a group's parameters in the source framework's order."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    adam = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(5, 4)).sum().backward()
    adam.step()
    unickpt.save(str(tmp_path / "c"), {"model": model, "optim": adam})

    twin = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    reordered = torch.optim.Adam(list(twin.parameters())[::-1], lr=0.5)
    unickpt.load(str(tmp_path / "c"), {"model": twin, "optim": reordered})
    assert reordered.param_groups[0]["lr"] == 0.01
    for param, source in zip(twin.parameters(), model.parameters(), strict=True):
        assert torch.equal(reordered.state[param]["exp_avg"], adam.state[source]["exp_avg"])


def test_tensor_hyperparameters_round_trip_as_tensors(tmp_path: pathlib.Path) -> None:
    # lr as a 0-d tensor is how compiled optimizers take a schedule without recompiling
    model = torch.nn.Linear(4, 3)
    optim = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.01), betas=(0.8, 0.9))
    model(torch.randn(2, 4)).sum().backward()
    optim.step()
    optim.param_groups[0]["lr"].fill_(0.002)
    unickpt.save(str(tmp_path / "c"), {"model": model, "optim": optim})
    target = torch.nn.Linear(4, 3)
    target_optim = torch.optim.Adam(target.parameters(), lr=torch.tensor(0.5))
    unickpt.load(str(tmp_path / "c"), {"model": target, "optim": target_optim})
    group = target_optim.param_groups[0]
    assert isinstance(group["lr"], torch.Tensor) and group["lr"].item() == pytest.approx(0.002)
    assert group["betas"] == (0.8, 0.9)
    assert torch.equal(
        target_optim.state[target.weight]["exp_avg"], optim.state[model.weight]["exp_avg"]
    )


class _FP8Scale(torch.nn.Module):
    """Extra state serialised as a tensor, as TransformerEngine's FP8 modules do."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.amax = torch.zeros(4)

    def get_extra_state(self) -> torch.Tensor:
        return self.amax.clone()

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.amax = state.clone()


class _FusedQKV(torch.nn.Module):
    """One fused parameter, saved as three (a state-dict hook splits, a load hook fuses)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Parameter(torch.zeros(6, 2))
        self._register_state_dict_hook(_FusedQKV._split)
        self._register_load_state_dict_pre_hook(_FusedQKV._fuse)

    @staticmethod
    def _split(
        module: torch.nn.Module, sd: dict[str, torch.Tensor], prefix: str, _: object
    ) -> None:
        for name, part in zip("qkv", sd.pop(prefix + "qkv").chunk(3), strict=True):
            sd[prefix + name] = part.clone()

    @staticmethod
    def _fuse(sd: dict[str, torch.Tensor], prefix: str, *_: object) -> None:
        sd[prefix + "qkv"] = torch.cat([sd.pop(prefix + name) for name in "qkv"])


class _CachedInverse(torch.nn.Module):
    """A derived cache that a load post-hook rebuilds."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.eye(2))
        self.inv = torch.eye(2)
        self.register_load_state_dict_post_hook(
            lambda m, _: setattr(m, "inv", m.w.detach().inverse())
        )


@pytest.mark.parametrize(
    ("make", "live"),
    [
        (_FP8Scale, lambda m: m.amax),
        (_FusedQKV, lambda m: m.qkv),
        (_CachedInverse, lambda m: m.inv),
    ],
    ids=["tensor-extra-state", "split-by-hooks", "load-post-hook"],
)
def test_modules_whose_state_dict_is_not_their_tensors_are_restored(
    tmp_path: pathlib.Path, make: type[torch.nn.Module], live: object
) -> None:
    """A module's state dict may hold copies (extra state, hook-made tensors) or need its load
    hooks: such a module is restored through load_state_dict, as torch would."""
    source = make()
    with torch.no_grad():
        for param in source.parameters():
            param.copy_(torch.arange(param.numel(), dtype=torch.float32).view_as(param) + 2)
    if isinstance(source, _FP8Scale):
        source.amax = torch.tensor([1.0, 2.0, 3.0, 4.0])
    if isinstance(source, _CachedInverse):
        source.inv = source.w.detach().inverse()
    unickpt.save(str(tmp_path / "c"), {"model": source})
    target = make()
    unickpt.load(str(tmp_path / "c"), {"model": target})
    assert callable(live)
    assert torch.equal(live(target), live(source))
    for mine, theirs in zip(target.parameters(), source.parameters(), strict=True):
        assert torch.equal(mine, theirs)


class _Position:
    """A Stateful whose state is not a dict (a sampler's position)."""

    def __init__(self, value: object) -> None:
        self.value = value

    def state_dict(self) -> object:
        return self.value

    def load_state_dict(self, state: object) -> None:
        self.value = state


class _PyRandom:
    """Python's RNG state is tuples all the way down; setstate refuses lists."""

    def __init__(self) -> None:
        self.rng = __import__("random").Random(5)

    def state_dict(self) -> dict[str, object]:
        return {"py": self.rng.getstate()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.rng.setstate(state["py"])  # type: ignore[arg-type]


def test_every_saved_value_is_handed_back(tmp_path: pathlib.Path) -> None:
    """Non-dict Stateful states, objects beside tensors in tuples, and tuples (which JSON
    stores as lists) come back as they were saved."""
    loader = {"pos": (torch.ones(3), 4096)}
    rng = _PyRandom()
    rng.rng.random()
    source = {
        "sampler": _Position(1234),
        "order": _Position([3, 1, 2]),
        "loader": _Position(loader),
        "pair": (torch.ones(2), 17),
        "rng": rng,
        "betas": {"w": torch.ones(1), "b": (0.9, (0.99, 1))},
    }
    unickpt.save(str(tmp_path / "c"), source)
    target_rng = _PyRandom()
    target = {
        "sampler": _Position(0),
        "order": _Position([0, 0, 0]),
        "loader": _Position({"pos": (torch.zeros(3), 0)}),
        "pair": (torch.zeros(2), 0),
        "rng": target_rng,
        "betas": {"w": torch.zeros(1), "b": (0.0, (0.0, 0))},
    }
    result = unickpt.load(str(tmp_path / "c"), target)
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    assert target["sampler"].value == 1234 and target["order"].value == [3, 1, 2]
    position = target["loader"].value["pos"]
    assert torch.equal(position[0], torch.ones(3)) and position[1] == 4096
    assert torch.equal(target["pair"][0], torch.ones(2)) and target["pair"][1] == 17
    assert target_rng.rng.random() == rng.rng.random()
    assert target["betas"]["b"] == (0.9, (0.99, 1))


def test_a_stateful_refusing_its_state_is_named(tmp_path: pathlib.Path) -> None:
    unickpt.save(str(tmp_path / "c"), {"rng": _Position({"py": [1, 2]})})
    with pytest.raises(unickpt.StateMismatchError, match=r"^rng: _PyRandom\.load_state_dict\(\)"):
        unickpt.load(str(tmp_path / "c"), {"rng": _PyRandom()})


def test_an_object_where_the_state_holds_a_tensor_is_refused(tmp_path: pathlib.Path) -> None:
    unickpt.save(str(tmp_path / "c"), {"trainer": {"tokens": 123456, "w": torch.ones(2)}})
    target = {"trainer": {"tokens": torch.tensor(0), "w": torch.zeros(2)}}
    for strict in (True, False):
        with pytest.raises(unickpt.StateMismatchError) as exc:
            unickpt.load(str(tmp_path / "c"), target, strict=strict)
        assert "trainer.tokens: expected a tensor, found an object (123456)" in str(exc.value)
        assert not target["trainer"]["w"].any()


def test_one_optimizer_over_modules_with_the_same_names_is_explained(
    tmp_path: pathlib.Path,
) -> None:
    encoder, decoder = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    optim = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()])
    with pytest.raises(
        unickpt.InvalidStateError,
        match=r"optimizer 'optim': .* \['bias', 'weight'\].*nn\.ModuleDict",
    ):
        unickpt.save(str(tmp_path / "c"), {"encoder": encoder, "decoder": decoder, "optim": optim})
    model = torch.nn.ModuleDict({"encoder": encoder, "decoder": decoder})
    unickpt.save(str(tmp_path / "c"), {"model": model, "optim": optim})  # the fix it suggests


@pytest.mark.parametrize("strict", [True, False])
def test_rolling_back_to_before_the_first_step_resets_the_optimizer(
    tmp_path: pathlib.Path, strict: bool
) -> None:
    """Saved before the first step, an optimizer has no state; loading that into one that has
    stepped since (a NaN rollback) leaves it without state, as torch's load_state_dict does."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    adam = torch.optim.Adam(model.parameters(), lr=0.1)
    unickpt.save(str(tmp_path / "c"), {"model": model, "optim": adam})
    initial = {k: v.clone() for k, v in model.state_dict().items()}

    def step(optim: torch.optim.Optimizer, net: torch.nn.Module) -> None:
        net(torch.ones(2, 4)).square().sum().backward()
        optim.step()
        optim.zero_grad()

    for _ in range(3):
        step(adam, model)
    unickpt.load(str(tmp_path / "c"), {"model": model, "optim": adam}, strict=strict)
    assert adam.state_dict()["state"] == {}
    fresh = torch.nn.Linear(4, 3)
    fresh.load_state_dict(initial)
    fresh_adam = torch.optim.Adam(fresh.parameters(), lr=0.1)
    step(adam, model), step(fresh_adam, fresh)
    for mine, theirs in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(mine, theirs)


def _train_under_ddp(rank: int, world_size: int, path: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 3))
    adam = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.full((2, 4), float(rank + 1))).sum().backward()
    adam.step()
    unickpt.save(path, {"model": model, "optim": adam})
    return {k: v.clone() for k, v in adam.state[model.module.weight].items()}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile imports torch.jit
def test_a_model_saved_under_ddp_loads_unwrapped_and_compiled(tmp_path: pathlib.Path) -> None:
    """Wrappers (DDP, torch.compile) add no key: DDP on 2 ranks -> a plain model, and a
    compiled one, in one process; optimizer state included."""
    path = str(tmp_path / "ddp")
    moments = run_distributed(2, _train_under_ddp, path)[0]
    manifest = unickpt.inspect(path)
    assert sorted(manifest.tensors)[:3] == [
        "model.bias",
        "model.weight",
        "optim.state.bias.exp_avg",
    ]
    for wrap in (lambda m: m, torch.compile):
        plain = torch.nn.Linear(4, 3)
        model = wrap(plain)
        adam = torch.optim.Adam(model.parameters(), lr=0.5)
        unickpt.load(path, {"model": model, "optim": adam})
        assert adam.param_groups[0]["lr"] == 0.1
        for name, value in moments.items():
            assert torch.equal(adam.state[plain.weight][name], value), name
        unickpt.save(str(tmp_path / f"again-{wrap is torch.compile}"), {"model": model})
        assert sorted(
            unickpt.inspect(str(tmp_path / f"again-{wrap is torch.compile}")).tensors
        ) == [
            "model.bias",
            "model.weight",
        ]


def _batchnorm_net() -> torch.nn.Sequential:
    widths = [8, 64, 32, 16]
    return torch.nn.Sequential(
        *(
            layer
            for n_in, n_out in itertools.pairwise(widths)
            for layer in (torch.nn.Linear(n_in, n_out), torch.nn.BatchNorm1d(n_out))
        )
    )


def _batchnorm_under_ddp(rank: int, world_size: int, path: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = _batchnorm_net()
    model = torch.nn.parallel.DistributedDataParallel(net)
    model(torch.randn(4, 8) + rank).sum().backward()  # each rank's statistics its own batch's
    for mode in ("sync", "async", "lazy"):
        handle = unickpt.save(f"{path}/{mode}", {"model": model}, mode=mode)
        if isinstance(handle, unickpt.SaveHandle):
            handle.wait()
    return {k: v.clone() for k, v in net.named_buffers()}


def test_ddp_buffers_are_saved_from_rank_0(tmp_path: pathlib.Path) -> None:
    """DDP leaves each rank's BatchNorm statistics its own until the next forward broadcasts
    rank 0's: a checkpoint holds rank 0's, the ones the run itself goes on with."""
    per_rank = run_distributed(3, _batchnorm_under_ddp, str(tmp_path))
    assert not torch.equal(per_rank[0]["1.running_mean"], per_rank[1]["1.running_mean"])
    for mode in ("sync", "async", "lazy"):
        net = _batchnorm_net()
        unickpt.load(f"{tmp_path}/{mode}", {"model": net})
        buffers = dict(net.named_buffers())
        for name, value in per_rank[0].items():
            assert torch.equal(buffers[name], value), (mode, name)


class _FineTuned(torch.nn.Module):
    """Saves only what it trains: its state_dict() leaves the frozen backbone out."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = torch.nn.Linear(8, 8).requires_grad_(False)
        self.head = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4))

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        full = super().state_dict(*args, **kwargs)
        return type(full)((k, v) for k, v in full.items() if not k.startswith("backbone."))


@pytest.mark.parametrize("strict", [True, False])
def test_a_module_whose_state_dict_leaves_keys_out_loads(
    tmp_path: pathlib.Path, strict: bool
) -> None:
    """Restored through load_state_dict (BatchNorm overrides its loading), a module is not
    refused for the keys its own state_dict() leaves out."""
    torch.manual_seed(0)
    source = _FineTuned()
    source.head(torch.randn(5, 8))  # the running statistics move
    unickpt.save(str(tmp_path / "c"), {"model": source})
    torch.manual_seed(1)
    target = _FineTuned()
    backbone = target.backbone.weight.clone()
    unickpt.load(str(tmp_path / "c"), {"model": target}, strict=strict)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    assert torch.equal(target.backbone.weight, backbone)


class _ExtraStateNobodySets(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.seen = 0

    def get_extra_state(self) -> dict[str, int]:
        return {"seen": self.seen}


class _SavedAsFp16(torch.nn.Module):
    """A state-dict hook stores the weight under another name, and nothing converts it back."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4, 4))
        self._register_state_dict_hook(_SavedAsFp16._to_fp16)

    @staticmethod
    def _to_fp16(module: torch.nn.Module, sd: dict[str, Any], prefix: str, _: object) -> None:
        sd[prefix + "w16"] = sd.pop(prefix + "weight").half()


class _OneArgumentLoad(torch.nn.Module):
    """An EMA holder overriding load_state_dict without torch's ``strict`` parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.shadow = torch.nn.BatchNorm1d(3)

    def load_state_dict(self, state_dict: Any) -> Any:  # type: ignore[override]
        return super().load_state_dict(state_dict)


@pytest.mark.parametrize("make", [_ExtraStateNobodySets, _SavedAsFp16], ids=["extra", "fp16"])
def test_state_a_module_cannot_take_is_refused_not_dropped(
    tmp_path: pathlib.Path, make: type[torch.nn.Module]
) -> None:
    source = make()
    unickpt.save(str(tmp_path / "c"), {"m": source})
    with pytest.raises(unickpt.StateMismatchError, match=r"^m: .*load_state_dict\(\) refused"):
        unickpt.load(str(tmp_path / "c"), {"m": make()}, strict=False)


def test_a_load_state_dict_without_strict_is_called_plainly(tmp_path: pathlib.Path) -> None:
    source = _OneArgumentLoad()
    source.shadow(torch.randn(5, 3))
    unickpt.save(str(tmp_path / "c"), {"ema": source})
    target = _OneArgumentLoad()
    unickpt.load(str(tmp_path / "c"), {"ema": target})
    assert torch.equal(target.shadow.running_mean, source.shadow.running_mean)


@pytest.mark.parametrize("layout", ["transposed", "column slice"])
def test_a_non_contiguous_target_is_filled_in_place(tmp_path: pathlib.Path, layout: str) -> None:
    """A target whose memory is not one row-major run (a transposed weight, a slice of a larger
    buffer) cannot take the file's bytes as they are: reading into a flattened copy of it left
    the target unchanged and the load reported success."""
    saved = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    unickpt.save(str(tmp_path / "c"), {"w": saved})
    backing = torch.zeros(8, 4) if layout == "transposed" else torch.zeros(4, 16)
    target = backing.t() if layout == "transposed" else backing[:, 4:12]
    assert target.shape == (4, 8) and not target.is_contiguous()
    unickpt.load(str(tmp_path / "c"), {"w": target})
    assert torch.equal(target, saved), "the load did not reach the target's own memory"
    if layout == "column slice":  # and nothing beside the slice was written
        assert not backing[:, :4].any() and not backing[:, 12:].any()


def test_a_damaged_pickled_entry_is_refused(tmp_path: pathlib.Path) -> None:
    """A pickled entry's bytes are checked against the manifest before they are unpickled: a
    flipped byte inside the pickle otherwise loads as a silently different object (or runs
    whatever the damaged opcodes say)."""
    path = tmp_path / "c"
    unickpt.save(str(path), {"w": torch.ones(2), "tags": {"A" * 64}}, allow_pickle=True)
    manifest = json.loads((path / "manifest.json").read_text())
    (chunk,) = manifest["tensors"]["tags"]["chunks"]
    data = path / chunk["file"]
    raw = bytearray(data.read_bytes())
    at = raw.index(b"A" * 64, chunk["offset"], chunk["offset"] + chunk["nbytes"])
    raw[at + 10] = ord("B")
    data.write_bytes(bytes(raw))
    target: dict[str, Any] = {"w": torch.zeros(2), "tags": None}
    with pytest.raises(unickpt.CorruptCheckpointError, match=r"checksum mismatch .*'tags"):
        unickpt.load(str(path), target, allow_pickle=True)
    assert target["tags"] is None


def _save_stage_local_values(rank: int, world_size: int, path: str, mode: str) -> str:
    """Pipeline-style: values only some stages hold (the last one's loss scaler), and one that
    ranks 1 and 2 hold differently. Returns what the save raised, if anything."""
    state: dict[str, Any] = {"w": torch.ones(2), "common": rank}
    if rank >= 1:
        state["mid"] = {"seen_by": rank}
    if rank == world_size - 1:
        state["last_stage"] = {"scaler": {"scale": 65536.0, "growth_tracker": 17}}
    if mode == "mixed":  # a tensor here, a plain value there
        state["x"] = torch.zeros(1) if rank == 0 else 5
    if mode == "pickled":  # a pickled value rank 0 does not hold
        state.update({"cfg": {1, 2}} if rank == 2 else {})
    try:
        result = unickpt.save(
            path, state, allow_pickle=True, mode="sync" if mode == "sync" else "async"
        )
        if mode != "sync":
            result.wait()  # type: ignore[union-attr]
    except unickpt.CheckpointError as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_values_held_by_ranks_other_than_0_are_saved(tmp_path: pathlib.Path, mode: str) -> None:
    """A non-tensor value rank 0 does not hold is recorded from the lowest rank holding it (it
    used to be dropped without a word); rank 0's value of a key all hold is recorded."""
    path = os.fspath(tmp_path / "ck")
    assert run_distributed(3, _save_stage_local_values, path, mode) == ["", "", ""]
    objects = unickpt.inspect(path).objects
    assert objects == {
        "common": 0,
        "mid.seen_by": 1,
        "last_stage.scaler.scale": 65536.0,
        "last_stage.scaler.growth_tracker": 17,
    }, objects
    target: dict[str, Any] = {"w": torch.zeros(2), "last_stage": {"scaler": {}}}
    target["last_stage"]["scaler"] = {"scale": 1.0, "growth_tracker": 0}
    unickpt.load(path, target, strict=False)
    assert target["last_stage"]["scaler"] == {"scale": 65536.0, "growth_tracker": 17}


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("mixed", "InvalidStateError: save to .* 'x' are tensors on some ranks and non-tensor"),
        (
            "pickled",
            "InvalidStateError: pickled state entries are saved from rank 0 only, and "
            "rank 0 does not hold 'cfg' \\(rank 2\\)",
        ),
    ],
)
def test_values_that_cannot_be_merged_fail_every_rank(
    tmp_path: pathlib.Path, mode: str, expected: str
) -> None:
    path = os.fspath(tmp_path / "ck")
    errors = run_distributed(3, _save_stage_local_values, path, mode)
    assert all(re.match(expected, error, re.DOTALL) for error in errors), errors
    assert not os.path.exists(os.path.join(path, "manifest.json"))
