"""DeepSpeed ZeRO-1/2/3 -> unickpt: fp32 master weights, Adam moments and step, per parameter.

A DeepSpeed checkpoint (``engine.save_checkpoint(dir, tag)``) keeps the training state the way
ZeRO partitions it over the data-parallel (DP) ranks, one optimizer file per DP rank and model-
parallel rank::

    <dir>/latest                                    the newest tag
    <dir>/<tag>/mp_rank_XX_model_states.pt          ZeRO-1/2: module, param_shapes, ...
    <dir>/<tag>/zero_pp_rank_D_mp_rank_XX_model_states.pt    ZeRO-3: the same, per DP rank
    <dir>/<tag>/[bf16_]zero_pp_rank_D_mp_rank_XX_optim_states.pt
    <dir>/<tag>/layer_LL[-model_TT]-model_states.pt         pipeline parallel: layer LL's weights

With pipeline parallelism (ZeRO-1/2), model-parallel rank XX is pipeline stage XX // TP and TP
rank XX % TP; its model-state file has no module, each layer's state_dict is a layer file, and
names are the PipelineModule's (``<LL>.<key>``, the layer's global index), as ``ds_to_universal``
has them.

* **ZeRO-1/2**: each parameter group is one flat fp32 buffer (parameters back to back in
  ``param_shapes`` order, padded at the end), cut into equal contiguous partitions, one per DP
  rank. A rank's ``param_slice_mappings`` say where each (piece of a) parameter lies in its
  partition; a parameter is the concatenation of its pieces in DP rank order. Adam's moments have
  the same layout (the optimizer ran on the flat partitions).
* **ZeRO-3**: every parameter is partitioned on its own: each DP rank holds ``ceil(numel / DP)``
  elements of it (the last ones padding), parameters back to back in ``param_shapes`` order.
  Frozen parameters are partitioned the same way in the model-state files.

The output is what ``unickpt.save(path, {"model": model, "optim": adam})`` writes for the same
model and a torch Adam/AdamW with the same groups: ``model.<fqn>`` (fp32 master weights for
trained parameters; frozen parameters and buffers as the module stored them), ``optim.state.<fqn>.
{exp_avg, exp_avg_sq, step}`` and ``optim.param_groups`` (the source's hyper-parameters, params as
FQN lists). Tensor and pipeline parallel checkpoints (several ``mp_rank``) merge through a spec
(docs/CONVERT.md): each model-parallel rank's tensors are one TP/PP piece, and every optimizer slot
of a parameter merges with that parameter's rule.

Files are memory-mapped and never unpickled beyond tensors, containers and DeepSpeed's few
plain-data classes (mapped to inert stand-ins); each output tensor gathers its pieces when written
and hands the source pages back, so memory stays at the largest tensor, not the model. Every
file and folder read (``latest``, the tag folder, each ``.pt`` file) must resolve inside ``src``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from unickpt.convert.spec import Rule, Spec
from unickpt.convert.target import optimizer_step, write_converted
from unickpt.convert.torchfile import (
    JsonBudget,
    inside,
    load_torch_file,
    read_tracker,
    release_pages,
    reports_malformed_source,
)
from unickpt.engine.stream import LazyTensor, Progress
from unickpt.errors import (
    CheckpointNotFoundError,
    ConversionError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    short_repr,
)
from unickpt.format.manifest import Manifest

SLOTS = ("exp_avg", "exp_avg_sq")  # Adam's per-parameter tensors, besides the master weight
MASTER = "fp32"

_OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_MODEL_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")  # ZeRO-1/2
_ZERO3_MODEL_FILE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
# pipeline parallel: each layer's state_dict, per TP rank ("-model_YY" only when TP > 1)
_LAYER_FILE = re.compile(r"^layer_(\d+)(?:-model_(\d+))?-model_states\.pt$")


class _Attributes:
    """Inert stand-in for DeepSpeed's loss-scaler objects: unpickling only sets attributes."""


class _FragmentAddress:
    """Stand-in for ``deepspeed.utils.tensor_fragment.fragment_address`` (a plain dataclass)."""

    numel: int
    start: int


# What DeepSpeed pickles besides tensors and containers. ZeroStageEnum is an int enum pickled as
# a call with its value, so ``int`` rebuilds it as the plain stage number.
DEEPSPEED_GLOBALS: tuple[tuple[Any, str], ...] = (
    (int, "deepspeed.runtime.zero.config.ZeroStageEnum"),
    (_FragmentAddress, "deepspeed.utils.tensor_fragment.fragment_address"),
    (_Attributes, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (_Attributes, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
)


# ------------------------------------------------------------------------------ the source


def checkpoint_folder(src: str | os.PathLike[str], tag: str | None = None) -> Path:
    """The folder holding the ``*_optim_states.pt`` files of ``src``'s checkpoint ``tag``.

    ``src`` is either that folder or the save directory above it; there ``tag`` defaults to the
    one named by the ``latest`` file, as DeepSpeed's own loader does. Both must resolve inside
    ``src`` (UnsafeCheckpointError otherwise).
    """
    root = Path(src)
    if tag is None and (root / "latest").is_file() and not _optim_files_in(root):
        tag = read_tracker(root, "latest")
    if tag is not None:
        if not tag or Path(tag).name != tag or tag in (".", ".."):
            raise UnsafeCheckpointError(
                f"DeepSpeed tag {short_repr(tag)} under {root} is not a folder name"
            )
        root = inside(root, root / tag)
    if not root.is_dir():
        raise CheckpointNotFoundError(f"no DeepSpeed checkpoint folder {root}")
    if not _optim_files_in(root):
        raise CheckpointNotFoundError(
            f"{root} holds no DeepSpeed ZeRO optimizer files (*_optim_states.pt); pass the folder "
            "of one checkpoint (global_stepN) or the save directory with its 'latest' file"
        )
    return root


def _optim_files_in(folder: Path) -> list[Path]:
    return [p for p in folder.glob("*_optim_states.pt") if _OPTIM_FILE.match(p.name)]


def _grid(files: Iterable[Path], pattern: re.Pattern[str], what: str) -> list[list[Path]]:
    """``grid[mp][dp]`` of the files named ``..._pp_rank_<dp>_mp_rank_<mp>...``, all present."""
    found: dict[tuple[int, int], Path] = {}
    for path in files:
        if match := pattern.match(path.name):
            found[(int(match.group(2)), int(match.group(1)))] = path
    if not found:
        raise CheckpointNotFoundError(f"no {what} files")
    mp_degree = 1 + max(mp for mp, _ in found)
    dp_degree = 1 + max(dp for _, dp in found)
    missing = [
        f"mp_rank {mp} dp_rank {dp}"
        for mp in range(mp_degree)
        for dp in range(dp_degree)
        if (mp, dp) not in found
    ]
    if missing:
        raise CorruptCheckpointError(f"{what} files missing for: {', '.join(missing)}")
    return [[found[(mp, dp)] for dp in range(dp_degree)] for mp in range(mp_degree)]


def _field(state: Mapping[str, Any], name: str, where: Path | str) -> Any:
    if not isinstance(state, Mapping) or name not in state:
        raise CorruptCheckpointError(f"{where}: no {name!r} (not a DeepSpeed ZeRO checkpoint?)")
    return state[name]


@dataclass
class _Piece:
    """Elements ``[start, start + numel)`` of a flat partition tensor (read lazily via mmap)."""

    flat: torch.Tensor
    start: int
    numel: int


@dataclass
class _Param:
    """One trained parameter as one model-parallel rank stores it, split over DP ranks."""

    shape: tuple[int, ...]
    group: int
    master: list[_Piece]
    slots: dict[str, list[_Piece]]
    step: float | None


def _gather(key: str, shape: tuple[int, ...], pieces: Sequence[_Piece]) -> LazyTensor:
    """The tensor of ``shape`` concatenated from ``pieces``, read (and their pages released)
    only when it is written."""
    dtype = pieces[0].flat.dtype
    origin = f"{len(pieces)} ZeRO partition piece(s) of {key}"
    if sum(p.numel for p in pieces) != math.prod(shape) or len({p.flat.dtype for p in pieces}) > 1:
        raise CorruptCheckpointError(
            f"{key!r}: the ZeRO partitions hold {sum(p.numel for p in pieces)} element(s) "
            f"({sorted({str(p.flat.dtype) for p in pieces})}) for a parameter of shape "
            f"{list(shape)}"
        )

    def load() -> torch.Tensor:
        windows = [p.flat.narrow(0, p.start, p.numel) for p in pieces]
        out = torch.cat(windows).view(shape)
        for window in windows:
            release_pages(window)
        return out

    return LazyTensor(shape, dtype, load, origin)


def _stored(tensor: torch.Tensor, origin: str) -> LazyTensor:
    """A tensor the module stored whole (buffers, frozen parameters in ZeRO-1/2)."""

    def load() -> torch.Tensor:
        out = tensor.clone()
        release_pages(tensor)
        return out

    return LazyTensor(tuple(tensor.shape), tensor.dtype, load, origin)


@dataclass
class _RankState:
    """What one model-parallel rank holds, gathered over its DP partitions."""

    params: dict[str, _Param] = field(default_factory=dict)
    stored: dict[str, LazyTensor] = field(default_factory=dict)  # buffers, frozen params
    order: list[str] = field(default_factory=list)  # the module's state_dict order
    aliases: dict[str, str] = field(default_factory=dict)  # tied parameter -> its owner
    groups: list[dict[str, Any]] = field(default_factory=list)  # hyper-parameters, no params

    def model(self) -> dict[str, LazyTensor]:
        out: dict[str, LazyTensor] = {}
        for name in self.order:
            if name in self.params:
                out[name] = _gather(name, self.params[name].shape, self.params[name].master)
            elif name in self.aliases and self.aliases[name] in self.params:
                owner = self.params[self.aliases[name]]
                out[name] = _gather(name, owner.shape, owner.master)
            elif name in self.stored:
                out[name] = self.stored[name]
        return out

    def slot(self, slot: str) -> dict[str, LazyTensor]:
        return {
            name: _gather(f"{name} ({slot})", p.shape, p.slots[slot])
            for name, p in self.params.items()
            if slot in p.slots
        }


def _hyper_parameters(groups: Any, where: Path, budget: JsonBudget) -> list[dict[str, Any]]:
    if not isinstance(groups, list) or not all(
        isinstance(g, Mapping) and all(isinstance(k, str) for k in g) for g in groups
    ):
        raise CorruptCheckpointError(
            f"{where}: optimizer param_groups is not a list of dicts with string keys"
        )
    budget.charge(groups, f"{where}: optimizer param_groups")  # before _json_value walks them
    return [
        {k: _json_value(v, f"{where}: param group {k!r}") for k, v in g.items()} for g in groups
    ]


def _json_value(value: Any, where: str) -> Any:
    """Hyper-parameters as ``unickpt.save`` stores them (JSON): tuples as lists, 0-d tensors as
    numbers."""
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        return value.item()
    if isinstance(value, list | tuple):
        return [_json_value(v, where) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise ConversionError(f"{where}: {type(value).__name__} value is not a plain hyper-parameter")


def _step(entry: Mapping[str, Any]) -> float | None:
    step = entry.get("step")
    return None if step is None else float(step)


_Loader = Callable[[Path], Any]  # a torch file's unpickled content (memory-mapped tensors)


# a module tensor's name -> (the file holding it, the tensor)
_Module = Mapping[str, tuple[Path, torch.Tensor]]


def _zero12_rank(
    model_file: Path,
    optim_files: Sequence[Path],
    load: _Loader,
    layers: _Module | None,
    budget: JsonBudget,
) -> _RankState:
    """One model-parallel rank of a ZeRO-1/2 checkpoint; ``layers`` is its module when a
    pipeline-parallel checkpoint stored it in layer files. Its param groups are charged to
    ``budget``."""
    model_state = load(model_file)
    shapes = _field(model_state, "param_shapes", model_file)
    optims = [_field(load(f), "optimizer_state_dict", f) for f in optim_files]
    base = [_field(o, "base_optimizer_state", f) for o, f in zip(optims, optim_files, strict=True)]
    flats = [
        _field(o, "single_partition_of_fp32_groups", f)
        for o, f in zip(optims, optim_files, strict=True)
    ]
    mappings = [
        _field(o, "param_slice_mappings", f) for o, f in zip(optims, optim_files, strict=True)
    ]
    groups = _field(base[0], "param_groups", optim_files[0])
    if not isinstance(shapes, list) or len(shapes) != len(groups):
        raise CorruptCheckpointError(
            f"{model_file}: param_shapes describe {len(shapes)} group(s), the optimizer has "
            f"{len(groups)}"
        )
    rank = _RankState(groups=_hyper_parameters(groups, optim_files[0], budget))
    for g, group_shapes in enumerate(shapes):
        # each group is one flat tensor; its optimizer state is keyed by that tensor's index
        states = [
            b["state"].get(_flat_index(b["param_groups"], g, f)) or {}
            for b, f in zip(base, optim_files, strict=True)
        ]
        for name, shape in group_shapes.items():
            located = [(dp, m[g][name]) for dp, m in enumerate(mappings) if name in m[g]]
            if not located:
                raise CorruptCheckpointError(
                    f"{model_file}: parameter {name!r} is in no DP rank's param_slice_mappings"
                )
            rank.params[name] = _Param(
                tuple(shape),
                g,
                [_Piece(flats[dp][g], a.start, a.numel) for dp, a in located],
                {
                    slot: [_Piece(states[dp][slot], a.start, a.numel) for dp, a in located]
                    for slot in SLOTS
                    if all(slot in states[dp] for dp, _ in located)
                },
                _step(states[located[0][0]]),
            )
    stored = model_state.get("module")
    if stored is not None:
        module: _Module = {n: (model_file, t) for n, t in stored.items()}
    elif layers is not None:
        module = layers
    else:
        raise CorruptCheckpointError(f"{model_file} holds no module and there are no layer files")
    for name, (path, tensor) in module.items():
        rank.order.append(name)
        if name not in rank.params:
            rank.stored[name] = _stored(tensor, f"{path}:{name}")
    rank.order += [n for n in rank.params if n not in module]  # excluded from the module
    rank.aliases = dict(model_state.get("shared_params") or {})
    return rank


def _flat_index(groups: Sequence[Mapping[str, Any]], g: int, where: Path) -> Any:
    params = groups[g]["params"]
    if len(params) != 1:
        raise CorruptCheckpointError(
            f"{where}: ZeRO-1/2 param group {g} should be one flat tensor, it has {len(params)}"
        )
    return params[0]


def _zero3_rank(
    model_files: Sequence[Path], optim_files: Sequence[Path], load: _Loader, budget: JsonBudget
) -> _RankState:
    """One model-parallel rank of a ZeRO-3 checkpoint; its param groups are charged to
    ``budget``."""
    models = [load(f) for f in model_files]
    shapes = _field(models[0], "param_shapes", model_files[0])
    outer = [_field(load(f), "optimizer_state_dict", f) for f in optim_files]
    optims = [_field(o, "optimizer_state_dict", f) for o, f in zip(outer, optim_files, strict=True)]
    flats = [_field(o, "fp32_flat_groups", f) for o, f in zip(outer, optim_files, strict=True)]
    groups = _field(optims[0], "param_groups", optim_files[0])
    group_of = {index: g for g, group in enumerate(groups) for index in group["params"]}
    if len(shapes) != len(group_of):
        raise CorruptCheckpointError(
            f"{model_files[0]}: param_shapes describe {len(shapes)} sub-group(s), the optimizer "
            f"has {len(group_of)}"
        )
    dp = len(optim_files)
    rank = _RankState(groups=_hyper_parameters(groups, optim_files[0], budget))
    for index, (sub_group, group_shapes) in enumerate(zip(sorted(group_of), shapes, strict=True)):
        states = [o["state"].get(sub_group) or {} for o in optims]
        offset = 0
        for name, shape in group_shapes.items():
            numel = math.prod(shape)
            rank.params[name] = _Param(
                tuple(shape),
                group_of[sub_group],
                _zero3_pieces([f[index] for f in flats], offset, numel),
                {
                    slot: _zero3_pieces([s[slot] for s in states], offset, numel)
                    for slot in SLOTS
                    if all(slot in s for s in states)
                },
                _step(states[0]),
            )
            offset += -(-numel // dp)
        for r, f in enumerate(flats):
            if f[index].numel() != offset:
                raise CorruptCheckpointError(
                    f"{optim_files[r]}: fp32 partition {index} holds {f[index].numel()} "
                    f"element(s), its param_shapes need {offset}"
                )
    rank.aliases = dict(models[0].get("shared_params") or {})
    frozen = models[0].get("frozen_param_shapes") or {}
    fragments = [m.get("frozen_param_fragments") or {} for m in models]
    buffers = set(models[0].get("buffer_names") or ())
    for name, tensor in _field(models[0], "module", model_files[0]).items():
        rank.order.append(name)
        if name in frozen:
            shape = tuple(frozen[name])
            own = [
                _field(f, name, m).reshape(-1) for f, m in zip(fragments, model_files, strict=True)
            ]
            rank.stored[name] = _gather(name, shape, _zero3_pieces(own, 0, math.prod(shape)))
        elif name in buffers:
            rank.stored[name] = _stored(tensor, f"{model_files[0]}:module.{name}")
        elif name not in rank.params and name not in rank.aliases:
            raise CorruptCheckpointError(
                f"{model_files[0]}: module entry {name!r} is neither a partitioned parameter, "
                "a frozen parameter nor a buffer"
            )
    listed = set(rank.order)
    rank.order += [n for n in rank.params if n not in listed]
    return rank


def _zero3_pieces(flats: Sequence[torch.Tensor], offset: int, numel: int) -> list[_Piece]:
    """Each DP rank's share of a ZeRO-3 parameter: ``ceil(numel / DP)`` elements at ``offset``
    of that rank's flat tensor, of which the last rank's tail is padding."""
    part = -(-numel // len(flats))
    return [_Piece(t, offset, max(0, min(part, numel - r * part))) for r, t in enumerate(flats)]


# ------------------------------------------------------------------------------ the conversion


@reports_malformed_source("DeepSpeed")
def import_deepspeed(
    src: str | os.PathLike[str],
    dst: str,
    *,
    spec: Spec | str | os.PathLike[str] | None = None,
    variables: Mapping[str, int] | None = None,
    tag: str | None = None,
    trust_pickle: bool = False,
    progress: Progress | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Manifest:
    """Convert the DeepSpeed ZeRO-1/2/3 checkpoint at ``src`` into a unickpt checkpoint at ``dst``.

    ``src`` is a checkpoint folder (``global_stepN``) or the save directory holding ``latest``
    (then ``tag`` picks another checkpoint). ``spec`` (a :class:`Spec`, a YAML file or a shipped
    spec's name; default ``plain``) merges tensor/pipeline-parallel ranks; ``variables`` fill
    its ``${...}`` values. Foreign pickled objects beyond DeepSpeed's plain data need
    ``trust_pickle=True``. ``storage_options`` configure an ``s3://`` ``dst``. Returns the
    committed manifest.
    """
    folder = checkpoint_folder(src, tag)
    budget = JsonBudget()  # for everything the manifest takes from the source besides tensors

    opened: dict[Path, Any] = {}

    def load(path: Path) -> Any:
        """Each file (inside ``src``) unpickled once; its tensors stay memory-mapped, read when
        written."""
        if path not in opened:
            opened[path] = load_torch_file(
                inside(Path(src), path), trust_pickle=trust_pickle, extra_globals=DEEPSPEED_GLOBALS
            )
        return opened[path]

    experts = sorted(p.name for p in folder.glob("layer_*_expert_*_model_states.pt"))
    if experts:
        raise ConversionError(
            f"{folder} holds mixture-of-experts files ({experts[0]!r}, ...): DeepSpeed MoE "
            "checkpoints are not supported"
        )
    optim_grid = _grid(_optim_files_in(folder), _OPTIM_FILE, f"{folder}: ZeRO optimizer")
    first = _field(load(optim_grid[0][0]), "optimizer_state_dict", optim_grid[0][0])
    stage = int(first.get("zero_stage", 1))
    if stage == 3:
        model_grid = _grid(
            folder.glob("*_model_states.pt"), _ZERO3_MODEL_FILE, f"{folder}: ZeRO-3 model"
        )
        if len(model_grid) != len(optim_grid) or len(model_grid[0]) != len(optim_grid[0]):
            raise CorruptCheckpointError(
                f"{folder}: {len(model_grid)}x{len(model_grid[0])} model-state files for "
                f"{len(optim_grid)}x{len(optim_grid[0])} optimizer files (mp x dp)"
            )
        info_file = model_grid[0][0]
        info = load(info_file)
        _check_dp_degree(info, optim_grid, folder)
        ranks = [
            _zero3_rank(m, o, load, budget) for m, o in zip(model_grid, optim_grid, strict=True)
        ]
        pp_degree = 1
    else:
        numbered = {
            int(m.group(1)): p for p in folder.iterdir() if (m := _MODEL_FILE.match(p.name))
        }
        if sorted(numbered) != list(range(len(optim_grid))):
            raise CorruptCheckpointError(
                f"{folder}: model-state files for model-parallel ranks {sorted(numbered)}, "
                f"optimizer files for {len(optim_grid)} (mp_rank_XX_model_states.pt)"
            )
        model_files = [numbered[mp] for mp in range(len(optim_grid))]
        info_file = model_files[0]
        info = load(info_file)
        _check_dp_degree(info, optim_grid, folder)
        pp_degree = int((info.get("checkpoint_parallel_dimensions") or {}).get("pp_degree", 1))
        _check_pp_degree(folder, len(model_files), pp_degree)
        layers = _pipeline_modules(folder, model_files, len(model_files) // pp_degree, load)
        ranks = [
            _zero12_rank(m, o, load, layers[mp] if layers else None, budget)
            for mp, (m, o) in enumerate(zip(model_files, optim_grid, strict=True))
        ]
    _check_pp_degree(folder, len(ranks), pp_degree)
    tp_degree = len(ranks) // pp_degree
    if isinstance(spec, Spec):
        rules = spec
    elif spec is not None:
        rules = Spec.load(os.fspath(spec), variables=variables)
    elif tp_degree > 1:
        rules = universal_spec(
            info.get("universal_checkpoint_info"),
            [ranks[p * tp_degree : (p + 1) * tp_degree] for p in range(pp_degree)],
        )
    else:
        rules = Spec.load("plain")
    # model-parallel rank i is pipeline stage i // tp, tensor-parallel rank i % tp
    stages = [ranks[p * tp_degree : (p + 1) * tp_degree] for p in range(pp_degree)]
    model = rules.merge([[r.model() for r in stage_ranks] for stage_ranks in stages])
    slots = {
        slot: rules.merge([[r.slot(slot) for r in stage_ranks] for stage_ranks in stages])
        for slot in SLOTS
    }
    names = _output_names(rules, stages)
    steps: dict[str, set[float]] = {}
    for stage_ranks, mapping in zip(stages, names, strict=True):
        for r in stage_ranks:
            for local, param in r.params.items():
                if local in mapping and param.step is not None:
                    steps.setdefault(mapping[local], set()).add(param.step)
    optimizer_state: dict[str, dict[str, LazyTensor]] = {}
    for out_key in model:
        entry = {slot: slots[slot][out_key] for slot in SLOTS if out_key in slots[slot]}
        step = steps.get(out_key, set())
        if len(step) > 1:
            raise ConversionError(
                f"{out_key!r}: its copies disagree on Adam's step: {sorted(step)}"
            )
        if step:
            entry["step"] = optimizer_step(step.pop())
        if entry:
            optimizer_state[out_key] = entry
    groups = _param_groups(stages, names)
    version = info.get("ds_version")
    version = version if isinstance(version, str) else ""  # str() of a crafted value may not end
    budget.charge(version, f"{info_file}: ds_version")
    return write_converted(
        dst,
        model,
        optimizer_state=optimizer_state,
        param_groups=groups,
        step=_int_or_none(info.get("global_steps")),
        source={
            "format": "deepspeed",
            "path": os.fspath(folder),
            "zero_stage": stage,
            "ds_version": version,
            "dp_degree": len(optim_grid[0]),
            "tp_degree": tp_degree,
            "pp_degree": pp_degree,
            "spec": rules.name,
        },
        storage_options=storage_options,
        progress=progress,
    )


# DeepSpeed's universal-checkpoint metadata (UNIVERSAL_CHECKPOINT_INFO): regexes, `re.match`ed
# against parameter names, saying how the TP copies of a parameter merge.
_REPLICATED = "tp_replicated_parameter_patterns"
_AVERAGED = "parameter_to_average_patterns"
_ROW_PARALLEL = "parameter_with_row_parallelism_patterns"
_VOCABULARY = "vocabulary_parameter_patterns"
_TWO_SUB_PARAMS = "parameter_with_2_sub_params_cat_dim_0"
_SUB_PARAMS = "parameter_with_sub_params"
_PIPELINE_REPLICATED = "pipeline_replicated_parameter_patterns"


def universal_spec(info: Any, stages: Sequence[Sequence[_RankState]]) -> Spec:
    """The spec that a tensor-parallel checkpoint's own ``universal_checkpoint_info`` implies:
    one rule per tensor, merging it as DeepSpeed's ``ds_to_universal`` does. Trained parameters
    in no category are column-parallel (concatenated on dim 0); other module tensors (buffers,
    frozen parameters) are replicated. Categories it cannot express (sub-parameter shapes,
    pipeline replication) are refused: pass a spec instead."""
    if not isinstance(info, Mapping):
        raise ConversionError(
            "a tensor-parallel DeepSpeed checkpoint without universal_checkpoint_info: pass a "
            "spec (docs/CONVERT.md) saying how its tensors merge"
        )

    def matches(category: str, name: str) -> bool:
        return any(re.match(p, name) for p in info.get(category) or ())

    rules: list[Rule] = []
    pieces = len(stages[0])
    # each stage's names, once (a name on several stages keeps its first stage's rule)
    owners = {n: ranks for ranks in reversed(stages) for r in ranks for n in r.order}
    for name, ranks in owners.items():
        where = f"universal_checkpoint_info of {name!r}"
        exact = re.compile(f"^{re.escape(name)}$")
        if matches(_SUB_PARAMS, name) or matches(_PIPELINE_REPLICATED, name):
            raise ConversionError(
                f"{name!r}: its universal_checkpoint_info uses {_SUB_PARAMS} or "
                f"{_PIPELINE_REPLICATED}, which unickpt does not derive a merge from: pass a spec"
            )
        trained = name in ranks[0].params
        if matches(_REPLICATED, name) or not trained:
            rule = Rule(exact, "replicated", where=where)
        elif matches(_AVERAGED, name):
            rule = Rule(exact, "average", where=where)
        elif matches(_TWO_SUB_PARAMS, name):
            rows = ranks[0].params[name].shape[0] * pieces // 2
            rule = Rule(exact, "fused", parts=(rows, rows), groups=pieces, where=where)
        elif matches(_VOCABULARY, name):
            true_size = info.get("original_vocab_size")
            if not isinstance(true_size, int):
                raise ConversionError(
                    f"{name!r}: a vocabulary parameter, but no original_vocab_size"
                )
            rule = Rule(exact, "vocab_pad", true_size=true_size, where=where)
        else:
            rule = Rule(exact, "shard", dim=1 if matches(_ROW_PARALLEL, name) else 0, where=where)
        rules.append(rule)
    return Spec(tuple(rules), name="the checkpoint's universal_checkpoint_info")


def _check_pp_degree(folder: Path, mp_ranks: int, pp_degree: int) -> None:
    if pp_degree < 1 or mp_ranks % pp_degree:
        raise CorruptCheckpointError(
            f"{folder}: {mp_ranks} model-parallel rank(s) do not split into {pp_degree} stages"
        )


def _pipeline_modules(
    folder: Path, model_files: Sequence[Path], tp_degree: int, load: _Loader
) -> list[_Module] | None:
    """Per model-parallel rank, the module a pipeline-parallel checkpoint stored as layer files
    (``layer_XX[-model_YY]-model_states.pt``: layer XX's state_dict on TP rank YY), under the
    names DeepSpeed's PipelineModule and ``ds_to_universal`` use: ``<XX>.<key>``. ``None`` if
    there are no layer files.

    Stages hold consecutive layers; a layer belongs to the last stage whose first trained
    parameter's layer is at or before it (layers before stage 0's are stage 0's)."""
    files: dict[tuple[int, int], Path] = {}
    for path in folder.glob("layer_*-model_states.pt"):
        if match := _LAYER_FILE.match(path.name):
            files[(int(match.group(1)), int(match.group(2) or 0))] = path
    if not files:
        return None
    stages = len(model_files) // tp_degree
    starts: list[int | None] = []
    for p in range(stages):
        model_file = model_files[p * tp_degree]
        names = [n for group in _field(load(model_file), "param_shapes", model_file) for n in group]
        unnumbered = [n for n in names if not n.split(".", 1)[0].isdigit()]
        if unnumbered:
            raise ConversionError(
                f"{model_file}: parameters outside the pipeline's numbered layers "
                f"({unnumbered[0]!r}, ...; tied modules?) are not supported"
            )
        starts.append(min((int(n.split(".", 1)[0]) for n in names), default=None))
    modules: list[dict[str, tuple[Path, torch.Tensor]]] = [{} for _ in model_files]
    for layer in sorted({layer for layer, _ in files}):
        stage = max((p for p, s in enumerate(starts) if s is not None and s <= layer), default=0)
        for tp in range(tp_degree):
            layer_file = files.get((layer, tp))
            if layer_file is None:
                raise CorruptCheckpointError(
                    f"{folder}: layer {layer} has no file for TP rank {tp}"
                )
            for key, tensor in load(layer_file).items():
                modules[stage * tp_degree + tp][f"{layer}.{key}"] = (layer_file, tensor)
    return list(modules)


def _check_dp_degree(info: Mapping[str, Any], grid: Sequence[Sequence[Path]], folder: Path) -> None:
    """A lost DP rank's file would otherwise surface as a parameter with missing pieces."""
    expected = info.get("dp_world_size")
    if isinstance(expected, int) and expected != len(grid[0]):
        found = ", ".join(p.name for p in grid[0])
        raise CorruptCheckpointError(
            f"{folder}: the checkpoint was written by {expected} data-parallel ranks, but there "
            f"are optimizer files of {len(grid[0])} ({found})"
        )


def _output_names(rules: Spec, stages: Sequence[Sequence[_RankState]]) -> list[dict[str, str]]:
    """Per pipeline stage: each trained parameter's local name -> its output key (the name the
    spec gives it; dropped parameters are left out)."""
    stage_keys = [list(dict.fromkeys(n for r in ranks for n in r.params)) for ranks in stages]
    out: list[dict[str, str]] = []
    for mapping in rules.renumber(stage_keys):
        names = {}
        for local, global_key in mapping.items():
            rule = rules.rule_for(global_key)
            if rule is None:  # strict specs have already refused it in merge()
                names[local] = global_key
            elif rule.action != "drop":
                names[local] = rule.output_key(global_key)
        out.append(names)
    return out


def _param_groups(
    stages: Sequence[Sequence[_RankState]], names: Sequence[Mapping[str, str]]
) -> list[dict[str, Any]]:
    """The optimizer's groups: the source's hyper-parameters, ``params`` as output keys (each
    once, in stage then source order)."""
    first = stages[0][0]
    groups: list[dict[str, Any]] = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": []} for g in first.groups
    ]
    seen: set[str] = set()
    for ranks, mapping in zip(stages, names, strict=True):
        for local, param in ranks[0].params.items():
            out = mapping.get(local)
            if out is not None and out not in seen:
                seen.add(out)
                groups[param.group]["params"].append(out)
    return groups


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


__all__ = ["DEEPSPEED_GLOBALS", "checkpoint_folder", "import_deepspeed", "universal_spec"]
