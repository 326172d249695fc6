"""unickpt -> Hugging Face safetensors (unickpt.convert.export_hf.export_hf).

Sharding follows ``transformers``: shards of at most ``max_shard_size`` tensor bytes, filled in
name order, a larger tensor alone in its own shard; an index with ``total_size`` and a complete
``weight_map``; a single ``model.safetensors`` when everything fits. The end-to-end check builds
small standard ``transformers`` models from configs (no hub): GPT-2 (tied embeddings) and Llama
(untied, grouped-query attention), trains nothing, saves ``{"model": model, "optim": adam}`` with
unickpt, exports, writes ``config.json`` next to the weights (export writes weights only, by
design), and ``AutoModelForCausalLM.from_pretrained`` must give identical logits.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import unickpt
from unickpt.convert.export_hf import export_hf, parse_size, shard
from unickpt.errors import ConversionError

transformers = pytest.importorskip("transformers")


def _state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {
        "a.weight": torch.randn(10, 10, generator=gen),  # 400 bytes
        "b.weight": torch.randn(10, 10, generator=gen),
        "c.big": torch.randn(40, 10, generator=gen),  # 1600 bytes: over the limit below
        "d.bias": torch.randn(10, generator=gen),
        "e.ids": torch.arange(25, dtype=torch.int64),  # 200 bytes
        "f.half": torch.randn(3, 3, generator=gen).half(),
    }


@pytest.fixture
def ckpt(tmp_path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    state = _state()
    path = str(tmp_path / "ckpt")
    opt_param = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.Adam([opt_param])
    opt_param.grad = torch.ones(3)
    opt.step()
    unickpt.save(path, {"model": state, "optim": opt, "step": 7})
    return path, state


def test_shards_respect_the_limit_and_the_index_is_complete(
    tmp_path: Path, ckpt: tuple[str, dict[str, torch.Tensor]]
) -> None:
    src, state = ckpt
    dst = tmp_path / "hf"
    files = export_hf(src, dst, max_shard_size="1KB")
    shards = [f for f in files if f.endswith(".safetensors")]
    assert files[-1] == "model.safetensors.index.json"
    assert all(re.fullmatch(rf"model-0000\d-of-0000{len(shards)}\.safetensors", f) for f in shards)
    assert sorted(p.name for p in dst.iterdir()) == sorted(files)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    total = sum(t.numel() * t.element_size() for t in state.values())
    assert index["metadata"] == {"total_size": total}
    got: dict[str, torch.Tensor] = {}
    for file in shards:
        members = load_file(str(dst / file))
        assert all(index["weight_map"][name] == file for name in members)
        size = sum(t.numel() * t.element_size() for t in members.values())
        assert size <= 1000 or len(members) == 1, (file, size)
        with safe_open(str(dst / file), "pt") as handle:
            assert handle.metadata() == {"format": "pt"}
        got.update(members)
    assert set(index["weight_map"]) == set(got) == set(state)  # no optimizer state, no "step"
    for name, tensor in state.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    # the oversized tensor sits alone; the others pack greedily in name order
    assert [sorted(load_file(str(dst / f))) for f in shards] == [
        ["a.weight", "b.weight"],
        ["c.big"],
        ["d.bias", "e.ids", "f.half"],
    ]


def test_single_file_replaces_an_earlier_sharded_export(
    tmp_path: Path, ckpt: tuple[str, dict[str, torch.Tensor]]
) -> None:
    src, state = ckpt
    dst = tmp_path / "hf"
    dst.mkdir()
    (dst / "config.json").write_text("{}")
    export_hf(src, dst, max_shard_size=1000)
    assert export_hf(src, dst) == ["model.safetensors"]
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors"]
    got = load_file(str(dst / "model.safetensors"))
    assert all(torch.equal(got[n], t) for n, t in state.items())


def test_a_failed_re_export_does_not_look_complete(
    tmp_path: Path, ckpt: tuple[str, dict[str, torch.Tensor]]
) -> None:
    src, _ = ckpt
    dst = tmp_path / "hf"
    export_hf(src, dst, max_shard_size="1KB")  # three shards and an index

    class Interrupted(Exception):
        pass

    def fail_after_the_first_shard(done: int, total: int) -> None:
        if done > 800:
            raise Interrupted

    with pytest.raises(unickpt.CheckpointError, match="Interrupted"):
        export_hf(src, dst, max_shard_size="1KB", progress=fail_after_the_first_shard)
    # The new first shard is in place beside the old others: no index may present them as one.
    names = {p.name for p in dst.iterdir()}
    assert "model.safetensors.index.json" not in names and "model.safetensors" not in names
    assert "model-00001-of-00003.safetensors" in names


def test_dtype_casts_floating_tensors_only(
    tmp_path: Path, ckpt: tuple[str, dict[str, torch.Tensor]]
) -> None:
    src, state = ckpt
    for option, dtype in (("bf16", torch.bfloat16), (torch.float16, torch.float16)):
        dst = tmp_path / str(dtype)
        export_hf(src, dst, dtype=option)
        got = load_file(str(dst / "model.safetensors"))
        assert got["e.ids"].dtype == torch.int64 and torch.equal(got["e.ids"], state["e.ids"])
        for name in ("a.weight", "c.big", "f.half"):
            assert got[name].dtype == dtype and torch.equal(got[name], state[name].to(dtype))
    with pytest.raises(ConversionError, match="unknown dtype 'int8'"):
        export_hf(src, tmp_path / "bad", dtype="int8")


def test_spec_renames_drops_and_refuses_collisions(
    tmp_path: Path, ckpt: tuple[str, dict[str, torch.Tensor]]
) -> None:
    src, state = ckpt
    spec = tmp_path / "out.yaml"
    spec.write_text(
        "unickpt_spec: 1\nstrict: false\nrules:\n"
        "  - match: '^e\\.'\n    drop: true\n"
        "  - match: '^(a|b)\\.weight$'\n    replicated: true\n    rename: 'layer_\\1.w'\n"
    )
    export_hf(src, tmp_path / "hf", spec=spec)
    got = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert set(got) == {"layer_a.w", "layer_b.w", "c.big", "d.bias", "f.half"}
    assert torch.equal(got["layer_b.w"], state["b.weight"])
    spec.write_text(
        "unickpt_spec: 1\nrules:\n  - match: '^(a|b)\\.weight$'\n    replicated: true\n"
        "    rename: 'same'\n  - match: '.*'\n    replicated: true\n"
    )
    with pytest.raises(
        ConversionError, match=r"keys 'a\.weight' and 'b\.weight' both become 'same'"
    ):
        export_hf(src, tmp_path / "collide", spec=spec)


def test_sizes_and_sharding_rule() -> None:
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 << 30
    assert parse_size("1.5 gb") == 1_500_000_000
    assert parse_size("10kib") == 10 << 10
    assert parse_size(1234) == parse_size("1234") == 1234
    for bad in ("5 parsecs", "", "-1GB", 0):
        with pytest.raises(ConversionError):
            parse_size(bad)
    assert shard([5, 5, 20, 1, 9, 1], 10) == [[0, 1], [2], [3, 4], [5]]


def _tiny(kind: str) -> transformers.PreTrainedModel:
    if kind == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4,
            bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
    else:
        config = transformers.LlamaConfig(
            vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
            tie_word_embeddings=False,
        )  # fmt: skip
    torch.manual_seed(3)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_transformers_loads_the_export_with_identical_logits(tmp_path: Path, kind: str) -> None:
    model = _tiny(kind)
    opt = torch.optim.Adam(model.parameters())
    unickpt.save(str(tmp_path / "ckpt"), {"model": model, "optim": opt})
    dst = tmp_path / "hf"
    files = export_hf(tmp_path / "ckpt", dst, max_shard_size="20KB", dtype="fp32")
    assert len(files) > 2  # sharded, with an index
    model.config.save_pretrained(dst)  # the architecture: export writes weights only
    loaded = transformers.AutoModelForCausalLM.from_pretrained(dst).eval()
    tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
