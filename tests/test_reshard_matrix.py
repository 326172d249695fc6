"""Acceptance matrix: save on one parallel layout, load on another, bit-exact, and train on.

Two sources, each trained 3 AdamW steps from the same seed and then saved:

* FSDP2 at world 4 (``fully_shard`` on each block and the root);
* tensor parallel at world 2 (``parallelize_module``: column-wise q/k/v/up, row-wise o/down).

Each target is a model built from a *different* seed with a fresh optimizer (no state yet), so
a load that does nothing, or fails to create the optimizer state, is caught. After the load every
parameter and every AdamW state entry (exp_avg, exp_avg_sq, step), keyed by FQN, must equal the
source's reference with ``torch.equal``; then the target trains 3 more steps, whose losses must
match those of the source run continuing uninterrupted after its save. Every rank trains on the
same batch, so losses are comparable across layouts: exact (1e-6) on the saving layout, up to
float reduction order on the others.

Spawns are the slow part here, so a run checks several targets: world 2 builds the TP source;
world 4 builds the FSDP source, then loads it back (same layout) and loads the TP checkpoint;
world 2 loads FSDP2 and TP targets; world 3 loads FSDP2 with uneven shards; the test process
itself loads a plain module (world 1).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)

import unickpt

from dist_harness import run_distributed
from models import TinyTransformer, lm_loss, make_model

SOURCE_SEED = 0
TARGET_SEED = 1
STEPS = 3
SAME_LAYOUT_TOL = 1e-6  # resuming on the saving layout: the very same computation
CROSS_LAYOUT_TOL = 1e-5  # other layouts sum gradients / matmul pieces in another order

TP_PLAN: dict[str, ParallelStyle] = {
    "blocks.*.attn.q": ColwiseParallel(),
    "blocks.*.attn.k": ColwiseParallel(),
    "blocks.*.attn.v": ColwiseParallel(),
    "blocks.*.attn.o": RowwiseParallel(),
    "blocks.*.mlp.up": ColwiseParallel(),
    "blocks.*.mlp.down": RowwiseParallel(),
}

Reference = dict[str, Any]  # "params", "optim", "groups" (see _snapshot) and "losses"


# ----------------------------------------------------------------------------------- layouts


def _fsdp(model: TinyTransformer) -> TinyTransformer:
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def _tp(model: TinyTransformer) -> TinyTransformer:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    parallelize_module(model, mesh, TP_PLAN)
    return model


def _plain(model: TinyTransformer) -> TinyTransformer:
    return model


Layout = Callable[[TinyTransformer], TinyTransformer]


# ------------------------------------------------------------------------- training, state


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """Created after the model is parallelised, so its state takes the parameters' layout."""
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> list[float]:
    losses: list[float] = []
    for step in steps:
        opt.zero_grad()
        loss = lm_loss(model, step)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of the whole global tensor (a collective for DTensors: every rank calls in the same
    order). A copy, also of a Replicate DTensor, whose full_tensor() is its local tensor."""
    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().clone()


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> Reference:
    """Full parameters, optimizer state and param groups, keyed by parameter FQN."""
    fqn = {id(p): name for name, p in model.named_parameters()}
    params = [p for group in opt.param_groups for p in group["params"]]
    sd = opt.state_dict()
    return {
        "params": {name: _full(p) for name, p in model.named_parameters()},
        "optim": {
            fqn[id(params[index])]: {key: _full(value) for key, value in entries.items()}
            for index, entries in sd["state"].items()
        },
        "groups": [
            {**group, "params": [fqn[id(params[i])] for i in group["params"]]}
            for group in sd["param_groups"]
        ],
    }


def _state(model: nn.Module, opt: torch.optim.Optimizer, trainer: dict[str, int]) -> dict[str, Any]:
    return {"model": model, "optim": opt, "trainer": trainer}


def _differences(expected: Reference, actual: Reference) -> list[str]:
    """Every way ``actual`` is not bit-identical to ``expected``, one line each."""
    problems: list[str] = []

    def tensors(where: str, want: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
        problems.extend(f"{where}.{k}: missing after load" for k in sorted(want.keys() - got))
        problems.extend(f"{where}.{k}: not in the reference" for k in sorted(got.keys() - want))
        for key in sorted(want.keys() & got.keys()):
            w, g = want[key], got[key]
            if w.dtype != g.dtype or w.shape != g.shape:
                problems.append(
                    f"{where}.{key}: {g.dtype}{list(g.shape)}, expected {w.dtype}{list(w.shape)}"
                )
            elif not torch.equal(w, g):
                diff = (w.double() - g.double()).abs()
                problems.append(
                    f"{where}.{key}: {int((diff != 0).sum())}/{w.numel()} elements differ "
                    f"(max abs diff {diff.max().item():.3g})"
                )

    tensors("param", expected["params"], actual["params"])
    opt_want, opt_got = expected["optim"], actual["optim"]
    problems.extend(f"optim {k}: no state after load" for k in sorted(opt_want.keys() - opt_got))
    problems.extend(f"optim {k}: unexpected state" for k in sorted(opt_got.keys() - opt_want))
    for name in sorted(opt_want.keys() & opt_got.keys()):
        tensors(f"optim {name}", opt_want[name], opt_got[name])
    if expected["groups"] != actual["groups"]:
        problems.append(f"param_groups: {actual['groups']}, expected {expected['groups']}")
    return problems


def _misplaced_state(model: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """Optimizer state not laid out like its parameter (a DTensor with the same placements)."""
    problems: list[str] = []
    for name, param in model.named_parameters():
        want = getattr(param, "placements", None)
        for key, value in opt.state[param].items():
            got = getattr(value, "placements", None)
            if value.shape == param.shape and got != want:  # not the scalar step
                problems.append(f"optim {name}.{key}: placements {got}, parameter has {want}")
    return problems


# ------------------------------------------------------------------------ source and target


def _train_and_save(layout: Layout, ckpt: str, reference_path: str) -> Reference:
    """Train the source 3 steps, save it, record the reference, then continue uninterrupted."""
    model = layout(make_model(SOURCE_SEED))
    opt = _optimizer(model)
    _train(model, opt, range(STEPS))
    unickpt.save(ckpt, _state(model, opt, {"step": STEPS}), step=STEPS)
    reference = _snapshot(model, opt)
    reference["losses"] = _train(model, opt, range(STEPS, 2 * STEPS))
    if dist.get_rank() == 0:
        torch.save(reference, reference_path)
    dist.barrier()  # the reference is on disk before any rank reads it
    return reference


def _load_and_check(layout: Layout, ckpt: str, reference: Reference, tol: float) -> list[str]:
    """Load ``ckpt`` into a fresh target of ``layout``; what differs from ``reference``."""
    model = layout(make_model(TARGET_SEED))
    opt = _optimizer(model)
    trainer = {"step": 0}
    result = unickpt.load(ckpt, _state(model, opt, trainer))
    problems = _differences(reference, _snapshot(model, opt)) + _misplaced_state(model, opt)
    if trainer["step"] != STEPS or result.step != STEPS:
        problems.append(f"trainer.step {trainer['step']}, LoadResult.step {result.step}")
    losses = _train(model, opt, range(STEPS, 2 * STEPS))
    want = reference["losses"]
    if max(abs(got - expected) for got, expected in zip(losses, want, strict=True)) > tol:
        problems.append(f"losses after resuming {losses}, uninterrupted {want} (tol {tol})")
    return problems


# ------------------------------------------------------------------------ per-rank programs


def _tp_source(rank: int, world_size: int, ckpt: str, reference_path: str) -> None:
    _train_and_save(_tp, ckpt, reference_path)


def _fsdp4_source_and_targets(
    rank: int, world_size: int, ckpt: str, reference_path: str, tp_ckpt: str, tp_reference: str
) -> dict[str, list[str]]:
    reference = _train_and_save(_fsdp, ckpt, reference_path)
    return {
        "fsdp4": _load_and_check(_fsdp, ckpt, reference, SAME_LAYOUT_TOL),
        "tp2->fsdp4": _load_and_check(_fsdp, tp_ckpt, torch.load(tp_reference), CROSS_LAYOUT_TOL),
    }


def _world2_targets(
    rank: int, world_size: int, ckpt: str, reference_path: str
) -> dict[str, list[str]]:
    reference = torch.load(reference_path)
    return {
        "fsdp2": _load_and_check(_fsdp, ckpt, reference, CROSS_LAYOUT_TOL),
        "tp2": _load_and_check(_tp, ckpt, reference, CROSS_LAYOUT_TOL),
    }


def _world3_targets(
    rank: int, world_size: int, ckpt: str, reference_path: str
) -> dict[str, list[str]]:
    reference = torch.load(reference_path)
    return {"fsdp3": _load_and_check(_fsdp, ckpt, reference, CROSS_LAYOUT_TOL)}


# ------------------------------------------------------------------------------------ tests


@dataclass
class Sources:
    fsdp_ckpt: str
    fsdp_reference: str
    reports: dict[str, list[list[str]]]  # target -> each rank's problems, from the world-4 run


def _by_target(per_rank: list[dict[str, list[str]]]) -> dict[str, list[list[str]]]:
    return {target: [rank[target] for rank in per_rank] for target in per_rank[0]}


def _assert_exact(target: str, per_rank: list[list[str]]) -> None:
    lines = [f"  rank {rank}: {p}" for rank, problems in enumerate(per_rank) for p in problems]
    assert not lines, f"target {target}: state differs from the source:\n" + "\n".join(lines)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Sources:
    root: Path = tmp_path_factory.mktemp("reshard_matrix")
    tp_ckpt, tp_reference = os.fspath(root / "tp2"), os.fspath(root / "tp2_reference.pt")
    fsdp_ckpt, fsdp_reference = os.fspath(root / "fsdp4"), os.fspath(root / "fsdp4_ref.pt")
    run_distributed(2, _tp_source, tp_ckpt, tp_reference)
    per_rank = run_distributed(
        4, _fsdp4_source_and_targets, fsdp_ckpt, fsdp_reference, tp_ckpt, tp_reference
    )
    return Sources(fsdp_ckpt, fsdp_reference, _by_target(per_rank))


def test_fsdp4_to_fsdp4_resumes_like_uninterrupted_run(sources: Sources) -> None:
    _assert_exact("fsdp4", sources.reports["fsdp4"])


def test_tp2_to_fsdp4(sources: Sources) -> None:
    _assert_exact("tp2->fsdp4", sources.reports["tp2->fsdp4"])


def test_fsdp4_to_fsdp2_and_tp2(sources: Sources) -> None:
    reports = _by_target(
        run_distributed(2, _world2_targets, sources.fsdp_ckpt, sources.fsdp_reference)
    )
    for target, per_rank in reports.items():
        _assert_exact(target, per_rank)


def test_fsdp4_to_fsdp3_uneven(sources: Sources) -> None:
    reports = _by_target(
        run_distributed(3, _world3_targets, sources.fsdp_ckpt, sources.fsdp_reference)
    )
    _assert_exact("fsdp3", reports["fsdp3"])


def test_fsdp4_to_single_process_module(sources: Sources) -> None:
    reference = torch.load(sources.fsdp_reference)
    _assert_exact(
        "plain", [_load_and_check(_plain, sources.fsdp_ckpt, reference, CROSS_LAYOUT_TOL)]
    )
