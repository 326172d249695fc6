"""Megatron TP x PP checkpoints (tests/megatron_harness.py) -> unickpt -> the plain GPT, exactly.

The harness's layout is first checked against Megatron's own semantics (a sharded forward pass
from the shards reproduces the plain model's logits); the importer with the shipped
``megatron_gpt`` spec must then give back every weight and Adam moment bit for bit.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import unickpt
from unickpt.convert.megatron import import_megatron, locate
from unickpt.convert.spec import Spec
from unickpt.errors import CheckpointNotFoundError, ConversionError, UnsafeCheckpointError

from megatron_harness import (
    ITERATION,
    GPTConfig,
    PlainGPT,
    batch,
    load_ranks,
    make_gpt,
    make_optimizer,
    megatron_logits,
    megatron_modules,
    rank_dir,
    read_rank,
    train,
    write_megatron_checkpoint,
    write_rank,
)

DEFAULT = GPTConfig()
# everything the default is not: MHA, RMSNorm, no biases, GeLU, no position table, local norms
OTHER = GPTConfig(
    query_groups=8,
    normalization="RMSNorm",
    bias=False,
    qkv_bias=False,
    swiglu=False,
    learned_positions=False,
    fused_norms=False,
    layers=2,
)


def trained(cfg: GPTConfig) -> tuple[PlainGPT, torch.optim.AdamW]:
    model = make_gpt(cfg)
    optim = make_optimizer(model)
    train(model, optim)
    return model, optim


@pytest.fixture(scope="module")
def reference() -> tuple[PlainGPT, torch.optim.AdamW]:
    return trained(DEFAULT)


def rank_file(root: Path, tp_rank: int, pp_rank: int, pp: int) -> Path:
    return root / f"iter_{ITERATION:07d}" / rank_dir(tp_rank, pp_rank, pp) / "model_optim_rng.pt"


def edit(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    ckpt = read_rank(path)
    change(ckpt)
    write_rank(path, ckpt)


def assert_same_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def assert_same_optimizer(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for index, entries in sa["state"].items():
        assert entries.keys() == sb["state"][index].keys()
        for name, value in entries.items():
            assert torch.equal(value, sb["state"][index][name]), (index, name)
    for ga, gb in zip(sa["param_groups"], sb["param_groups"], strict=True):
        assert ga["params"] == gb["params"]
        for name in ("lr", "betas", "eps", "weight_decay"):
            assert ga[name] == gb[name], name


def restore(dst: Path, cfg: GPTConfig) -> tuple[PlainGPT, torch.optim.AdamW]:
    model = PlainGPT(cfg)
    optim = make_optimizer(model)
    unickpt.load(str(dst), {"model": model, "optim": optim})
    return model, optim


# ------------------------------------------------------------------- the harness is Megatron's


@pytest.mark.parametrize("cfg", [DEFAULT, OTHER], ids=["gqa-swiglu-te", "mha-gelu-local"])
@pytest.mark.parametrize(("tp", "pp"), [(2, 2), (4, 1), (1, 2)])
def test_harness_shards_run_like_the_plain_model(
    tmp_path: Path, cfg: GPTConfig, tp: int, pp: int
) -> None:
    """Megatron's parallel forward over the shards (vocab-parallel lookup, per-group QKV
    split, row-parallel partial sums) computes the plain model's logits: the layout is right
    independently of the converter."""
    model = make_gpt(cfg)
    write_megatron_checkpoint(tmp_path, model, tp=tp, pp=pp)
    tokens = batch(cfg)
    logits = megatron_logits(cfg, load_ranks(tmp_path, tp, pp), tokens)
    assert logits.shape[-1] == cfg.padded_vocab(tp) > cfg.vocab_size
    torch.testing.assert_close(logits[..., : cfg.vocab_size], model(tokens), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------- conversion


@pytest.mark.parametrize(("tp", "pp"), [(2, 2), (2, 1), (1, 2)])
def test_import_reproduces_model_and_adam_exactly(
    tmp_path: Path, reference: tuple[PlainGPT, torch.optim.AdamW], tp: int, pp: int
) -> None:
    model, optim = reference
    write_megatron_checkpoint(tmp_path / "src", model, tp=tp, pp=pp, optimizer=optim)
    manifest = import_megatron(tmp_path / "src", str(tmp_path / "out"))

    assert manifest.step == ITERATION
    assert manifest.writer["converted_from"]["tensor_parallel"] == tp
    assert manifest.writer["converted_from"]["pipeline_parallel"] == pp
    restored, restored_optim = restore(tmp_path / "out", DEFAULT)
    assert_same_model(model, restored)
    assert_same_optimizer(optim, restored_optim)
    tokens = batch(DEFAULT)
    assert torch.equal(model(tokens), restored(tokens))
    # the restored optimizer trains on exactly as the original does
    train(model, optim, steps=1)
    train(restored, restored_optim, steps=1)
    assert_same_model(model, restored)


def test_import_other_architecture(tmp_path: Path) -> None:
    """MHA, RMSNorm, no biases, GeLU fc1 (glu = 0), standalone norms: same spec, exact."""
    model, optim = trained(OTHER)
    write_megatron_checkpoint(tmp_path / "src", model, tp=2, pp=2, optimizer=optim)
    import_megatron(tmp_path / "src", str(tmp_path / "out"))
    restored, restored_optim = restore(tmp_path / "out", OTHER)
    assert_same_model(model, restored)
    assert_same_optimizer(optim, restored_optim)


def test_bf16_weights_with_fp32_masters(
    tmp_path: Path, reference: tuple[PlainGPT, torch.optim.AdamW]
) -> None:
    """bf16 training: the model tensors come from the fp32 master copies, not the rounded
    bf16 weights; Adam's step kept per param group (FusedAdam) moves into each parameter."""
    model, optim = reference
    src = tmp_path / "src"
    write_megatron_checkpoint(
        src, model, tp=2, pp=2, optimizer=optim, params_dtype=torch.bfloat16, group_step=True
    )
    weight = read_rank(rank_file(src, 0, 0, 2))["model"]
    assert weight["embedding.word_embeddings.weight"].dtype == torch.bfloat16
    import_megatron(src, str(tmp_path / "out"))
    restored, restored_optim = restore(tmp_path / "out", DEFAULT)
    assert_same_model(model, restored)
    assert_same_optimizer(optim, restored_optim)


def test_model_only(tmp_path: Path, reference: tuple[PlainGPT, torch.optim.AdamW]) -> None:
    model, _ = reference
    write_megatron_checkpoint(tmp_path / "src", model, tp=2, pp=2)
    reports: list[tuple[int, int]] = []
    manifest = import_megatron(
        tmp_path / "src", str(tmp_path / "out"), progress=lambda *done: reports.append(done)
    )
    assert len(reports) == len(manifest.tensors)
    assert reports[-1][0] == reports[-1][1] == sum(p.numel() * 4 for p in model.parameters())
    assert not any(key.startswith("optim.") for key in (*manifest.tensors, *manifest.objects))
    restored = PlainGPT(DEFAULT)
    unickpt.load(str(tmp_path / "out"), {"model": restored})
    assert_same_model(model, restored)


def test_source_forms(tmp_path: Path, reference: tuple[PlainGPT, torch.optim.AdamW]) -> None:
    """The save root (tracker file), an explicit iteration, or the iteration directory itself."""
    model, _ = reference
    root = write_megatron_checkpoint(tmp_path / "src", model, tp=2, pp=1)
    iteration_dir = root / f"iter_{ITERATION:07d}"
    assert locate(root)[0] == iteration_dir
    assert locate(root, ITERATION)[0] == iteration_dir
    assert locate(iteration_dir)[0] == iteration_dir
    import_megatron(iteration_dir, str(tmp_path / "out"))
    restored = PlainGPT(DEFAULT)
    unickpt.load(str(tmp_path / "out"), {"model": restored})
    assert_same_model(model, restored)
    with pytest.raises(CheckpointNotFoundError, match="iter_0000011"):
        locate(root, 11)
    (root / "latest_checkpointed_iteration.txt").write_text("release")
    with pytest.raises(CheckpointNotFoundError, match="release"):
        locate(root)


def test_variables_override_args(
    tmp_path: Path, reference: tuple[PlainGPT, torch.optim.AdamW]
) -> None:
    """Without args.vocab_size the padding rows are kept (with a warning); --set restores it."""
    model, _ = reference
    src = write_megatron_checkpoint(tmp_path / "src", model, tp=2, pp=2)
    for pp_rank in range(2):
        for tp_rank in range(2):
            edit(
                rank_file(src, tp_rank, pp_rank, 2),
                lambda c: setattr(c["args"], "vocab_size", None),
            )
    with pytest.warns(UserWarning, match="keeping all 64"):
        manifest = import_megatron(src, str(tmp_path / "padded"))
    assert manifest.tensors["model.embed.weight"].shape == (64, DEFAULT.hidden)
    import_megatron(src, str(tmp_path / "out"), variables={"vocab_size": DEFAULT.vocab_size})
    restored = PlainGPT(DEFAULT)
    unickpt.load(str(tmp_path / "out"), {"model": restored})
    assert_same_model(model, restored)


def test_parsed_spec_and_spec_file(
    tmp_path: Path, reference: tuple[PlainGPT, torch.optim.AdamW]
) -> None:
    model, _ = reference
    src = write_megatron_checkpoint(tmp_path / "src", model, tp=1, pp=1)
    shipped = Path(unickpt.__file__).parent / "convert" / "specs" / "megatron_gpt.yaml"
    text = shipped.read_text().replace("'embed.weight'", "'wte.weight'")
    (tmp_path / "mine.yaml").write_text(text)
    manifest = import_megatron(src, str(tmp_path / "a"), spec=str(tmp_path / "mine.yaml"))
    assert "model.wte.weight" in manifest.tensors
    variables = {"tp": 1, "vocab_size": 53, "heads": 8, "query_groups": 4, "kv_channels": 4}
    parsed = Spec.load("megatron_gpt", variables={**variables, "ffn_hidden": 20, "glu": 1})
    manifest = import_megatron(src, str(tmp_path / "b"), spec=parsed)
    assert "model.embed.weight" in manifest.tensors
    with pytest.raises(ConversionError, match="variables apply"):
        import_megatron(src, str(tmp_path / "c"), spec=parsed, variables={"tp": 1})


# ------------------------------------------------------------------------------------- errors


def test_replicated_norm_differing_between_tp_ranks(
    tmp_path: Path, reference: tuple[PlainGPT, torch.optim.AdamW]
) -> None:
    model, _ = reference
    src = write_megatron_checkpoint(tmp_path / "src", model, tp=2, pp=2)
    key = "decoder.layers.1.mlp.linear_fc1.layer_norm_weight"

    def perturb(ckpt: dict[str, Any]) -> None:
        ckpt["model"][key] = ckpt["model"][key] + 1

    edit(rank_file(src, 1, 1, 2), perturb)
    # stage 1's local layer 1 is global layer 3
    with pytest.raises(
        ConversionError, match=r"decoder\.layers\.3\.mlp\.linear_fc1\.layer_norm_weight.*TP rank 1"
    ):
        import_megatron(src, str(tmp_path / "out"))
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_unknown_key_in_strict_mode(
    tmp_path: Path, reference: tuple[PlainGPT, torch.optim.AdamW]
) -> None:
    model, _ = reference
    src = write_megatron_checkpoint(tmp_path / "src", model, tp=2, pp=1)
    extra = ["decoder.layers.0.self_attention.q_layernorm.weight", "decoder.mystery.weight"]

    def add(ckpt: dict[str, Any]) -> None:
        for key in extra:
            ckpt["model"][key] = torch.ones(4)

    for tp_rank in range(2):
        edit(rank_file(src, tp_rank, 0, 1), add)
    with pytest.raises(ConversionError, match="no rule for 2 key") as info:
        import_megatron(src, str(tmp_path / "out"))
    assert all(key in str(info.value) for key in extra)


def test_missing_rank_directory(
    tmp_path: Path, reference: tuple[PlainGPT, torch.optim.AdamW]
) -> None:
    model, _ = reference
    src = write_megatron_checkpoint(tmp_path / "src", model, tp=2, pp=2)
    victim = rank_file(src, 1, 0, 2).parent
    for f in victim.iterdir():
        f.unlink()
    victim.rmdir()
    with pytest.raises(CheckpointNotFoundError, match=r"missing: \['mp_rank_01_000'\]"):
        import_megatron(src, str(tmp_path / "out"))


def test_missing_rank_file_and_not_megatron(tmp_path: Path) -> None:
    (tmp_path / "iter_0000001" / "mp_rank_00").mkdir(parents=True)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("1")
    with pytest.raises(CheckpointNotFoundError, match=r"missing model_optim_rng\.pt"):
        import_megatron(tmp_path, str(tmp_path / "out"))
    with pytest.raises(CheckpointNotFoundError, match="not a Megatron checkpoint"):
        import_megatron(tmp_path / "iter_0000001" / "mp_rank_00", str(tmp_path / "out"))
    dist = tmp_path / "dist"
    dist.mkdir()
    (dist / "latest_checkpointed_iteration.txt").write_text("3")
    (dist / "iter_0000003").mkdir()
    (dist / "iter_0000003" / "metadata.json").write_text("{}")
    with pytest.raises(CheckpointNotFoundError, match="--from dcp"):
        import_megatron(dist, str(tmp_path / "out"))


def test_args_disagreeing_with_the_rank_directories(
    tmp_path: Path, reference: tuple[PlainGPT, torch.optim.AdamW]
) -> None:
    model, _ = reference
    src = write_megatron_checkpoint(tmp_path / "src", model, tp=2, pp=1)
    edit(rank_file(src, 0, 0, 1), lambda c: setattr(c["args"], "tensor_model_parallel_size", 4))
    with pytest.raises(ConversionError, match=r"tensor_model_parallel_size is 4.*TP=2 x PP=1"):
        import_megatron(src, str(tmp_path / "out"))


def test_missing_args_fields_are_named(
    tmp_path: Path, reference: tuple[PlainGPT, torch.optim.AdamW]
) -> None:
    model, _ = reference
    src = write_megatron_checkpoint(tmp_path / "src", model, tp=1, pp=1)
    edit(rank_file(src, 0, 0, 1), lambda c: delattr(c["args"], "num_attention_heads"))
    with pytest.raises(
        ConversionError, match=r"'heads' is not set.*lack: \['num_attention_heads'\]"
    ):
        import_megatron(src, str(tmp_path / "out"))
    edit(rank_file(src, 0, 0, 1), lambda c: c.pop("args"))
    with pytest.raises(ConversionError, match="has no 'args'"):
        import_megatron(src, str(tmp_path / "out"))


def test_untied_output_layer_is_not_folded_into_the_embedding(
    tmp_path: Path, reference: tuple[PlainGPT, torch.optim.AdamW]
) -> None:
    model, _ = reference
    src = write_megatron_checkpoint(tmp_path / "src", model, tp=1, pp=2)
    for pp_rank in range(2):
        edit(
            rank_file(src, 0, pp_rank, 2),
            lambda c: setattr(c["args"], "untie_embeddings_and_output_weights", True),
        )
    with pytest.raises(ConversionError, match="not tied"):
        import_megatron(src, str(tmp_path / "out"))


def test_foreign_objects_need_trust(
    tmp_path: Path, reference: tuple[PlainGPT, torch.optim.AdamW]
) -> None:
    """Megatron's own extras (numpy RNG state, the AttnBackend enum) load weights-only; any
    other global is refused unless the caller trusts the file (and can import its classes)."""
    model, _ = reference
    src = write_megatron_checkpoint(tmp_path / "src", model, tp=1, pp=1)
    edit(rank_file(src, 0, 0, 1), lambda c: setattr(c["args"], "parser", argparse.ArgumentParser))
    with pytest.raises(UnsafeCheckpointError, match="ArgumentParser"):
        import_megatron(src, str(tmp_path / "out"))
    with megatron_modules():
        import_megatron(src, str(tmp_path / "out"), trust_pickle=True)


def test_optimizer_grouping_mismatch(
    tmp_path: Path, reference: tuple[PlainGPT, torch.optim.AdamW]
) -> None:
    """Indices are mapped by Megatron's weight-decay grouping; a file that does not fit it is
    refused instead of attaching moments to the wrong parameters."""
    model, optim = reference
    src = write_megatron_checkpoint(tmp_path / "src", model, tp=1, pp=1, optimizer=optim)

    def move_one(ckpt: dict[str, Any]) -> None:
        groups = ckpt["optimizer"]["param_groups"]
        groups[1]["params"].insert(0, groups[0]["params"].pop())

    edit(rank_file(src, 0, 0, 1), move_one)
    with pytest.raises(ConversionError, match="group sizes"):
        import_megatron(src, str(tmp_path / "out"))
