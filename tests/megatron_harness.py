"""A known small GPT and the TP x PP checkpoint Megatron-core would write for it.

:class:`PlainGPT` is the unsharded reference model: token (+ learned position) embedding,
pre-norm transformer layers with a fused QKV projection (grouped-query attention: ``query_groups``
KV heads shared by ``heads // query_groups`` query heads each), a fused gate/up SwiGLU MLP,
a final norm and an output layer tied to the embedding. Its fused QKV weight is ``[Q; K; V]``
(all query heads, then all key heads, then all value heads) and its fc1 weight ``[gate; up]``.

:func:`write_megatron_checkpoint` lays that model out the way Megatron-LM's legacy ``torch``
checkpoint format does (``iter_NNNNNNN/mp_rank_TT[_PPP]/model_optim_rng.pt``, one file per TP rank
and pipeline stage), with Megatron-core's names and shardings:

* ``embedding.word_embeddings.weight``: vocab-parallel (rows), vocabulary padded to a multiple of
  ``make_vocab_size_divisible_by * TP`` with junk rows;
* ``decoder.layers.<stage-local i>.self_attention.linear_qkv.weight/bias``: column-parallel over
  query groups, each group's rows being ``[its query heads; its key head; its value head]``;
* ``...linear_proj.weight`` and ``...linear_fc2.weight``: row-parallel (dim 1), biases replicated;
* ``...mlp.linear_fc1.weight/bias``: column-parallel, TP rank ``r`` holding ``[gate_r; up_r]``;
* norms fused into the following linear (``linear_qkv.layer_norm_weight``, Transformer Engine
  layers) or standalone (``input_layernorm.weight``, Megatron-core's local layers), replicated;
* ``output_layer.weight`` on the last stage when it is not also the first: Megatron's copy of the
  (padded) embedding shard that the tied output layer uses;
* ``_extra_state`` entries, as Transformer Engine modules save them.

The optimizer is Megatron's non-distributed one: a torch AdamW ``state_dict`` per rank over the
rank's parameters (stage-local indices, grouped into weight-decay / no-weight-decay groups in
parameter order), wrapped with ``fp32_from_fp16_params`` master copies for bf16 training.

:func:`megatron_logits` runs the sharded checkpoint the way Megatron's TP/PP layers would
(vocab-parallel lookup, per-group QKV split, row-parallel partial sums), independently of the
converter, to show the layout really is a sharding of the plain model.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import random
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ITERATION = 10


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 53
    hidden: int = 24
    heads: int = 8
    query_groups: int = 4
    kv_channels: int = 4  # deliberately not hidden // heads
    ffn_hidden: int = 20
    layers: int = 4
    max_positions: int = 16
    swiglu: bool = True
    bias: bool = True  # Megatron's add_bias_linear: proj, fc1, fc2
    qkv_bias: bool = True
    normalization: str = "LayerNorm"  # or "RMSNorm" (weight only)
    learned_positions: bool = True
    fused_norms: bool = True  # Transformer Engine layers: the norm lives in the next linear
    make_vocab_size_divisible_by: int = 8

    def padded_vocab(self, tp: int) -> int:
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple


def _norm(cfg: GPTConfig) -> nn.Module:
    if cfg.normalization == "RMSNorm":
        return nn.RMSNorm(cfg.hidden, eps=1e-5)
    return nn.LayerNorm(cfg.hidden, eps=1e-5)


class Attention(nn.Module):
    # Registration order (proj, norm, qkv) is Megatron-core's parameter order with TE layers.
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.proj = nn.Linear(cfg.heads * cfg.kv_channels, cfg.hidden, bias=cfg.bias)
        self.norm = _norm(cfg)
        qkv_rows = (cfg.heads + 2 * cfg.query_groups) * cfg.kv_channels
        self.qkv = nn.Linear(cfg.hidden, qkv_rows, bias=cfg.qkv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        q, k, v = self.qkv(self.norm(x)).split(
            [cfg.heads * cfg.kv_channels, *[cfg.query_groups * cfg.kv_channels] * 2], dim=-1
        )
        return x + self.proj(_attend(q, k, v, cfg.heads // cfg.query_groups, cfg.kv_channels))


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, per_group: int, kv_channels: int
) -> torch.Tensor:
    """Causal GQA: query head j attends with KV head j // per_group (Megatron's grouping)."""
    b, s, _ = q.shape
    q, k, v = (t.reshape(b, s, -1, kv_channels).transpose(1, 2) for t in (q, k, v))
    k, v = (t.repeat_interleave(per_group, dim=1) for t in (k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return out.transpose(1, 2).reshape(b, s, -1)


def _glu(y: torch.Tensor, swiglu: bool) -> torch.Tensor:
    if not swiglu:
        return F.gelu(y)
    gate, up = y.chunk(2, dim=-1)
    return F.silu(gate) * up


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.swiglu = cfg.swiglu
        self.norm = _norm(cfg)
        self.fc1 = nn.Linear(cfg.hidden, cfg.ffn_hidden * (2 if cfg.swiglu else 1), bias=cfg.bias)
        self.fc2 = nn.Linear(cfg.ffn_hidden, cfg.hidden, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(_glu(self.fc1(self.norm(x)), self.swiglu))


class Layer(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.attn(x))


class PlainGPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden)
        if cfg.learned_positions:
            self.pos_embed = nn.Embedding(cfg.max_positions, cfg.hidden)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.layers))
        self.norm = _norm(cfg)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        if self.cfg.learned_positions:
            x = x + self.pos_embed(torch.arange(tokens.shape[1]))
        for layer in self.layers:
            x = layer(x)
        return F.linear(self.norm(x), self.embed.weight)  # tied output layer


def make_gpt(cfg: GPTConfig, seed: int = 0) -> PlainGPT:
    """The model with every parameter (norms and biases too) random: nothing is trivially equal."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = PlainGPT(cfg)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.ndim == 1 else 0.0))
    return model


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Megatron's default: biases and 1-D parameters get no weight decay."""
    return name.endswith(".bias") or param.ndim == 1


def make_optimizer(model: nn.Module) -> torch.optim.AdamW:
    """AdamW with Megatron's two groups, in its order: decayed first, then the rest."""
    named = list(model.named_parameters())
    return torch.optim.AdamW(
        [
            {"params": [p for n, p in named if not no_weight_decay(n, p)], "weight_decay": 0.1},
            {"params": [p for n, p in named if no_weight_decay(n, p)], "weight_decay": 0.0},
        ],
        lr=1e-3,
        betas=(0.9, 0.95),
        eps=1e-8,
    )


def batch(cfg: GPTConfig, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (2, cfg.max_positions), generator=g)


def train(model: PlainGPT, optim: torch.optim.Optimizer, steps: int = 2) -> None:
    """A few steps so that the Adam moments are non-trivial."""
    for i in range(steps):
        tokens = batch(model.cfg, seed=100 + i)
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optim.zero_grad()
        loss.backward()
        optim.step()


# ------------------------------------------------------------------------ Megatron's layout


def stage_layers(cfg: GPTConfig, pp: int) -> list[range]:
    """Global layer indices held by each pipeline stage (Megatron: an even split)."""
    assert cfg.layers % pp == 0, "Megatron splits layers evenly over the stages"
    per = cfg.layers // pp
    return [range(s * per, (s + 1) * per) for s in range(pp)]


def megatron_name(cfg: GPTConfig, plain: str, local_layer: int | None) -> str:
    """Megatron-core's stage-local key of a plain parameter name."""
    fixed = {
        "embed.weight": "embedding.word_embeddings.weight",
        "pos_embed.weight": "embedding.position_embeddings.weight",
        "norm.weight": "decoder.final_layernorm.weight",
        "norm.bias": "decoder.final_layernorm.bias",
    }
    if plain in fixed:
        return fixed[plain]
    _, _, module, part, leaf = plain.split(".")
    prefix = f"decoder.layers.{local_layer}."
    if part == "norm":
        if cfg.fused_norms:
            owner = "self_attention.linear_qkv" if module == "attn" else "mlp.linear_fc1"
            return f"{prefix}{owner}.layer_norm_{leaf}"
        return f"{prefix}{'input_layernorm' if module == 'attn' else 'pre_mlp_layernorm'}.{leaf}"
    linear = {"proj": "self_attention.linear_proj", "qkv": "self_attention.linear_qkv"}
    linear |= {"fc1": "mlp.linear_fc1", "fc2": "mlp.linear_fc2"}
    return f"{prefix}{linear[part]}.{leaf}"


def pad_rows(tensor: torch.Tensor, rows: int, seed: int) -> torch.Tensor:
    """``tensor`` with junk rows appended up to ``rows`` (what Megatron's padding rows hold)."""
    g = torch.Generator().manual_seed(seed)
    junk = torch.randn((rows - tensor.shape[0], *tensor.shape[1:]), generator=g) * 7 + 3
    return torch.cat([tensor, junk.to(tensor.dtype)])


def shard(cfg: GPTConfig, plain: str, tensor: torch.Tensor, tp: int) -> list[torch.Tensor]:
    """The TP pieces of a plain parameter (or of a same-shaped optimizer moment), each compact
    in memory as Megatron's are (a saved view would drag its whole base storage along)."""
    return [p.clone(memory_format=torch.contiguous_format) for p in _pieces(cfg, plain, tensor, tp)]


def _pieces(cfg: GPTConfig, plain: str, tensor: torch.Tensor, tp: int) -> list[torch.Tensor]:
    module = plain.split(".")[-2] if plain.startswith("layers.") else plain.split(".")[0]
    if plain == "embed.weight":
        return list(pad_rows(tensor, cfg.padded_vocab(tp), seed=tp).chunk(tp))
    if module == "qkv":
        q_rows = cfg.heads * cfg.kv_channels
        kv_rows = cfg.query_groups * cfg.kv_channels
        q, k, v = tensor.split([q_rows, kv_rows, kv_rows])
        rest = tensor.shape[1:]
        g = cfg.query_groups
        per_group = torch.cat(
            [q.reshape(g, -1, *rest), k.reshape(g, -1, *rest), v.reshape(g, -1, *rest)], dim=1
        )
        return list(per_group.reshape(tensor.shape).chunk(tp))
    if module == "fc1":
        if not cfg.swiglu:
            return list(tensor.chunk(tp))
        gate, up = tensor.chunk(2)
        return [torch.cat(pair) for pair in zip(gate.chunk(tp), up.chunk(tp), strict=True)]
    if module in ("proj", "fc2") and plain.endswith(".weight"):
        return list(tensor.chunk(tp, dim=1))
    return [tensor] * tp  # norms, row-parallel biases, positions


class AttnBackend(enum.Enum):
    """Recent Megatron-LM keeps ``args.attention_backend`` as this enum, so its files reference
    ``megatron.core.transformer.enums.AttnBackend``: a weights-only load must cope without
    Megatron installed."""

    flash = 1
    fused = 2
    unfused = 3
    local = 4
    auto = 5


AttnBackend.__module__ = "megatron.core.transformer.enums"


@contextlib.contextmanager
def megatron_modules() -> Iterator[None]:
    """Make pickle find :class:`AttnBackend` under Megatron's module name (saving, or a full
    unpickling of the harness's files) without Megatron installed."""
    names = ["megatron", "megatron.core", "megatron.core.transformer", AttnBackend.__module__]
    saved = {name: sys.modules.get(name) for name in names}
    for name in names:
        sys.modules[name] = types.ModuleType(name)
    sys.modules[AttnBackend.__module__].AttnBackend = AttnBackend  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                del sys.modules[name]
            else:
                sys.modules[name] = module


def _args(cfg: GPTConfig, tp: int, pp: int, params_dtype: torch.dtype) -> argparse.Namespace:
    return argparse.Namespace(
        num_layers=cfg.layers,
        hidden_size=cfg.hidden,
        ffn_hidden_size=cfg.ffn_hidden,
        num_attention_heads=cfg.heads,
        kv_channels=cfg.kv_channels,
        group_query_attention=cfg.query_groups != cfg.heads,
        num_query_groups=cfg.query_groups,
        vocab_size=cfg.vocab_size,
        padded_vocab_size=cfg.padded_vocab(tp),
        make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by,
        max_position_embeddings=cfg.max_positions,
        position_embedding_type="learned_absolute" if cfg.learned_positions else "rope",
        swiglu=cfg.swiglu,
        add_bias_linear=cfg.bias,
        add_qkv_bias=cfg.qkv_bias,
        normalization=cfg.normalization,
        untie_embeddings_and_output_weights=False,
        transformer_impl="transformer_engine" if cfg.fused_norms else "local",
        attention_backend=AttnBackend.auto,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=None,
        data_parallel_size=1,
        world_size=tp * pp,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=False,
        use_distributed_optimizer=False,
        ckpt_format="torch",
        lr=1e-3,
        weight_decay=0.1,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_eps=1e-8,
        iteration=ITERATION,
    )


def _rng_state() -> list[dict[str, Any]]:
    # What Megatron stores per rank; the numpy state is the part a weights-only load chokes on.
    return [
        {
            "random_rng_state": random.getstate(),
            "np_rng_state": np.random.get_state(),
            "torch_rng_state": torch.get_rng_state(),
            "cuda_rng_state": torch.get_rng_state(),
            "rng_tracker_states": {"model-parallel-rng": torch.get_rng_state()},
        }
    ]


def rank_dir(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "")


def megatron_state(
    model: PlainGPT, tp: int, pp: int, tensors: dict[str, torch.Tensor] | None = None
) -> list[list[dict[str, torch.Tensor | None]]]:
    """``[pp][tp]`` stage-local Megatron ``model`` dicts of ``tensors`` (default: the weights).

    Keys are in Megatron-core's parameter order, with Transformer Engine ``_extra_state``
    entries (an empty byte tensor, or None) where TE modules put them.
    """
    cfg = model.cfg
    source = dict(model.named_parameters()) if tensors is None else tensors
    pieces = {name: shard(cfg, name, t.detach(), tp) for name, t in source.items()}
    stages: list[list[dict[str, torch.Tensor | None]]] = []
    for stage, layers in enumerate(stage_layers(cfg, pp)):
        ranks: list[dict[str, torch.Tensor | None]] = [{} for _ in range(tp)]
        for name in source:
            layer = int(name.split(".")[1]) if name.startswith("layers.") else None
            if name.startswith(("embed.", "pos_embed.")) and stage != 0:
                continue
            if name.startswith("norm.") and stage != pp - 1:
                continue
            if layer is not None and layer not in layers:
                continue
            key = megatron_name(cfg, name, None if layer is None else layer - layers.start)
            for r in range(tp):
                ranks[r][key] = pieces[name][r]
                # Transformer Engine modules' extra state: serialized FP8 metadata, or None
                if key.endswith("linear_qkv.weight"):
                    ranks[r][key.replace("linear_qkv.weight", "core_attention._extra_state")] = None
                if key.endswith("linear_fc2.weight"):
                    extra = key.replace("weight", "_extra_state")
                    ranks[r][extra] = torch.empty(0, dtype=torch.uint8)
        if stage == pp - 1 and pp > 1:  # the tied output layer's own copy of the embedding
            for r in range(tp):
                ranks[r]["output_layer.weight"] = pieces["embed.weight"][r].clone()
        stages.append(ranks)
    return stages


def write_megatron_checkpoint(
    root: Path,
    model: PlainGPT,
    *,
    tp: int,
    pp: int,
    optimizer: torch.optim.Optimizer | None = None,
    params_dtype: torch.dtype = torch.float32,
    group_step: bool = False,
) -> Path:
    """Write ``model`` (and ``optimizer``) as Megatron would at TP=tp x PP=pp; returns ``root``.

    With ``params_dtype=torch.bfloat16`` the model weights are stored in bf16 and the optimizer
    holds the exact fp32 values as ``fp32_from_fp16_params`` (Float16OptimizerWithFloat16Params).
    ``group_step`` stores Adam's step per param group (Apex/TE FusedAdam) instead of per param.
    """
    cfg = model.cfg
    weights = megatron_state(model, tp, pp)
    names = {id(p): n for n, p in model.named_parameters()}
    moments: dict[str, list[list[dict[str, torch.Tensor | None]]]] = {}
    if optimizer is not None:
        for slot in ("exp_avg", "exp_avg_sq"):
            per_param = {names[id(p)]: s[slot] for p, s in optimizer.state.items()}
            moments[slot] = megatron_state(model, tp, pp, per_param)
    folder = root / f"iter_{ITERATION:07d}"
    for stage in range(pp):
        for r in range(tp):
            local = weights[stage][r]
            params = [k for k, v in local.items() if v is not None and "_extra_state" not in k]
            ckpt: dict[str, Any] = {
                "args": _args(cfg, tp, pp, params_dtype),
                "checkpoint_version": 3.0,
                "iteration": ITERATION,
                "model": {
                    k: v.to(params_dtype) if k in params and v is not None else v
                    for k, v in local.items()
                },
                "rng_state": _rng_state(),
                "num_floating_point_operations_so_far": 12345,
            }
            if optimizer is not None:
                ckpt["optimizer"] = _megatron_optimizer(
                    optimizer,
                    local,
                    params,
                    {s: m[stage][r] for s, m in moments.items()},
                    params_dtype,
                    group_step,
                )
                ckpt["opt_param_scheduler"] = {"max_lr": 1e-3, "num_steps": 2}
            path = folder / rank_dir(r, stage, pp) / "model_optim_rng.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_rank(path, ckpt)
    (root / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))
    return root


def _megatron_optimizer(
    optimizer: torch.optim.Optimizer,
    local: dict[str, torch.Tensor | None],
    params: list[str],
    moments: dict[str, dict[str, torch.Tensor | None]],
    params_dtype: torch.dtype,
    group_step: bool,
) -> dict[str, Any]:
    """One rank's optimizer state_dict in Megatron's (non-distributed) layout."""
    plain = optimizer.state_dict()
    step = next(iter(plain["state"].values()))["step"]
    groups: list[dict[str, Any]] = []
    state: dict[int, dict[str, Any]] = {}
    masters: list[list[torch.Tensor]] = []
    index = 0
    for g, plain_group in enumerate(plain["param_groups"]):
        decayed = g == 0
        members = [k for k in params if no_weight_decay(k, local[k]) != decayed]  # type: ignore[arg-type]
        group = {k: v for k, v in plain_group.items() if k != "params"}
        group |= {"wd_mult": 1.0 if decayed else 0.0, "lr_mult": 1.0, "is_expert_parallel": False}
        group |= {"is_decoupled_lr": False, "max_lr": 1e-3, "min_lr": 1e-5}
        group["params"] = list(range(index, index + len(members)))
        if group_step:
            group["step"] = int(step.item())
        for key in members:
            entry: dict[str, Any] = {} if group_step else {"step": step.clone()}
            entry |= {slot: moments[slot][key] for slot in ("exp_avg", "exp_avg_sq")}
            state[index] = entry
            index += 1
        masters.append([local[k].clone() for k in members])  # type: ignore[union-attr]
        groups.append(group)
    inner = {"state": state, "param_groups": groups}
    if params_dtype == torch.float32:
        return inner  # FP32Optimizer.state_dict() is the torch optimizer's
    return {"optimizer": inner, "fp32_from_fp16_params": masters}


# -------------------------------------------------------- Megatron's forward, from the shards


def read_rank(path: Path) -> dict[str, Any]:
    """A rank file, fully unpickled (the harness trusts its own files)."""
    with megatron_modules():
        return torch.load(path, weights_only=False)  # type: ignore[no-any-return]


def write_rank(path: Path, ckpt: dict[str, Any]) -> None:
    with megatron_modules():
        torch.save(ckpt, path)


def load_ranks(root: Path, tp: int, pp: int) -> list[list[dict[str, torch.Tensor]]]:
    folder = root / f"iter_{ITERATION:07d}"
    return [
        [read_rank(folder / rank_dir(r, s, pp) / "model_optim_rng.pt")["model"] for r in range(tp)]
        for s in range(pp)
    ]


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.float()


def megatron_logits(
    cfg: GPTConfig, ranks: list[list[dict[str, torch.Tensor]]], tokens: torch.Tensor
) -> torch.Tensor:
    """Logits over the padded vocabulary, computed the way Megatron's parallel layers do."""
    first, last = ranks[0], ranks[-1]
    table = "embedding.word_embeddings.weight"
    rows = first[0][table].shape[0]
    x = torch.zeros(*tokens.shape, cfg.hidden)
    for r, rank in enumerate(first):  # vocab-parallel: each rank embeds the tokens in its range
        mine = (tokens >= r * rows) & (tokens < (r + 1) * rows)
        local = F.embedding((tokens - r * rows).clamp(0, rows - 1), _f32(rank[table]))
        x = x + torch.where(mine.unsqueeze(-1), local, 0.0)
    if cfg.learned_positions:
        x = x + _f32(first[0]["embedding.position_embeddings.weight"])[: tokens.shape[1]]

    def norm(rank: dict[str, torch.Tensor], prefix: str, x: torch.Tensor) -> torch.Tensor:
        w, b = _f32(rank[f"{prefix}weight"]), rank.get(f"{prefix}bias")
        if cfg.normalization == "RMSNorm":
            return F.rms_norm(x, (cfg.hidden,), w, 1e-5)
        return F.layer_norm(x, (cfg.hidden,), w, None if b is None else _f32(b), 1e-5)

    def linear(
        rank: dict[str, torch.Tensor], prefix: str, x: torch.Tensor, bias: bool = True
    ) -> torch.Tensor:
        b = rank.get(f"{prefix}bias") if bias else None
        return F.linear(x, _f32(rank[f"{prefix}weight"]), None if b is None else _f32(b))

    def row_parallel(
        stage: list[dict[str, torch.Tensor]],
        prefix: str,
        local_input: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    ) -> torch.Tensor:
        """Sum of the ranks' partial products, then the (replicated) bias once."""
        out = sum(linear(rank, prefix, local_input(rank), bias=False) for rank in stage)
        assert isinstance(out, torch.Tensor)
        bias = stage[0].get(f"{prefix}bias")
        return out if bias is None else out + _f32(bias)

    per_group, kv = cfg.heads // cfg.query_groups, cfg.kv_channels
    for stage in ranks:
        layers = sorted(
            {
                int(k.split(".")[2])
                for k in stage[0]
                if k.startswith("decoder.") and k.split(".")[2].isdigit()
            }
        )
        for i in layers:
            p = f"decoder.layers.{i}."
            attn, mlp = f"{p}self_attention.", f"{p}mlp."
            if cfg.fused_norms:
                ln1, ln2 = f"{attn}linear_qkv.layer_norm_", f"{mlp}linear_fc1.layer_norm_"
            else:
                ln1, ln2 = f"{p}input_layernorm.", f"{p}pre_mlp_layernorm."
            h = norm(stage[0], ln1, x)

            def attention(rank: dict[str, torch.Tensor], h: torch.Tensor = h) -> torch.Tensor:
                mixed = linear(rank, f"{attn}linear_qkv.", h)  # noqa: B023
                b, s, _ = mixed.shape
                # Megatron-core: [.., ng_local, (np/ng + 2) * hn], split per group into q, k, v
                q, k, v = mixed.view(b, s, -1, (per_group + 2) * kv).split(
                    [per_group * kv, kv, kv], dim=-1
                )
                return _attend(*(t.reshape(b, s, -1) for t in (q, k, v)), per_group, kv)

            x = x + row_parallel(stage, f"{attn}linear_proj.", attention)
            h = norm(stage[0], ln2, x)
            x = x + row_parallel(
                stage,
                f"{mlp}linear_fc2.",
                lambda rank, h=h: _glu(linear(rank, f"{mlp}linear_fc1.", h), cfg.swiglu),  # noqa: B023
            )
    h = norm(last[0], "decoder.final_layernorm.", x)
    head = "output_layer.weight" if "output_layer.weight" in last[0] else table
    return torch.cat([F.linear(h, _f32(rank[head])) for rank in last], dim=-1)


__all__ = [
    "ITERATION",
    "GPTConfig",
    "PlainGPT",
    "batch",
    "load_ranks",
    "make_gpt",
    "make_optimizer",
    "megatron_logits",
    "megatron_modules",
    "megatron_state",
    "read_rank",
    "train",
    "write_megatron_checkpoint",
    "write_rank",
]
