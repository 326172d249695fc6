"""DeepSpeed ZeRO-1/2/3 checkpoints, written by the real DeepSpeed engine, converted to unickpt.

The module fixture runs tests/deepspeed_train.py once: two gloo ranks on CPU train ``Net`` (two
AdamW groups, a frozen parameter, a buffer, sizes that split tensors across ZeRO partitions and
pad them) at ZeRO stages 1, 2 and 3, in fp32 and in bf16 with fp32 master weights, save each with
``engine.save_checkpoint``, and convert each with DeepSpeed's own ``ds_to_universal
--inject_missing_state`` (the reference). For fp32 they also run one more step and record its
loss and updated parameters. Two more runs train a tiny Llama tensor parallel over both ranks
(DeepSpeed AutoTP, ZeRO-1 and -2), whose merge unickpt derives from the checkpoint's own
``universal_checkpoint_info``. One more trains ``Net``'s layers as a DeepSpeed ``PipelineModule``
with one pipeline stage per rank (ZeRO-1): weights in layer files, an optimizer file per stage.

Each conversion must equal the reference bit for bit (master weights, both Adam moments, step),
hold exactly the keys ``unickpt.save({"model": net, "optim": adamw})`` writes, load into a plain
model + torch AdamW at world size 1 and into FSDP2 at world size 2, and resume DeepSpeed's
training: the next step reproduces DeepSpeed's loss and parameters exactly (every rank trained
on the same batch, so the data-parallel gradient average is exact).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from typer.testing import CliRunner

import unickpt
from unickpt.cli.main import app
from unickpt.convert.deepspeed import DEEPSPEED_GLOBALS, import_deepspeed
from unickpt.convert.torchfile import load_torch_file
from unickpt.engine.load import CheckpointReader
from unickpt.errors import (
    CheckpointNotFoundError,
    ConversionError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
)

from deepspeed_train import (
    SIZES,
    TAG,
    Net,
    llama_loss,
    loss_fn,
    make_llama,
    make_net,
    make_pipeline_layers,
    param_groups,
    run_name,
)
from dist_harness import run_distributed

pytestmark = pytest.mark.skipif(
    find_spec("deepspeed") is None, reason="deepspeed is not installed (`make install` adds it)"
)

SIZE = SIZES["tiny"]
STEPS = 3
STAGES = (1, 2, 3)
DTYPES = ("fp32", "bf16")
RUNS = [run_name(stage, dtype) for stage in STAGES for dtype in DTYPES]
TIED_STAGES = (2, 3)  # a head tied to the embedding: one flat-partitioned, one ZeRO-3 parameter
TIED_RUNS = [run_name(stage, "fp32") + "-tied" for stage in TIED_STAGES]
FP32_RUNS = [run_name(stage, "fp32") for stage in STAGES] + TIED_RUNS
AUTOTP_STAGES = (1, 2)  # DeepSpeed's AutoTP training supports ZeRO 0-2
AUTOTP_RUNS = [f"autotp-zero{stage}" for stage in AUTOTP_STAGES]
PIPELINE_RUNS = ["pipeline-zero1"]  # two stages, ZeRO-1 over data parallel 1
TRAINER = Path(__file__).with_name("deepspeed_train.py")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The DeepSpeed checkpoints and DeepSpeed's universal conversions of them."""
    out = tmp_path_factory.mktemp("deepspeed")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(TRAINER), str(out), "--steps", str(STEPS), "--universal"]
    command += ["--dtypes", *DTYPES, "--tied", *map(str, TIED_STAGES)]
    command += ["--autotp", *map(str, AUTOTP_STAGES), "--pipeline", "1"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


@pytest.fixture(scope="module")
def converted(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Each run converted by unickpt (from the save directory: the tag comes from ``latest``)."""
    out = tmp_path_factory.mktemp("unickpt")
    paths = {}
    for run in RUNS + TIED_RUNS + AUTOTP_RUNS + PIPELINE_RUNS:
        paths[run] = str(out / run)
        import_deepspeed(trained / run / "ckpt", paths[run])
    return paths


def _reference(path: Path) -> torch.Tensor:
    """One tensor of ds_to_universal's output: ``{"param": t, ...}`` (ZeRO-1/2) or bare (ZeRO-3)."""
    value = torch.load(path, weights_only=True)
    return value["param"] if isinstance(value, dict) else value


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Compute as DeepSpeed's ranks did (one intra-op thread): a matmul or norm split over more
    threads may sum in another order, and the resume checks are bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _read_all(path: str) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(path)
    return {key: reader.read(key) for key in reader.manifest.tensors}


# ------------------------------------------------------------------------------ bit for bit


def _net(run: str, seed: int = 0) -> Net:
    return make_net(SIZE, seed, tied=run.endswith("-tied"))


@pytest.mark.parametrize("run", RUNS + TIED_RUNS)
def test_matches_ds_to_universal(trained: Path, converted: dict[str, str], run: str) -> None:
    ours = _read_all(converted[run])
    universal = trained / run / "universal" / TAG.format(steps=STEPS) / "zero"
    net = _net(run)
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]  # tied: once
    expected_keys = {f"model.{k}" for k in net.state_dict()} | {
        f"optim.state.{n}.{slot}" for n in trainable for slot in ("exp_avg", "exp_avg_sq", "step")
    }
    assert set(ours) == expected_keys

    groups = load_torch_file(universal / "optimizer_state.pt", extra_globals=DEEPSPEED_GLOBALS)
    zero3_state = groups.get("optimizer_state_dict", {}).get("state", {})
    for name in trainable:
        for slot, key in (
            ("fp32", f"model.{name}"),
            ("exp_avg", f"optim.state.{name}.exp_avg"),
            ("exp_avg_sq", f"optim.state.{name}.exp_avg_sq"),
        ):
            reference = _reference(universal / name / f"{slot}.pt")
            mine = ours[key]
            assert mine.dtype == torch.float32 and mine.shape == net.get_parameter(name).shape
            if not run.startswith("zero3"):  # ZeRO-3's universal files are flat
                assert mine.shape == reference.shape, key
            assert torch.equal(mine.reshape(-1), reference.reshape(-1)), key
        step = ours[f"optim.state.{name}.step"]
        assert step.dtype == torch.float32 and step.shape == ()
        if (universal / name / "step.pt").exists():
            assert torch.equal(step, torch.load(universal / name / "step.pt", weights_only=True))
        else:  # ZeRO-3: the reference keeps the step in the optimizer's flat groups only
            assert {float(s["step"]) for s in zero3_state.values()} == {float(step)}
        assert float(step) == STEPS

    if run in TIED_RUNS:  # the tied name holds the same (master) weight, no optimizer state
        assert "head.weight" not in trainable
        assert torch.equal(ours["model.head.weight"], ours["model.embed.weight"])

    # The frozen parameter and the buffer: as the module stored them (bf16 runs cast modules)
    dtype = torch.bfloat16 if run.endswith("bf16") else torch.float32
    assert torch.equal(ours["model.pos"], net.pos.detach().to(dtype))
    assert torch.equal(ours["model.logit_scale"], torch.tensor(0.75))
    for name in ("pos", "logit_scale"):
        if (universal / name / "fp32.pt").exists():  # ZeRO-1/2 references include them
            assert torch.equal(
                ours[f"model.{name}"].float(), _reference(universal / name / "fp32.pt")
            )


@pytest.mark.parametrize("run", RUNS + TIED_RUNS)
def test_manifest_records_groups_step_and_source(converted: dict[str, str], run: str) -> None:
    manifest = unickpt.inspect(converted[run])
    assert manifest.step == STEPS
    decay, no_decay = manifest.objects["optim.param_groups"]
    net = _net(run)
    names = {id(p): n for n, p in net.named_parameters()}
    expected = [[names[id(p)] for p in g["params"]] for g in param_groups(net)]
    assert [decay["params"], no_decay["params"]] == expected
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert decay["lr"] == 1e-2 and decay["betas"] == [0.9, 0.95] and decay["eps"] == 1e-8
    source = manifest.writer["converted_from"]
    assert source["format"] == "deepspeed"
    assert source["zero_stage"] == int(run[4]) and source["dp_degree"] == 2


# ------------------------------------------------------------------------------ resuming


def _adamw(net: torch.nn.Module) -> torch.optim.AdamW:
    # hyper-parameters deliberately wrong: the checkpoint's must replace them
    return torch.optim.AdamW(param_groups(net), lr=0.5, betas=(0.5, 0.5), weight_decay=0.0)


@pytest.mark.parametrize("run", FP32_RUNS)
@pytest.mark.usefixtures("one_thread")
def test_resumes_deepspeed_training_at_world_1(
    trained: Path, converted: dict[str, str], run: str
) -> None:
    net = _net(run, seed=1)  # a different start: the load must overwrite everything
    adamw = _adamw(net)
    unickpt.load(converted[run], {"model": net, "optim": adamw})
    ours = _read_all(converted[run])
    for name, tensor in net.state_dict().items():
        assert torch.equal(tensor, ours[f"model.{name}"]), name

    expected = load_file(trained / run / "next.safetensors")
    loss = loss_fn(net, SIZE, STEPS)
    loss.backward()
    adamw.step()
    assert torch.equal(loss.detach(), expected["loss"])
    for name, param in net.named_parameters():
        assert torch.equal(param.detach(), expected[name]), name


def _fsdp_resume(rank: int, world: int, paths: dict[str, str], nexts: dict[str, str]) -> Any:
    """On each rank: an FSDP2 model from another seed, load, one step; the loss and how far each
    full parameter is from DeepSpeed's."""
    report = {}
    for run, path in paths.items():
        net = _net(run, seed=1)
        for block in net.blocks:
            fully_shard(block)
        fully_shard(net)
        adamw = _adamw(net)
        unickpt.load(path, {"model": net, "optim": adamw})
        loss = loss_fn(net, SIZE, STEPS)
        loss.backward()
        adamw.step()
        expected = load_file(nexts[run])
        full = {
            n: (p.full_tensor() if isinstance(p, DTensor) else p).detach()
            for n, p in net.named_parameters()
        }
        report[run] = {
            "loss": (loss.item(), expected["loss"].item()),
            "max_diff": {n: float((t - expected[n]).abs().max()) for n, t in full.items()},
        }
    return report


def test_loads_into_fsdp2_at_world_2_and_resumes(trained: Path, converted: dict[str, str]) -> None:
    paths = {run: converted[run] for run in FP32_RUNS}
    nexts = {run: str(trained / run / "next.safetensors") for run in FP32_RUNS}
    for rank, report in enumerate(run_distributed(2, _fsdp_resume, paths, nexts)):
        for run, result in report.items():
            ours, theirs = result["loss"]
            assert ours == theirs, (rank, run)
            # FSDP2 all-gathers the very weights; its reduce-scatter of equal gradients is exact
            assert max(result["max_diff"].values()) == 0.0, (rank, run, result["max_diff"])


# ------------------------------------------------------------------------------ tensor parallel


@pytest.mark.parametrize("run", AUTOTP_RUNS)
def test_autotp_matches_ds_to_universal(trained: Path, converted: dict[str, str], run: str) -> None:
    """TP=2 (AutoTP): the merge comes from the checkpoint's own universal_checkpoint_info."""
    ours = _read_all(converted[run])
    universal = trained / run / "universal" / TAG.format(steps=STEPS) / "zero"
    llama = make_llama()
    names = [n for n, _ in llama.named_parameters()]
    assert set(ours) == {f"model.{k}" for k in llama.state_dict()} | {
        f"optim.state.{n}.{slot}" for n in names for slot in ("exp_avg", "exp_avg_sq", "step")
    }
    for name in names:
        assert ours[f"model.{name}"].shape == llama.get_parameter(name).shape, name
        for slot, key in (
            ("fp32", f"model.{name}"),
            ("exp_avg", f"optim.state.{name}.exp_avg"),
            ("exp_avg_sq", f"optim.state.{name}.exp_avg_sq"),
        ):
            reference = _reference(universal / name / f"{slot}.pt")
            assert ours[key].shape == reference.shape and torch.equal(ours[key], reference), key
        step = torch.load(universal / name / "step.pt", weights_only=True)
        assert torch.equal(ours[f"optim.state.{name}.step"], step)
    source = unickpt.inspect(converted[run]).writer["converted_from"]
    assert (source["tp_degree"], source["dp_degree"]) == (2, 1)


# ------------------------------------------------------------------------------ pipeline parallel


@pytest.mark.parametrize("run", PIPELINE_RUNS)
def test_pipeline_matches_ds_to_universal(
    trained: Path, converted: dict[str, str], run: str
) -> None:
    """PP=2: layer files and per-stage optimizer partitions, named as the PipelineModule does."""
    ours = _read_all(converted[run])
    universal = trained / run / "universal" / TAG.format(steps=STEPS) / "zero"
    net = torch.nn.Sequential(*make_pipeline_layers(SIZE))  # the same "<layer>.<key>" names
    names = [n for n, _ in net.named_parameters()]
    assert set(ours) == {f"model.{k}" for k in net.state_dict()} | {
        f"optim.state.{n}.{slot}" for n in names for slot in ("exp_avg", "exp_avg_sq", "step")
    }
    assert sorted(p.name for p in universal.iterdir() if p.is_dir()) == sorted(names)
    for name in names:
        for slot, key in (
            ("fp32", f"model.{name}"),
            ("exp_avg", f"optim.state.{name}.exp_avg"),
            ("exp_avg_sq", f"optim.state.{name}.exp_avg_sq"),
            ("step", f"optim.state.{name}.step"),
        ):
            reference = _reference(universal / name / f"{slot}.pt")
            assert ours[key].shape == reference.shape and torch.equal(ours[key], reference), key
    manifest = unickpt.inspect(converted[run])
    by_id = {id(p): n for n, p in net.named_parameters()}
    groups = manifest.objects["optim.param_groups"]
    assert [g["params"] for g in groups] == [
        [by_id[id(p)] for p in g["params"]] for g in param_groups(net)
    ]
    source = manifest.writer["converted_from"]
    assert (source["pp_degree"], source["tp_degree"], source["dp_degree"]) == (2, 1, 1)


@pytest.mark.parametrize("run", AUTOTP_RUNS)
@pytest.mark.usefixtures("one_thread")
def test_autotp_resumes_at_world_1(trained: Path, converted: dict[str, str], run: str) -> None:
    """The merged TP=2 checkpoint loads into a plain Llama + AdamW on one process, which computes
    DeepSpeed's next loss, steps, and then computes the loss DeepSpeed had after its own step
    (up to TP's reduction order: the pieces of a row-parallel matmul are summed across ranks)."""
    llama = make_llama(seed=1)
    adamw = _adamw(llama)
    unickpt.load(converted[run], {"model": llama, "optim": adamw})
    expected = load_file(trained / run / "next.safetensors")
    loss = llama_loss(llama, STEPS)
    loss.backward()
    adamw.step()
    with torch.no_grad():
        after = llama_loss(llama, STEPS + 1)
    assert loss.item() == pytest.approx(expected["loss"].item(), rel=1e-6)
    assert after.item() == pytest.approx(expected["loss_after"].item(), rel=1e-6)


AUTOTP_SPEC = r"""
unickpt_spec: 1
name: llama autotp, renamed
rules:
  - match: '^(.*(norm|embed_tokens)\.weight)$'
    replicated: true
    rename: 'backbone.\1'
  - match: '^(.*(o_proj|down_proj)\.weight)$'
    shard: {dim: 1}
    rename: 'backbone.\1'
  - match: '^lm_head\.weight$'
    vocab_pad: {true_size: '${vocab}'}
  - match: '^(.*proj\.weight)$'
    shard: {dim: 0}
    rename: 'backbone.\1'
"""


def test_autotp_with_a_user_spec(converted: dict[str, str], trained: Path, tmp_path: Path) -> None:
    """A given spec replaces the checkpoint's own metadata: its rules merge every optimizer slot,
    its renames reach the optimizer state and the param groups; a spec that does not fit the
    layout is an error naming the tensor."""
    spec = tmp_path / "llama.yaml"
    spec.write_text(AUTOTP_SPEC)
    ckpt = trained / "autotp-zero1" / "ckpt"
    manifest = import_deepspeed(ckpt, str(tmp_path / "out"), spec=spec, variables={"vocab": 64})
    derived = _read_all(converted["autotp-zero1"])
    renamed = _read_all(str(tmp_path / "out"))

    def new_name(key: str) -> str:
        return key.replace("model.model.", "model.backbone.model.").replace(
            "optim.state.model.", "optim.state.backbone.model."
        )

    assert {new_name(k): v for k, v in derived.items()}.keys() == renamed.keys()
    for key, value in derived.items():
        assert torch.equal(renamed[new_name(key)], value), key
    groups = manifest.objects["optim.param_groups"]
    assert "backbone.model.norm.weight" in groups[1]["params"]
    assert "lm_head.weight" in groups[0]["params"]

    with pytest.raises(ConversionError, match=r"self_attn\.q_proj\.weight.*replicated"):
        import_deepspeed(ckpt, str(tmp_path / "plain"), spec="plain")


def test_cli_converts_deepspeed(trained: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["convert", "--from", "deepspeed", str(trained / RUNS[0] / "ckpt"), str(tmp_path / "o")],
    )
    assert result.exit_code == 0, result.output
    assert "70 tensors" in result.output
    assert unickpt.verify(str(tmp_path / "o")).tensors == 70


# ------------------------------------------------------------------------------ bad input


def _copy(trained: Path, run: str, tmp_path: Path) -> Path:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained / run / "ckpt", ckpt)
    return ckpt


def test_tag_selection(trained: Path, tmp_path: Path) -> None:
    ckpt = trained / run_name(2, "fp32") / "ckpt"
    tag = TAG.format(steps=STEPS)
    by_tag = import_deepspeed(ckpt, str(tmp_path / "a"), tag=tag)
    by_folder = import_deepspeed(ckpt / tag, str(tmp_path / "b"))
    assert by_tag.tensors.keys() == by_folder.tensors.keys()
    with pytest.raises(CheckpointNotFoundError, match="global_step99"):
        import_deepspeed(ckpt, str(tmp_path / "c"), tag="global_step99")
    with pytest.raises(UnsafeCheckpointError, match="not a folder name"):
        import_deepspeed(ckpt, str(tmp_path / "d"), tag="../ckpt")


def test_missing_partition_is_named(trained: Path, tmp_path: Path) -> None:
    ckpt = _copy(trained, run_name(2, "fp32"), tmp_path)
    folder = ckpt / TAG.format(steps=STEPS)
    (folder / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(CorruptCheckpointError, match=r"2 data-parallel ranks.* of 1 "):
        import_deepspeed(ckpt, str(tmp_path / "out"))
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_unsupported_layouts_are_refused(trained: Path, tmp_path: Path) -> None:
    ckpt = _copy(trained, run_name(2, "fp32"), tmp_path)
    (ckpt / TAG.format(steps=STEPS) / "layer_0_expert_0_mp_rank_00_model_states.pt").touch()
    with pytest.raises(ConversionError, match="mixture-of-experts"):
        import_deepspeed(ckpt, str(tmp_path / "moe"))


def test_pipeline_layouts_it_cannot_map_are_refused(trained: Path, tmp_path: Path) -> None:
    ckpt = _copy(trained, PIPELINE_RUNS[0], tmp_path)
    folder = ckpt / TAG.format(steps=STEPS)
    model_file = folder / "mp_rank_01_model_states.pt"
    state = load_torch_file(model_file, extra_globals=DEEPSPEED_GLOBALS)
    state["param_shapes"][0]["tied_modules.embed.weight"] = state["param_shapes"][0].pop("4.weight")
    torch.save(state, tmp_path / "edited.pt")  # not in place: ``state`` maps the old file
    os.replace(tmp_path / "edited.pt", model_file)
    with pytest.raises(ConversionError, match=r"mp_rank_01.*tied_modules\.embed\.weight"):
        import_deepspeed(ckpt, str(tmp_path / "tied"))
    for layer_file in folder.glob("layer_*"):
        layer_file.unlink()
    with pytest.raises(CorruptCheckpointError, match="no module and there are no layer files"):
        import_deepspeed(ckpt, str(tmp_path / "no-layers"))


class _Payload:
    """A class no allow-list knows: unpickling it needs trust."""


def test_unknown_pickled_object_needs_trust(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = _copy(trained, run_name(1, "fp32"), tmp_path)
    model_file = ckpt / TAG.format(steps=STEPS) / "mp_rank_00_model_states.pt"
    state = load_torch_file(model_file, extra_globals=DEEPSPEED_GLOBALS)
    state["client_state"] = _Payload()
    torch.save(state, tmp_path / "edited.pt")  # not in place: ``state`` maps the old file
    os.replace(tmp_path / "edited.pt", model_file)
    with pytest.raises(UnsafeCheckpointError, match="trust-pickle") as error:
        import_deepspeed(ckpt, str(tmp_path / "out"))
    assert "_Payload" in str(error.value)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # full unpickling imports DeepSpeed's classes
    manifest = import_deepspeed(ckpt, str(tmp_path / "trusted"), trust_pickle=True)
    assert "model.head.weight" in manifest.tensors


def test_output_is_valid_json_manifest(converted: dict[str, str]) -> None:
    text = (Path(converted[run_name(3, "bf16")]) / "manifest.json").read_text()
    assert json.loads(text)["writer"]["converted_from"]["tp_degree"] == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x80\x02" + bytes(range(70, 250)), "cannot be unpickled: Unsupported operand"),
        (b"", "not a readable torch file: EOFError"),
        (b"not a torch file at all\n", "cannot be unpickled: Unsupported operand"),
    ],
    ids=["garbage-pickle", "empty", "text"],
)
def test_a_corrupt_torch_file_is_corrupt_not_unsafe(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "model_optim_rng.pt"
    path.write_bytes(content)
    with pytest.raises(CorruptCheckpointError, match=message) as err:
        load_torch_file(path)
    assert "trust" not in str(err.value), "a corrupt file is no reason to trust pickles"


@pytest.mark.parametrize(
    "optimizer_state",
    [5, {"zero_stage": "x"}],
    ids=["not-a-dict", "stage-not-a-number"],
)
def test_plain_data_of_the_wrong_shape_is_a_malformed_checkpoint(
    tmp_path: Path, optimizer_state: object
) -> None:
    folder = tmp_path / "global_step1"
    folder.mkdir()
    torch.save(
        {"optimizer_state_dict": optimizer_state},
        folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    )  # loads fine weights-only: only its structure is wrong
    with pytest.raises(CorruptCheckpointError, match="is not a well-formed DeepSpeed checkpoint"):
        import_deepspeed(folder, str(tmp_path / "out"))
