"""``unickpt convert`` and ``unickpt export-hf`` on the command line."""

from __future__ import annotations

import pathlib

import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import unickpt
from unickpt.cli.main import app

from megatron_harness import (
    GPTConfig,
    make_gpt,
    megatron_modules,
    read_rank,
    write_megatron_checkpoint,
    write_rank,
)

runner = CliRunner()


def test_megatron_to_unickpt_to_hf_on_the_command_line(tmp_path: pathlib.Path) -> None:
    cfg = GPTConfig()
    model = make_gpt(cfg)
    write_megatron_checkpoint(tmp_path / "mg", model, tp=2, pp=2)
    result = runner.invoke(
        app, ["convert", "--from", "megatron", str(tmp_path / "mg"), str(tmp_path / "u")]
    )
    assert result.exit_code == 0, result.output
    assert "converted" in result.output and "tensors" in result.output
    restored = make_gpt(cfg, seed=1)
    unickpt.load(str(tmp_path / "u"), {"model": restored})
    for name, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value), name

    result = runner.invoke(
        app,
        ["export-hf", str(tmp_path / "u"), str(tmp_path / "hf"), "--max-shard-size", "20KB"],
    )
    assert result.exit_code == 0, result.output
    exported: dict[str, torch.Tensor] = {}
    for file in sorted((tmp_path / "hf").glob("model-*.safetensors")):
        exported.update(load_file(file))
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert set(exported) == set(model.state_dict())
    for name, value in model.state_dict().items():
        assert torch.equal(exported[name], value), name


def test_hf_import_with_dtype_export(tmp_path: pathlib.Path) -> None:
    tensors = {"w": torch.randn(4, 4), "ids": torch.arange(5)}
    (tmp_path / "src").mkdir()
    save_file(tensors, tmp_path / "src" / "model.safetensors")
    assert (
        runner.invoke(
            app, ["convert", "--from", "hf", str(tmp_path / "src"), str(tmp_path / "u")]
        ).exit_code
        == 0
    )
    result = runner.invoke(
        app, ["export-hf", str(tmp_path / "u"), str(tmp_path / "hf"), "--dtype", "bf16"]
    )
    assert result.exit_code == 0, result.output
    out = load_file(tmp_path / "hf" / "model.safetensors")
    assert out["w"].dtype == torch.bfloat16 and torch.equal(out["w"], tensors["w"].bfloat16())
    assert torch.equal(out["ids"], tensors["ids"])  # integers are never cast


def test_convert_errors_are_one_clear_line(tmp_path: pathlib.Path) -> None:
    result = runner.invoke(
        app, ["convert", "--from", "hf", str(tmp_path / "nothing"), str(tmp_path / "u")]
    )
    assert result.exit_code == 1 and "ERROR" in result.output

    result = runner.invoke(
        app,
        [
            "convert",
            "--from",
            "megatron",
            "--set",
            "vocab_size",
            str(tmp_path),
            str(tmp_path / "u"),
        ],
    )
    assert result.exit_code == 2 and "NAME=INTEGER" in result.output

    # A foreign class in a .pt file stops the conversion unless --trust-pickle is given.
    cfg = GPTConfig()
    root = write_megatron_checkpoint(tmp_path / "mg", make_gpt(cfg), tp=1, pp=1)
    rank = next(root.rglob("model_optim_rng.pt"))
    ckpt = read_rank(rank)
    ckpt["args"].tokenizer_model = pathlib.PurePosixPath("tok.model")  # not allow-listed
    write_rank(rank, ckpt)
    result = runner.invoke(app, ["convert", "--from", "megatron", str(root), str(tmp_path / "u2")])
    assert result.exit_code == 1, result.output
    assert "pathlib.PurePosixPath" in result.output and "--trust-pickle" in result.output
    result = runner.invoke(
        app, ["convert", "--from", "megatron", "--trust-pickle", str(root), str(tmp_path / "u2")]
    )  # trusted, but the classes Megatron pickled are not importable here
    assert result.exit_code == 1 and "No module named 'megatron'" in result.output
    with megatron_modules():  # the harness's stand-in for an installed Megatron
        result = runner.invoke(
            app,
            ["convert", "--from", "megatron", "--trust-pickle", str(root), str(tmp_path / "u2")],
        )
    assert result.exit_code == 0, result.output


def test_options_a_source_does_not_take_are_named(tmp_path: pathlib.Path) -> None:
    """--spec and --set are refused with their own names (--spec is no "spec variable")."""
    src, dst = str(tmp_path / "src"), str(tmp_path / "u")
    cases = [
        (["--from", "dcp", "--spec", "plain"], "--from dcp takes no --spec"),
        (["--from", "dcp", "--set", "n=1"], "--from dcp takes no --set"),
        (["--from", "hf", "--set", "n=1"], "--from hf takes no --set"),
    ]
    for options, message in cases:
        result = runner.invoke(app, ["convert", *options, src, dst], env={"COLUMNS": "200"})
        assert result.exit_code == 2, result.output
        assert message in result.output and "variables" not in result.output, result.output
