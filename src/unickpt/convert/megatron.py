"""Import Megatron-LM checkpoints in its legacy ``torch`` format: one file per TP rank and stage.

Layout (Megatron-LM's ``checkpointing.py``)::

    <root>/latest_checkpointed_iteration.txt      "<N>" or "release"
    <root>/iter_<N:07d>/mp_rank_<tp:02d>[_<pp:03d>]/model_optim_rng.pt

Each file is a ``torch.save`` dict: ``args`` (the run's argparse Namespace), ``iteration``,
``model`` (the rank's stage-local state dict), ``optimizer`` (Megatron's non-distributed
optimizer: the torch optimizer's ``state_dict``, wrapped with ``fp32_from_fp16_params`` master
copies in bf16/fp16 runs), ``rng_state`` and scheduler state.

Conversion (docs/CONVERT.md): the ``model`` dicts are presented to a :class:`~unickpt.convert.Spec`
as ``stages[pp][tp]`` and merged; each optimizer slot (``exp_avg``, ``exp_avg_sq``...) is merged
with the same spec, so a moment lands where its parameter does. The output is the checkpoint
``unickpt.save(path, {"model": model, "optim": optimizer})`` writes for a plain model and a torch
Adam(W): where the source has fp32 master weights, *they* are the model tensors (they are what
Megatron resumes from; the bf16 weights are their rounding).

Optimizer parameter indices are mapped to names the way Megatron built its parameter groups:
each rank's parameters in ``model`` order, split into groups by its default rule (biases and 1-D
parameters in the ``wd_mult == 0`` group); the mapping is checked against the group sizes and the
state's shapes. Output param groups list parameters (as output names) in that order.

Every file and folder read (the tracker file, the iteration folder, each rank's folder and file)
must resolve inside ``src``.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from unickpt.convert.spec import Spec
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
from unickpt.errors import CheckpointNotFoundError, ConversionError, short_repr
from unickpt.format.manifest import Manifest

CHECKPOINT_FILE = "model_optim_rng.pt"
TRACKER_FILE = "latest_checkpointed_iteration.txt"
DEFAULT_SPEC = "megatron_gpt"

_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(_\d{3})?$")
_EXTRA_STATE = "_extra_state"


class _Inert:
    """Stand-in for foreign objects in the parts of a file the importer never reads.

    Unpickling calls it with the original's arguments and state; it keeps nothing and runs no
    foreign code.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass


# Globals a weights-only load of a Megatron file meets outside the tensors: numpy's RNG state in
# rng_state, old Transformer Engine extra state (BytesIO), and Megatron enums in args.
_FOREIGN_GLOBALS: tuple[tuple[type, str], ...] = tuple(
    (_Inert, name)
    for name in (
        "numpy.dtype",
        "numpy.ndarray",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "numpy.dtypes.UInt32DType",
        "_io.BytesIO",
        "megatron.core.transformer.enums.AttnBackend",
    )
)

# Spec variable <- args field, where it is a plain copy.
_ARG_VARIABLES = {
    "hidden": "hidden_size",
    "heads": "num_attention_heads",
    "ffn_hidden": "ffn_hidden_size",
    "num_layers": "num_layers",
    "padded_vocab_size": "padded_vocab_size",
}


@reports_malformed_source("Megatron")
def import_megatron(
    src: str | os.PathLike[str],
    dst: str,
    *,
    spec: Spec | str | os.PathLike[str] | None = DEFAULT_SPEC,
    variables: Mapping[str, int] | None = None,
    trust_pickle: bool = False,
    iteration: int | None = None,
    progress: Progress | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Manifest:
    """Convert a Megatron TP x PP checkpoint at ``src`` into a unickpt checkpoint at ``dst``.

    ``src`` is the save directory (the iteration comes from ``latest_checkpointed_iteration.txt``,
    or ``iteration``) or an ``iter_*`` directory holding the ``mp_rank_*`` directories. ``spec``
    is a spec file, a shipped spec's name (default ``megatron_gpt``; None means the default) or a
    parsed :class:`Spec`; a spec given by name or path gets its variables from the checkpoint's
    ``args`` (TP degree, vocabulary, heads, query groups, ...), overridden by ``variables``.
    ``trust_pickle`` lifts the weights-only restriction on reading the ``.pt`` files (only for
    files you trust). The source is read lazily, tensor by tensor; memory stays at the largest
    output tensor plus its TP pieces.
    """
    folder, rank_files = locate(src, iteration)
    files = [
        [_RankFile.read(path, trust_pickle=trust_pickle) for path in stage] for stage in rank_files
    ]
    tp, pp = len(files[0]), len(files)
    args = _check_args(files, tp, pp)
    the_spec = _resolve_spec(spec, args, tp, pp, variables)
    _check_tied_output(the_spec, args)
    releaser = _PageReleaser()
    budget = JsonBudget()  # for the hyper-parameters of every rank's param groups
    for stage in files:
        for rank in stage:
            rank.parse(releaser, budget)

    model_stages = [[rank.model_tensors() for rank in stage] for stage in files]
    model = the_spec.merge(model_stages)
    optimizer_state, param_groups = _merge_optimizer(the_spec, files, model_stages, model, releaser)
    first = files[0][0]
    source = {
        "format": "megatron",
        "path": os.fspath(folder),
        "iteration": first.iteration,
        "tensor_parallel": tp,
        "pipeline_parallel": pp,
        "spec": the_spec.name,
        "variables": dict(the_spec.variables),
    }
    try:
        return write_converted(
            dst,
            {key: releaser.output(lazy) for key, lazy in model.items()},
            optimizer_state=optimizer_state,
            param_groups=param_groups,
            step=first.iteration,
            source=source,
            storage_options=storage_options,
            progress=progress,
        )
    finally:
        releaser.release()


# ------------------------------------------------------------------------------- locating files


def locate(
    src: str | os.PathLike[str], iteration: int | None = None
) -> tuple[Path, list[list[Path]]]:
    """The iteration directory and its ``model_optim_rng.pt`` files as ``[pp][tp]``, each
    resolving inside ``src`` (UnsafeCheckpointError otherwise)."""
    root = Path(src)
    if not root.is_dir():
        raise CheckpointNotFoundError(f"no Megatron checkpoint directory at {root}")
    if iteration is not None:
        folder = root / f"iter_{iteration:07d}"
        if not folder.is_dir():
            raise CheckpointNotFoundError(f"iteration {iteration}: no directory {folder}")
    elif _rank_dirs(root):
        folder = root
    elif (root / TRACKER_FILE).is_file():
        text = read_tracker(root, TRACKER_FILE)
        if text == "release":
            folder = root / "release"
        elif text.isdigit():
            folder = root / f"iter_{int(text):07d}"
        else:
            raise ConversionError(
                f"{root / TRACKER_FILE}: expected an iteration or 'release', found "
                f"{short_repr(text)}"
            )
        if not folder.is_dir():
            raise CheckpointNotFoundError(f"{root / TRACKER_FILE} names {folder}, which is missing")
    else:
        raise CheckpointNotFoundError(
            f"{root} is not a Megatron checkpoint: no {TRACKER_FILE} and no mp_rank_* directories"
        )
    if folder != root:
        inside(root, folder)
    files = _rank_grid(folder)
    for stage in files:
        for path in stage:
            inside(root, path)
    return folder, files


def _rank_dirs(folder: Path) -> dict[str, re.Match[str]]:
    return {p.name: m for p in folder.iterdir() if p.is_dir() and (m := _RANK_DIR.match(p.name))}


def _rank_grid(folder: Path) -> list[list[Path]]:
    found = _rank_dirs(folder)
    if not found:
        hint = (
            " (it looks like a distributed torch_dist checkpoint: convert it with --from dcp)"
            if (folder / "metadata.json").is_file() or any(folder.glob("*.distcp"))
            else ""
        )
        raise CheckpointNotFoundError(f"no mp_rank_* directories in {folder}{hint}")
    if any(m.group(3) for m in found.values()):
        raise ConversionError(
            f"{folder}: expert-parallel rank directories (mp_rank_TT_PPP_EEE) are not supported"
        )
    with_pp = {m.group(2) is not None for m in found.values()}
    if len(with_pp) != 1:
        raise ConversionError(
            f"{folder}: mixes mp_rank_TT and mp_rank_TT_PPP directories: {sorted(found)}"
        )
    ranks = {(int(m.group(1)), int(m.group(2) or 0)) for m in found.values()}
    tp = max(t for t, _ in ranks) + 1
    pp = max(p for _, p in ranks) + 1
    names = [
        [f"mp_rank_{t:02d}" + (f"_{p:03d}" if with_pp == {True} else "") for t in range(tp)]
        for p in range(pp)
    ]
    missing = [name for stage in names for name in stage if name not in found]
    if missing:
        raise CheckpointNotFoundError(
            f"{folder}: TP={tp} x PP={pp} needs rank directories that are missing: {missing}"
        )
    files = [[folder / name / CHECKPOINT_FILE for name in stage] for stage in names]
    absent = [os.fspath(f) for stage in files for f in stage if not f.is_file()]
    if absent:
        raise CheckpointNotFoundError(f"missing {CHECKPOINT_FILE}: {absent}")
    return files


# ----------------------------------------------------------------------------- one rank's file


@dataclass
class _Group:
    """One optimizer param group of one rank: hyper-parameters (JSON-able) and its parameters'
    keys."""

    options: dict[str, Any]
    keys: list[str]


@dataclass
class _RankFile:
    """One ``model_optim_rng.pt``: its model tensors, fp32 masters and optimizer state."""

    path: Path
    content: dict[str, Any]
    model: dict[str, LazyTensor] = field(default_factory=dict)
    params: list[str] = field(default_factory=list)
    masters: dict[str, LazyTensor] = field(default_factory=dict)
    state: dict[str, dict[str, LazyTensor]] = field(default_factory=dict)
    steps: set[float] = field(default_factory=set)
    groups: list[_Group] = field(default_factory=list)

    @staticmethod
    def read(path: Path, *, trust_pickle: bool) -> _RankFile:
        content = load_torch_file(path, trust_pickle=trust_pickle, extra_globals=_FOREIGN_GLOBALS)
        if not isinstance(content, dict):
            raise ConversionError(f"{path}: expected a dict, found {type(content).__name__}")
        if "model" not in content:
            chunks = sorted(k for k in content if re.fullmatch(r"model\d+", str(k)))
            raise ConversionError(
                f"{path}: interleaved (virtual) pipeline checkpoints ({chunks}) are not supported"
                if chunks
                else f"{path}: no 'model' entry (found {short_repr(list(content))})"
            )
        return _RankFile(path, content)

    @property
    def iteration(self) -> int | None:
        value = self.content.get("iteration")
        return value if isinstance(value, int) else None

    @property
    def args(self) -> Any:
        return self.content.get("args")

    def where(self, key: str) -> str:
        return f"{self.path.parent.name}/{self.path.name}:{key!r}"

    def parse(self, releaser: _PageReleaser, budget: JsonBudget) -> None:
        """Wrap the model tensors and, when present, the optimizer state (its hyper-parameters
        charged to ``budget``)."""
        model = self.content["model"]
        if not isinstance(model, Mapping):
            raise ConversionError(f"{self.path}: 'model' is a {type(model).__name__}, not a dict")
        for key, value in model.items():
            if isinstance(value, torch.Tensor):
                self.model[key] = releaser.source(value, self.where(key))
                if not key.endswith(_EXTRA_STATE):
                    self.params.append(key)
            elif not str(key).endswith(_EXTRA_STATE):
                raise ConversionError(
                    f"{self.where(key)}: expected a tensor, found {type(value).__name__}"
                )
        self._parse_optimizer(releaser, budget)

    def model_tensors(self) -> dict[str, LazyTensor]:
        """The model dict, fp32 master copies standing in for the low-precision weights."""
        return {key: self.masters.get(key, lazy) for key, lazy in self.model.items()}

    def _parse_optimizer(self, releaser: _PageReleaser, budget: JsonBudget) -> None:
        wrapped = self.content.get("optimizer")
        if wrapped is None:
            return
        if isinstance(wrapped, list):
            raise ConversionError(
                f"{self.path}: a chained optimizer ({len(wrapped)} optimizers, e.g. MoE experts) "
                "is not supported"
            )
        inner = wrapped.get("optimizer", wrapped) if isinstance(wrapped, Mapping) else None
        if not isinstance(inner, Mapping) or "param_groups" not in inner:
            raise ConversionError(f"{self.path}: unrecognised 'optimizer' entry")
        if "state" not in inner:  # the distributed optimizer keeps its state in distrib_optim.pt
            return
        groups = inner["param_groups"]
        assigned = self._assign_groups(groups)
        index_key: dict[int, str] = {}
        for g, (group, keys) in enumerate(zip(groups, assigned, strict=True)):
            index_key.update(zip(group["params"], keys, strict=True))
            options = _options({k: v for k, v in group.items() if k != "params"})
            # before anything compares or writes them: a crafted value can be exponential
            budget.charge(options, f"{self.path}: optimizer param group {g}")
            self.groups.append(_Group(options, keys))
            if isinstance(group.get("step"), int | float | torch.Tensor):
                self.steps.add(float(group["step"]))
        self._parse_masters(wrapped, groups, assigned, releaser)
        for index, entries in inner["state"].items():
            if index not in index_key:
                raise ConversionError(
                    f"{self.path}: optimizer state for unknown index {short_repr(index)}"
                )
            key = index_key[index]
            slots: dict[str, LazyTensor] = {}
            for slot, value in entries.items():
                if slot == "step":
                    self.steps.add(float(value))
                    continue
                where = self.where(f"optimizer[{key}].{slot}")
                if not isinstance(value, torch.Tensor) or value.shape != self.model[key].shape:
                    found = tuple(value.shape) if isinstance(value, torch.Tensor) else value
                    raise ConversionError(
                        f"{where}: expected a tensor of the parameter's shape "
                        f"{self.model[key].shape}, found {short_repr(found)}"
                    )
                slots[slot] = releaser.source(value, where)
            self.state[key] = slots

    def _assign_groups(self, groups: Sequence[Mapping[str, Any]]) -> list[list[str]]:
        """Each group's parameter keys, by Megatron's default grouping (see module docs)."""
        sizes = [len(g["params"]) for g in groups]
        if sum(sizes) != len(self.params):
            raise ConversionError(
                f"{self.path}: the optimizer has {sum(sizes)} parameters, the model "
                f"{len(self.params)} (frozen parameters or buffers in 'model' are not supported)"
            )
        if len(groups) == 1:
            return [list(self.params)]
        flags = [_no_decay_group(g) for g in groups]
        if len(set(flags)) != len(flags):
            raise ConversionError(
                f"{self.path}: {len(groups)} optimizer param groups that Megatron's default "
                "grouping (weight decay / none) does not explain; cannot tell which parameter "
                "each index is"
            )
        members: list[list[str]] = [[] for _ in groups]
        for key in self.params:
            no_decay = key.endswith(".bias") or len(self.model[key].shape) == 1
            if no_decay not in flags:
                raise ConversionError(
                    f"{self.path}: no optimizer param group for {key} "
                    f"({'without' if no_decay else 'with'} weight decay)"
                )
            members[flags.index(no_decay)].append(key)
        if [len(m) for m in members] != sizes:
            raise ConversionError(
                f"{self.path}: optimizer param group sizes {sizes} do not match Megatron's "
                f"default grouping of the model's parameters {[len(m) for m in members]}"
            )
        return members

    def _parse_masters(
        self,
        wrapped: Mapping[str, Any],
        groups: Sequence[Mapping[str, Any]],
        assigned: list[list[str]],
        releaser: _PageReleaser,
    ) -> None:
        """fp32 master copies of the fp16/bf16 parameters, group by group, in order."""
        masters = wrapped.get("fp32_from_fp16_params")
        if masters is None:
            return
        if len(masters) != len(groups):
            raise ConversionError(
                f"{self.path}: fp32_from_fp16_params has {len(masters)} groups, the optimizer "
                f"{len(groups)}"
            )
        for keys, copies in zip(assigned, masters, strict=True):
            low = [k for k in keys if self.model[k].dtype in (torch.float16, torch.bfloat16)]
            if len(low) != len(copies):
                raise ConversionError(
                    f"{self.path}: {len(copies)} fp32 master copies for {len(low)} "
                    "fp16/bf16 parameters in a param group"
                )
            for key, copy in zip(low, copies, strict=True):
                where = self.where(f"fp32_from_fp16_params[{key}]")
                if not isinstance(copy, torch.Tensor) or copy.shape != self.model[key].shape:
                    raise ConversionError(f"{where}: not a tensor of the parameter's shape")
                self.masters[key] = releaser.source(copy, where)


def _no_decay_group(group: Mapping[str, Any]) -> bool:
    if "wd_mult" in group:
        return float(group["wd_mult"]) == 0.0
    return float(group.get("weight_decay", 0.0)) == 0.0


# ------------------------------------------------------------------------------ args & spec


def _check_args(files: list[list[_RankFile]], tp: int, pp: int) -> Any:
    """Stage 0 / TP rank 0's args, checked against the rank directories."""
    args = files[0][0].args
    if args is None:
        return None
    for name, found in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp)):
        recorded = getattr(args, name, None)
        if isinstance(recorded, int) and recorded != found:
            raise ConversionError(
                f"{files[0][0].path}: args.{name} is {recorded}, but the directory holds "
                f"{found} (TP={tp} x PP={pp} rank directories)"
            )
    virtual = getattr(args, "virtual_pipeline_model_parallel_size", None)
    if isinstance(virtual, int) and virtual > 1:
        raise ConversionError(
            f"{files[0][0].path}: interleaved pipeline (virtual stages: {virtual}) is not supported"
        )
    if getattr(args, "use_distributed_optimizer", False):
        warnings.warn(
            "the checkpoint used Megatron's distributed optimizer, whose state lives in "
            "distrib_optim.pt files: only the model is converted",
            stacklevel=3,
        )
    return args


def _variables_from_args(args: Any, tp: int, pp: int) -> tuple[dict[str, int], list[str]]:
    """Spec variables derived from a Megatron ``args`` Namespace, and the fields it lacks."""
    values = {"tp": tp, "pp": pp}
    missing: list[str] = []

    def field_int(name: str) -> int | None:
        value = getattr(args, name, None)
        if type(value) is int:
            return value
        missing.append(name)
        return None

    for variable, name in _ARG_VARIABLES.items():
        if (value := field_int(name)) is not None:
            values[variable] = value
    heads, hidden = values.get("heads"), values.get("hidden")
    if getattr(args, "group_query_attention", False):
        if (groups := field_int("num_query_groups")) is not None:
            values["query_groups"] = groups
    elif heads is not None:
        values["query_groups"] = heads
    if type(getattr(args, "kv_channels", None)) is int:
        values["kv_channels"] = args.kv_channels
    elif heads and hidden is not None:
        values["kv_channels"] = hidden // heads
    if hasattr(args, "swiglu"):
        values["glu"] = int(bool(args.swiglu))
    else:
        missing.append("swiglu")
    if type(getattr(args, "vocab_size", None)) is int:
        values["vocab_size"] = args.vocab_size
    elif "padded_vocab_size" in values:
        values["vocab_size"] = values["padded_vocab_size"]
        missing.append("vocab_size")
    return values, missing


def _resolve_spec(
    spec: Spec | str | os.PathLike[str] | None,
    args: Any,
    tp: int,
    pp: int,
    variables: Mapping[str, int] | None,
) -> Spec:
    if isinstance(spec, Spec):
        if variables:
            raise ConversionError(
                "variables apply when the spec is given by name or path; this Spec is parsed"
            )
        return spec
    derived, missing = _variables_from_args(args, tp, pp)
    given = dict(variables or {})
    if "vocab_size" in missing and "vocab_size" not in given and "vocab_size" in derived:
        warnings.warn(
            f"the checkpoint's args do not record the true vocabulary size: keeping all "
            f"{derived['vocab_size']} (padded) embedding rows; set vocab_size to strip the padding",
            stacklevel=3,
        )
    try:
        where = DEFAULT_SPEC if spec is None else spec if isinstance(spec, str) else Path(spec)
        return Spec.load(where, variables={**derived, **given})
    except ConversionError as exc:
        if args is None:
            raise ConversionError(f"{exc} (the checkpoint has no 'args' to take it from)") from exc
        if missing:
            raise ConversionError(f"{exc} (the checkpoint's args lack: {missing})") from exc
        raise


def _check_tied_output(spec: Spec, args: Any) -> None:
    """An untied output layer must not be folded into the embedding by a tied-embedding spec."""
    if not getattr(args, "untie_embeddings_and_output_weights", False):
        return
    names = {
        key: _output_key(spec, key)
        for key in ("embedding.word_embeddings.weight", "output_layer.weight")
    }
    if None not in names.values() and len(set(names.values())) == 1:
        raise ConversionError(
            f"the checkpoint's output layer is not tied to its embedding "
            f"(args.untie_embeddings_and_output_weights), but spec {spec.name!r} maps both to "
            f"{names['output_layer.weight']!r}: use a spec with its own output_layer rule"
        )


def _output_key(spec: Spec, global_key: str) -> str | None:
    """Where ``spec`` puts a (renumbered) key: None if dropped."""
    rule = spec.rule_for(global_key)
    if rule is None:
        return None if spec.strict else global_key
    return None if rule.action == "drop" else rule.output_key(global_key)


# ---------------------------------------------------------------------------------- optimizer


def _merge_optimizer(
    spec: Spec,
    files: list[list[_RankFile]],
    model_stages: list[list[dict[str, LazyTensor]]],
    model: Mapping[str, LazyTensor],
    releaser: _PageReleaser,
) -> tuple[dict[str, dict[str, LazyTensor]] | None, list[dict[str, Any]] | None]:
    """Merged optimizer state per output parameter, and the output param groups."""
    ranks = [rank for stage in files for rank in stage]
    with_groups = [rank for rank in ranks if rank.groups]
    if not with_groups:
        return None, None
    if len(with_groups) != len(ranks):
        lacking = [os.fspath(r.path) for r in ranks if not r.groups]
        raise ConversionError(f"optimizer state is missing from {lacking}")
    slots = sorted({slot for rank in ranks for entry in rank.state.values() for slot in entry})
    for rank in ranks:
        for key in rank.params:
            have = sorted(rank.state.get(key, {}))
            if have != slots:
                raise ConversionError(
                    f"{rank.where(key)}: optimizer state has slots {have}, other parameters {slots}"
                )
    steps = {s for rank in ranks for s in rank.steps}
    if len(steps) > 1:
        raise ConversionError(f"the optimizer step differs between parameters: {sorted(steps)}")
    step = next(iter(steps), None)

    state: dict[str, dict[str, LazyTensor]] = {}
    for slot in slots:
        stages = [
            [{k: v[slot] for k, v in rank.state.items()} for rank in stage] for stage in files
        ]
        for key, lazy in spec.merge(stages).items():
            state.setdefault(key, {})[slot] = releaser.output(lazy)
    if step is not None:
        for key in state:
            state[key] = {"step": optimizer_step(step), **state[key]}
    return state, _param_groups(spec, files, model_stages, model, step is not None)


def _param_groups(
    spec: Spec,
    files: list[list[_RankFile]],
    model_stages: list[list[dict[str, LazyTensor]]],
    model: Mapping[str, LazyTensor],
    drop_step: bool,
) -> list[dict[str, Any]]:
    """The output param groups: rank 0's hyper-parameters, every rank's parameters renamed."""
    reference = files[0][0]
    renumbered = spec.renumber(
        [list(dict.fromkeys(k for rank in stage for k in rank)) for stage in model_stages]
    )
    members: list[set[str]] = [set() for _ in reference.groups]
    for stage, mapping in zip(files, renumbered, strict=True):
        for rank in stage:
            if len(rank.groups) != len(reference.groups):
                raise ConversionError(
                    f"{rank.path}: {len(rank.groups)} optimizer param groups, "
                    f"{reference.path} has {len(reference.groups)}"
                )
            for g, group in enumerate(rank.groups):
                if group.options != reference.groups[g].options:
                    raise ConversionError(
                        f"{rank.path}: param group {g}'s hyper-parameters differ from "
                        f"{reference.path}'s"
                    )
                members[g].update(
                    out for key in group.keys if (out := _output_key(spec, mapping[key]))
                )
    twice = sorted({n for i, a in enumerate(members) for b in members[i + 1 :] for n in a & b})
    if twice:
        raise ConversionError(f"parameters in more than one optimizer param group: {twice}")
    groups = []
    for group, names in zip(reference.groups, members, strict=True):
        options = dict(group.options)
        if drop_step:  # the step moves into each parameter's state, as torch's Adam keeps it
            options.pop("step", None)
        groups.append({**options, "params": [key for key in model if key in names]})
    return groups


def _options(options: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-able hyper-parameters (tuples as lists, 0-d tensors as numbers)."""
    out: dict[str, Any] = {}
    for name, value in options.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, tuple):
            value = list(value)
        # (option names are strings: str() of a crafted key may take any memory)
        if isinstance(name, str) and (
            value is None or isinstance(value, bool | int | float | str | list)
        ):
            out[name] = value
    return out


# ------------------------------------------------------------------------------- page release


class _PageReleaser:
    """Hands a source tensor's (memory-mapped) pages back once the output that read it is done.

    Source tensors are recorded as outputs load them; loading the next output releases the
    previous one's sources, so resident memory stays at the outputs in flight. An output still
    being written when its sources are released is simply read again from the page cache.
    """

    def __init__(self) -> None:
        self._touched: list[torch.Tensor] = []

    def source(self, tensor: torch.Tensor, origin: str) -> LazyTensor:
        def load() -> torch.Tensor:
            self._touched.append(tensor)
            return tensor

        return LazyTensor(tuple(tensor.shape), tensor.dtype, load, origin)

    def output(self, lazy: LazyTensor) -> LazyTensor:
        def load() -> torch.Tensor:
            self.release()
            return lazy.load()

        return LazyTensor(lazy.shape, lazy.dtype, load, lazy.origin)

    def release(self) -> None:
        for tensor in self._touched:
            release_pages(tensor)
        self._touched.clear()


__all__ = ["CHECKPOINT_FILE", "DEFAULT_SPEC", "TRACKER_FILE", "import_megatron", "locate"]
