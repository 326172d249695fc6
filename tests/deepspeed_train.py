"""Train small models with the real DeepSpeed engine on CPU and save DeepSpeed checkpoints.

Usage::

    DS_ACCELERATOR=cpu python tests/deepspeed_train.py OUT [--stages 1 2 3] [--dtypes fp32 bf16]
        [--tied 2 3] [--autotp 1 2] [--pipeline 1] [--size tiny|bench] [--steps 3] [--universal]

Spawns ``--world`` gloo ranks (default 2) that train, each run from the same seed, ``--steps``
AdamW steps (``"torch_adam": true``, two parameter groups: decay and no-decay) on batches that are
the same on every rank, and ``engine.save_checkpoint(OUT/<run>/ckpt, tag)``:

* ``zero<S>-<dtype>`` for each ZeRO stage and dtype (fp32, or bf16 with fp32 master weights):
  ``Net``, a frozen parameter and a buffer, odd sizes so ZeRO partitions split tensors mid-way
  and pad their flat groups (a ``bench`` size preset: ~270M parameters);
* ``zero<S>-fp32-tied`` for each stage of ``--tied``: ``Net`` with its LM head tied to the
  embedding (one parameter under two names);
* ``autotp-zero<S>`` for each stage of ``--autotp``: a tiny transformers Llama, tensor parallel
  over all ranks with DeepSpeed's AutoTP (``"tensor_parallel": {"autotp_size": world}``);
* ``pipeline-zero<S>`` for each stage of ``--pipeline``: ``Net``'s layers (no frozen positions or
  buffer) as a DeepSpeed ``PipelineModule`` with one pipeline stage per rank (data parallel 1),
  trained with ``engine.train_batch``: layer files and one optimizer file per stage.

For fp32 (except pipeline runs) one more step then runs, and rank 0 writes to
``OUT/<run>/next.safetensors`` that step's ``loss``, the loss of the following batch after the
step (``loss_after``) and, except for AutoTP (whose ranks hold slices), every updated parameter by
FQN: a converted checkpoint must resume the same training. Gradient clipping is off (DeepSpeed's
default clips at 1.0; torch's AdamW, which a converted checkpoint resumes with, does not clip).
With ``--universal`` the parent process then runs DeepSpeed's ``ds_to_universal
--inject_missing_state`` into ``OUT/<run>/universal/<tag>`` for every run: the reference a
conversion is compared against.

Identical batches on every rank make the data-parallel gradient average exact ((g + g) / 2 == g),
so a world-1 step from the same state reproduces DeepSpeed's step bit for bit.
This module imports DeepSpeed only inside the ranks: tests import its models cheaply.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

TAG = "global_step{steps}"
SEED = 0
LR = 1e-2
BETAS = (0.9, 0.95)
EPS = 1e-8
WEIGHT_DECAY = 0.1


@dataclass(frozen=True)
class Size:
    vocab: int
    hidden: int
    ffn: int
    layers: int
    seq: int
    batch: int


SIZES = {
    # odd numel everywhere: vocab 61, ffn 50 with 24 hidden -> 2 * 61 * 24 + ... (total is odd)
    "tiny": Size(vocab=61, hidden=24, ffn=50, layers=2, seq=8, batch=4),
    # ~270M parameters: what two ranks on this 2-core, 24 GiB machine train and save in minutes
    "bench": Size(vocab=32003, hidden=1024, ffn=4096, layers=24, seq=16, batch=2),
}


class Block(nn.Module):
    def __init__(self, size: Size) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(size.hidden)
        self.up = nn.Linear(size.hidden, size.ffn)
        self.down = nn.Linear(size.ffn, size.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(self.norm(x))))


class Net(nn.Module):
    """Embedding, frozen positions, residual MLP blocks, final norm, LM head; a scale buffer."""

    def __init__(self, size: Size, tied: bool = False) -> None:
        super().__init__()
        self.size = size
        self.embed = nn.Embedding(size.vocab, size.hidden)
        self.pos = nn.Parameter(torch.randn(size.seq, size.hidden) * 0.02, requires_grad=False)
        self.blocks = nn.ModuleList(Block(size) for _ in range(size.layers))
        self.norm = nn.LayerNorm(size.hidden)
        self.head = nn.Linear(size.hidden, size.vocab)
        if tied:  # the LM head reuses the embedding matrix: one parameter, two names
            self.head.weight = self.embed.weight
        self.register_buffer("logit_scale", torch.tensor(0.75))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)) * self.logit_scale


def make_net(size: Size, seed: int = SEED, tied: bool = False) -> Net:
    """``Net`` initialised from ``seed``; LayerNorms perturbed so they hold real state."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = Net(size, tied)
        with torch.no_grad():
            for name, param in net.named_parameters():
                if "norm" in name:
                    param.add_(torch.randn_like(param), alpha=0.1)
    return net


def param_groups(net: nn.Module) -> list[dict[str, object]]:
    """AdamW groups: matrices decay, vectors (biases, norms) do not; frozen ones are left out."""
    decay, no_decay = [], []
    for param in net.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": WEIGHT_DECAY},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def batch(size: Size, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets of training step ``step``: the same on every rank."""
    gen = torch.Generator().manual_seed(10_000 + step)
    tokens = torch.randint(0, size.vocab, (size.batch, size.seq + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def loss_fn(net: nn.Module, size: Size, step: int) -> torch.Tensor:
    inputs, targets = batch(size, step)
    logits = net(inputs)
    return F.cross_entropy(logits.reshape(-1, size.vocab).float(), targets.reshape(-1))


def make_pipeline_layers(size: Size, seed: int = SEED) -> list[nn.Module]:
    """``Net``'s layers in order, for a ``PipelineModule`` (names ``<layer index>.<key>``)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        blocks = [Block(size) for _ in range(size.layers)]
        return [
            nn.Embedding(size.vocab, size.hidden),
            *blocks,
            nn.LayerNorm(size.hidden),
            nn.Linear(size.hidden, size.vocab),
        ]


def pipeline_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def ds_config(stage: int, dtype: str, batch_size: int, autotp: int = 0) -> dict[str, object]:
    config: dict[str, object] = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 1 << 30,
        "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 by default; torch's AdamW does not
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": LR,
                "betas": list(BETAS),
                "eps": EPS,
                "weight_decay": WEIGHT_DECAY,
                "torch_adam": True,
            },
        },
        "zero_optimization": {"stage": stage},
    }
    if dtype == "bf16":
        config["bf16"] = {"enabled": True}
    if autotp:
        config["tensor_parallel"] = {"autotp_size": autotp}
    return config


# A tiny Llama (transformers, built from a config: nothing downloaded) for DeepSpeed's AutoTP:
# tensor parallel over all ranks (column-parallel q/k/v/gate/up and lm_head, row-parallel o/down,
# replicated norms and embedding), ZeRO-1/2 over the data-parallel rest.
LLAMA = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 16,
}
LLAMA_BATCH = 2


def make_llama(seed: int = SEED) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(**LLAMA))


def llama_loss(model: nn.Module, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(20_000 + step)
    tokens = torch.randint(0, int(LLAMA["vocab_size"]), (LLAMA_BATCH, 8), generator=gen)
    loss: torch.Tensor = model(input_ids=tokens, labels=tokens).loss
    return loss


@dataclass(frozen=True)
class Run:
    """One trained checkpoint: ``OUT/<name>/ckpt``."""

    stage: int
    dtype: str = "fp32"
    autotp: bool = False
    tied: bool = False
    pipeline: bool = False

    @property
    def name(self) -> str:
        if self.autotp:
            return f"autotp-zero{self.stage}"
        if self.pipeline:
            return f"pipeline-zero{self.stage}"
        return run_name(self.stage, self.dtype) + ("-tied" if self.tied else "")


def run_name(stage: int, dtype: str) -> str:
    return f"zero{stage}-{dtype}"


def runs(args: argparse.Namespace) -> list[Run]:
    plain = [Run(stage, dtype) for stage in args.stages for dtype in args.dtypes]
    tied = [Run(stage, tied=True) for stage in args.tied]
    pipeline = [Run(stage, pipeline=True) for stage in args.pipeline]
    return plain + tied + [Run(stage, autotp=True) for stage in args.autotp] + pipeline


def _train(deepspeed: Any, rank: int, world: int, run: Run, args: argparse.Namespace) -> None:
    size = SIZES[args.size]
    out = os.path.join(args.out, run.name)
    started = time.monotonic()
    net: nn.Module
    if run.pipeline:
        net = deepspeed.pipe.PipelineModule(
            layers=make_pipeline_layers(size), num_stages=world, loss_fn=pipeline_loss
        )
    else:
        net = make_llama() if run.autotp else make_net(size, tied=run.tied)

    def loss_at(step: int) -> torch.Tensor:
        return llama_loss(engine, step) if run.autotp else loss_fn(engine, size, step)

    engine, *_ = deepspeed.initialize(
        model=net,
        model_parameters=param_groups(net),
        config=ds_config(
            run.stage,
            run.dtype,
            LLAMA_BATCH if run.autotp else size.batch,
            autotp=world if run.autotp else 0,
        ),
    )
    for step in range(args.steps):
        if run.pipeline:  # forward, backward and step over the stages
            engine.train_batch(iter([batch(size, step)]))
        else:
            engine.backward(loss_at(step))
            engine.step()
    engine.save_checkpoint(os.path.join(out, "ckpt"), tag=TAG.format(steps=args.steps))
    saved = time.monotonic()
    if args.next_step and run.dtype == "fp32" and not run.pipeline:
        loss = loss_at(args.steps)
        engine.backward(loss)
        engine.step()
        params = list(engine.module.named_parameters())
        with torch.no_grad():
            loss_after = loss_at(args.steps + 1)
        tensors = {"loss": loss.detach().float().reshape(()), "loss_after": loss_after.float()}
        with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=run.stage == 3):
            if not run.autotp:  # TP ranks hold slices
                tensors |= {name: p.detach().float().clone() for name, p in params}
            if rank == 0:
                from safetensors.torch import save_file

                save_file(tensors, os.path.join(out, "next.safetensors"))
    engine.destroy()
    if rank == 0:
        print(f"{run.name}: trained, saved in {saved - started:.1f}s", flush=True)


def _rank_main(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    import deepspeed  # slow (seconds): only the ranks pay for it

    deepspeed.init_distributed(dist_backend="gloo")
    for run in runs(args):
        _train(deepspeed, rank, world, run, args)
    torch.distributed.destroy_process_group()


def universal(ckpt: str, tag: str, out: str) -> None:
    """DeepSpeed's converter (``python -m deepspeed.checkpoint.ds_to_universal
    --inject_missing_state``) on checkpoint ``ckpt/tag``: the same entry point, run in this
    process so several conversions import DeepSpeed once; one worker, as the checkpoints are tiny.
    """
    from deepspeed.checkpoint import ds_to_universal

    argv = sys.argv
    sys.argv = [
        "ds_to_universal",
        *("--input_folder", os.path.join(ckpt, tag), "--output_folder", out),
        *("--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1"),
    ]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            ds_to_universal.main(ds_to_universal.parse_arguments())
    finally:
        sys.argv = argv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--stages", type=int, nargs="*", default=[1, 2, 3])
    parser.add_argument("--dtypes", choices=["fp32", "bf16"], nargs="+", default=["fp32"])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--no-next-step", dest="next_step", action="store_false")
    parser.add_argument("--tied", type=int, nargs="*", default=[], help="ZeRO stages, tied Net")
    parser.add_argument(
        "--autotp", type=int, nargs="*", default=[], help="ZeRO stages of AutoTP runs"
    )
    parser.add_argument(
        "--pipeline", type=int, nargs="*", default=[], help="ZeRO stages of pipeline runs"
    )
    parser.add_argument("--universal", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump({**vars(args), "size": asdict(SIZES[args.size])}, f)

    import torch.multiprocessing as mp

    from dist_harness import free_port

    mp.spawn(_rank_main, args=(args.world, free_port(), args), nprocs=args.world)
    if args.universal:
        tag = TAG.format(steps=args.steps)
        for run in runs(args):
            folder = os.path.join(args.out, run.name)
            universal(os.path.join(folder, "ckpt"), tag, os.path.join(folder, "universal", tag))


if __name__ == "__main__":
    main()
