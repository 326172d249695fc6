"""Flattening a user's state into named global tensors and JSON objects, for save and for load.

One walk serves both directions. Keys join nested dict keys with ``.``. Modules contribute their
``state_dict()``; optimizers are keyed by parameter FQN (found in the modules of the same state),
so optimizer state reshards with its parameter; other objects with ``state_dict()`` /
``load_state_dict()`` are walked through their state dict.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import itertools
import json
import operator
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import torch
from torch.distributed.tensor import DTensor

from unickpt.errors import CheckpointError, InvalidStateError, StateMismatchError
from unickpt.layout.sharded import LocalShard, ShardedTensor, is_tensor_leaf, local_shard

SEP = "."
T = TypeVar("T")
Setter = Callable[[Any], None]


def _is_stateful(value: object) -> bool:
    return callable(getattr(value, "state_dict", None)) and callable(
        getattr(value, "load_state_dict", None)
    )


def _unwrapped(module: Any) -> Any:
    """The module inside DDP / DataParallel / ``torch.compile`` wrappers (anything else as it
    is): its keys are the checkpoint's, so that a model saved wrapped loads unwrapped
    (evaluation on one process) and the other way round."""
    while True:
        if isinstance(module, torch.nn.parallel.DistributedDataParallel | torch.nn.DataParallel):
            module = module.module
            continue
        compiled = sys.modules.get("torch._dynamo.eval_frame")  # imported once anything compiled
        if compiled is not None and isinstance(module, compiled.OptimizedModule):
            module = module._orig_mod
            continue
        return module


def _is_wrapper(value: object) -> bool:
    """A Stateful object other than a module or an optimizer."""
    return _is_stateful(value) and not isinstance(value, torch.nn.Module | torch.optim.Optimizer)


def _is_json(value: object) -> bool:
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        return False
    return True


def check_state(state: Any) -> None:
    """Raise InvalidStateError unless ``state`` is a dict (the root of every saved state)."""
    if not isinstance(state, dict):
        raise InvalidStateError(f"state must be a dict, not {type(state).__name__}")


def plain_step(step: Any) -> int:
    """A training step as an int (numpy integers and integer 0-d tensors too; not a bool)."""
    try:
        if isinstance(step, bool):
            raise TypeError
        return operator.index(step)
    except TypeError:
        raise InvalidStateError(f"step {step!r} is not an integer") from None


def plain_metadata(value: Any, where: str) -> Any:
    """``value`` (metadata such as metrics) in plain JSON types: 0-d tensors and numpy scalars
    (a loss, an accuracy) become Python numbers, tuples become lists. Raises
    InvalidStateError naming the first entry that has no JSON form."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidStateError(f"{where} has the key {key!r}; keys must be str")
            out[key] = plain_metadata(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, list | tuple):
        return [plain_metadata(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if value is None or isinstance(value, str | int | float):
        return value
    if getattr(value, "shape", None) == () and callable(getattr(value, "item", None)):
        return plain_metadata(value.item(), where)
    raise InvalidStateError(
        f"{where} is a {type(value).__name__}, which has no JSON form; use numbers (0-d "
        "tensors and numpy scalars are taken as theirs), strings, lists and dicts"
    )


def plain_user_metadata(value: Any) -> dict[str, Any]:
    """A save's ``user_metadata`` (None: none) as a JSON object, by :func:`plain_metadata`."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidStateError(
            f"user_metadata must be a dict of JSON values, not a {type(value).__name__}"
        )
    return dict(plain_metadata(dict(value), "user_metadata"))


def _non_str_keys(value: object) -> list[object]:
    """The dict keys in a JSON value that JSON would silently turn into strings."""
    if isinstance(value, dict):
        return [k for k in value if not isinstance(k, str)] + [
            k for v in value.values() for k in _non_str_keys(v)
        ]
    if isinstance(value, list | tuple):
        return [k for v in value for k in _non_str_keys(v)]
    return []


def _not_json(value: object) -> str:
    """Why ``value`` cannot be saved as JSON, for an error message."""
    fix = "pass allow_pickle=True to save (and load) it with pickle"
    if _is_json(value):
        key = _non_str_keys(value)[0]
        return (
            f"holds a dict with key {key!r}, which JSON would turn into a string; "
            f"use str keys, or {fix}"
        )
    return f"of type {type(value).__name__} is neither a tensor nor JSON-serialisable; {fix}"


def _contains_tensors(value: object) -> bool:
    if is_tensor_leaf(value) or _is_stateful(value):
        return True
    if isinstance(value, dict):
        return any(_contains_tensors(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_contains_tensors(v) for v in value)
    return False


def _item_setter(container: Any, name: Any) -> Setter:
    return lambda value: container.__setitem__(name, value)


def _children(
    value: dict[Any, Any] | list[Any] | tuple[Any, ...], prefix: str
) -> Iterator[tuple[str, Any, Any]]:
    """(flat key, child, its name in ``value``) for each child."""
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for name, child in items:
        if not isinstance(name, str | int) or isinstance(name, bool) or name == "":
            raise InvalidStateError(
                f"state key {name!r} under {prefix or '(root)'!r} must be a non-empty str"
            )
        yield (f"{prefix}{SEP}{name}" if prefix else str(name)), child, name


def find_instances(state: object, kind: type[T]) -> Iterator[T]:
    """Every ``kind`` object in the nested dicts/lists/tuples of ``state`` (not inside them),
    and among the direct attributes of the other Stateful objects there: wrappers such as
    DCP's ``AppState``, whose state dicts hide the model and optimizer they hold."""
    if isinstance(state, kind):
        yield state
    elif isinstance(state, dict):
        for value in state.values():
            yield from find_instances(value, kind)
    elif isinstance(state, list | tuple):
        for value in state:
            yield from find_instances(value, kind)
    elif _is_wrapper(state):
        yield from _attributes_of_kind(state, kind, seen=set())


def _attributes_of_kind(wrapper: object, kind: type[T], seen: set[int]) -> Iterator[T]:
    """Direct attributes only, so that a wrapper holding a dataset is not walked through it."""
    seen.add(id(wrapper))
    for value in getattr(wrapper, "__dict__", {}).values():
        if isinstance(value, kind):
            yield value
        elif _is_wrapper(value) and id(value) not in seen:
            yield from _attributes_of_kind(value, kind, seen)


def _param_names(state: object) -> dict[int, str]:
    """id(parameter) -> FQN within its module, for every nn.Module in the state."""
    names: dict[int, str] = {}
    for module in find_instances(state, torch.nn.Module):
        for fqn, param in _unwrapped(module).named_parameters(remove_duplicate=False):
            names.setdefault(id(param), fqn)
    return names


def _optimizer_param_names(
    opt: torch.optim.Optimizer, names: dict[int, str], key: str
) -> list[str]:
    """The name of each of the optimizer's parameters (in order): its FQN in its module."""
    params = [p for group in opt.param_groups for p in group["params"]]
    if len({id(p) for p in params}) != len(params):
        raise InvalidStateError(f"optimizer {key!r} holds a parameter twice")
    out = [names.get(id(p), f"param{i}") for i, p in enumerate(params)]
    if clashes := sorted(n for n, count in collections.Counter(out).items() if count > 1):
        raise InvalidStateError(
            f"optimizer {key!r}: parameters of different modules share the names "
            f"{clashes[:5]} (its state is keyed by parameter name): put those modules under one "
            "nn.Module (an nn.ModuleDict) in the state, so that their names differ"
        )
    return out


def _json_groups(groups: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    return [
        {
            **{k: _plain_hyperparameter(v) for k, v in g.items() if k != "params"},
            "params": [names[i] for i in g["params"]],
        }
        for g in groups
    ]


def _plain_hyperparameter(value: Any) -> Any:
    """A 0-d tensor (``lr=torch.tensor(0.01)``, as compiled optimizers use) as its number."""
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        return value.item()
    if isinstance(value, tuple | list):
        return type(value)(_plain_hyperparameter(v) for v in value)
    return value


def _in_live_form(live: Any, saved: Any) -> Any:
    """``saved`` (JSON) in the live value's form: tuples stay tuples (JSON stores lists;
    ``random.setstate`` wants its tuples back), 0-d tensors stay tensors (hyperparameters)."""
    if isinstance(live, torch.Tensor) and live.dim() == 0 and isinstance(saved, int | float):
        return torch.tensor(saved, dtype=live.dtype, device=live.device)
    if isinstance(live, tuple) and isinstance(saved, list):
        if len(live) != len(saved):
            return tuple(saved)
        return tuple(_in_live_form(w, v) for w, v in zip(live, saved, strict=True))
    if isinstance(live, list) and isinstance(saved, list) and len(live) == len(saved):
        return [_in_live_form(w, v) for w, v in zip(live, saved, strict=True)]
    if isinstance(live, dict) and isinstance(saved, dict):
        return {k: _in_live_form(live.get(k), v) for k, v in saved.items()}
    return saved


# ------------------------------------------------------------------------------------------- save


@dataclass
class SaveView:
    """A rank's state, flattened: its shards, JSON objects and (opt-in) opaque objects.

    ``buffers`` names the shards that are buffers of the modules in the state.
    """

    shards: dict[str, LocalShard] = field(default_factory=dict)
    objects: dict[str, Any] = field(default_factory=dict)
    opaque: dict[str, Any] = field(default_factory=dict)
    buffers: set[str] = field(default_factory=set)

    def _claim(self, key: str) -> None:
        if key in self.shards or key in self.objects or key in self.opaque:
            raise InvalidStateError(f"two state entries flatten to the same key {key!r}")
        try:
            key.encode()
        except UnicodeEncodeError:  # JSON escapes it, and the safetensors library refuses that
            raise InvalidStateError(
                f"state key {key!r} holds a lone surrogate, which is no Unicode text: "
                "safetensors readers cannot read a file naming it"
            ) from None


MemoryView = tuple[int, int, torch.dtype, tuple[int, ...], tuple[int, ...]]


def memory_view(tensor: torch.Tensor) -> MemoryView:
    """Which bytes a (local) tensor views: tensors equal here alias each other exactly. The
    storage tells empty tensors apart: their data pointers are all 0."""
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    storage = local.untyped_storage()._cdata
    return storage, local.data_ptr(), local.dtype, tuple(local.shape), local.stride()


def _buffer_views(state: object) -> set[MemoryView]:
    """The memory of every buffer of the nn.Modules in the state."""
    return {
        memory_view(buffer)
        for module in find_instances(state, torch.nn.Module)
        for buffer in module.buffers()
        if buffer.numel()
    }


def collect_for_save(
    state: dict[str, Any], *, allow_pickle: bool, snapshot_buffers: bool = False
) -> SaveView:
    """Flatten ``state`` as it stands on this rank.

    The buffers of the modules in ``state`` are found by the memory they view, so renamed
    state-dict keys still match, and parameters sharing a storage with them, as after an mmap
    load, do not; ``view.buffers`` names them. ``snapshot_buffers`` clones them, for saves that
    copy the rest later: forward passes update buffers such as BatchNorm's running statistics in
    place, before any optimizer step.
    """
    check_state(state)
    view = SaveView()
    with _not_too_deep(view):
        names = _param_names(state)
        buffers = _buffer_views(state)

    def leaf(key: str, value: Any) -> None:
        view._claim(key)
        if is_tensor_leaf(value):
            shard = local_shard(value, key=key)
            if shard.local.is_conj() or shard.local.is_neg():  # lazy flags: their memory is
                local = shard.local.resolve_conj().resolve_neg()  # not their values
                shard = replace(shard, local=local)
            elif shard.local.numel() and memory_view(shard.local) in buffers:
                view.buffers.add(key)
                if snapshot_buffers:
                    shard = replace(shard, local=shard.local.clone())
            view.shards[key] = shard
        elif _is_json(value) and not _non_str_keys(value):
            view.objects[key] = copy.deepcopy(value)  # as of now, whatever the caller does next
        elif allow_pickle:
            view.opaque[key] = value
        else:
            raise InvalidStateError(f"state entry {key!r} {_not_json(value)}")

    def walk(value: Any, key: str) -> None:
        if isinstance(value, torch.optim.Optimizer):
            sd = value.state_dict()
            pnames = _optimizer_param_names(value, names, key)
            for index, entries in sd["state"].items():
                for name, item in entries.items():
                    leaf(f"{key}{SEP}state{SEP}{pnames[index]}{SEP}{name}", item)
            leaf(f"{key}{SEP}param_groups", _json_groups(sd["param_groups"], pnames))
        elif _is_stateful(value):
            walk(_unwrapped(value).state_dict(), key)
        elif isinstance(value, dict) or (
            isinstance(value, list | tuple) and _contains_tensors(value)
        ):
            for child_key, child, _ in _children(value, key):
                walk(child, child_key)
        else:
            leaf(key, value)

    with _not_too_deep(view):
        for child_key, child, _ in _children(state, ""):
            walk(child, child_key)
    return view


# ------------------------------------------------------------------------------------------- load


@dataclass
class LoadView:
    """What a load must fill on this rank, and what to run once the data is in place."""

    shards: dict[str, LocalShard] = field(default_factory=dict)
    objects: dict[str, Setter] = field(default_factory=dict)
    # Checks of a JSON object the checkpoint holds, run before any data is read: each raises
    # StateMismatchError if the state cannot take that object.
    checks: dict[str, Callable[[Any], object]] = field(default_factory=dict)
    finalizers: list[Callable[[], None]] = field(default_factory=list)

    def _claim(self, key: str) -> None:
        if key in self.shards or key in self.objects:
            raise InvalidStateError(f"two state entries flatten to the same key {key!r}")

    def add_tensor(self, key: str, value: torch.Tensor | ShardedTensor) -> None:
        self._claim(key)
        shard = local_shard(value, key=key)
        if shard.local.is_conj() or shard.local.is_neg():
            raise InvalidStateError(
                f"tensor {key!r} is a conjugate or negative view (.conj(), .imag of one): "
                "loading cannot write through it; load into the tensor it views"
            )
        local = shard.local
        if any(st == 0 and n > 1 for st, n in zip(local.stride(), local.shape, strict=True)):
            raise InvalidStateError(
                f"tensor {key!r} is an expanded view (elements share memory): loading cannot "
                "fill it; load into a tensor of its own (e.g. .clone())"
            )
        self.shards[key] = shard

    def add_object(self, key: str, setter: Setter) -> None:
        self._claim(key)
        self.objects[key] = setter


def _template(param: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor to receive optimizer state of ``shape`` laid out like its parameter."""
    if tuple(param.shape) == shape:
        return torch.empty_like(param, dtype=dtype)
    local = param.to_local() if isinstance(param, DTensor) else param
    return torch.empty(shape, dtype=dtype, device=local.device)


def _load_optimizer(
    opt: torch.optim.Optimizer,
    key: str,
    view: LoadView,
    names: dict[int, str],
    ckpt_tensors: dict[str, tuple[tuple[int, ...], torch.dtype]],
    ckpt_objects: set[str],
) -> None:
    params = [p for group in opt.param_groups for p in group["params"]]
    pnames = _optimizer_param_names(opt, names, key)
    index_of = {n: i for i, n in enumerate(pnames)}
    live = opt.state_dict()["state"]
    state_prefix = f"{key}{SEP}state{SEP}"
    new_state: dict[int, dict[str, Any]] = {}
    saved_groups: list[list[dict[str, Any]]] = []

    def slot(index: int, name: str) -> Setter:
        return lambda v: new_state.setdefault(index, {}).__setitem__(name, v)

    wanted: set[tuple[int, str]] = {(i, n) for i, entries in live.items() for n in entries}
    stateful: set[int] = set()  # the parameters with state in the checkpoint
    for ckpt_key in (*ckpt_tensors, *ckpt_objects):
        if ckpt_key.startswith(state_prefix):
            pname, _, name = ckpt_key[len(state_prefix) :].rpartition(SEP)
            if pname in index_of:
                wanted.add((index_of[pname], name))
                stateful.add(index_of[pname])
    if f"{key}{SEP}param_groups" in ckpt_objects:
        # The checkpoint holds this optimizer: a parameter without state there had none yet
        # (saved before its first step), so it loses what it has now, as with torch's own load.
        wanted = {(index, name) for index, name in wanted if index in stateful}
    for index, name in sorted(wanted):
        entry_key = f"{state_prefix}{pnames[index]}{SEP}{name}"
        current = live.get(index, {}).get(name)
        if entry_key in ckpt_tensors:
            shape, dtype = ckpt_tensors[entry_key]
            target = (
                current
                if isinstance(current, torch.Tensor) and tuple(current.shape) == shape
                else _template(params[index], shape, dtype)
            )
            view.add_tensor(entry_key, target)
            slot(index, name)(target)
        elif isinstance(current, torch.Tensor) and entry_key not in ckpt_objects:
            view.add_tensor(entry_key, current)  # reported missing by the strict check
            slot(index, name)(current)
        else:
            view.add_object(entry_key, slot(index, name))

    def restored_groups(saved: Any) -> list[dict[str, Any]]:
        """The optimizer's param groups with the saved hyperparameters; StateMismatchError
        if the saved groups hold other parameters."""
        groups = [dict(g) for g in opt.state_dict()["param_groups"]]
        if not isinstance(saved, list) or len(saved) != len(groups):
            raise StateMismatchError(
                f"{key}: the checkpoint has {len(saved) if isinstance(saved, list) else '?'} "
                f"param groups, the optimizer has {len(groups)}"
            )
        for live_group, saved_group in zip(groups, saved, strict=True):
            expected = [pnames[i] for i in live_group["params"]]
            # The same parameters, in any order: state is keyed by name, not position.
            saved_params = saved_group.get("params") if isinstance(saved_group, dict) else None
            if not isinstance(saved_params, list) or sorted(saved_params) != sorted(expected):
                raise StateMismatchError(
                    f"{key}: param group parameters differ: checkpoint {saved_params} vs "
                    f"optimizer {expected}"
                )
            for name, value in saved_group.items():
                if name != "params":
                    live_group[name] = _in_live_form(live_group.get(name), value)
        return groups

    groups_key = f"{key}{SEP}param_groups"
    view.add_object(groups_key, saved_groups.append)
    view.checks[groups_key] = restored_groups  # before any tensor is overwritten

    def finalize() -> None:
        groups = (
            restored_groups(saved_groups[0])
            if saved_groups
            else [dict(g) for g in opt.state_dict()["param_groups"]]
        )
        opt.load_state_dict({"state": new_state, "param_groups": groups})

    view.finalizers.append(finalize)


def collect_for_load(
    state: dict[str, Any],
    ckpt_tensors: dict[str, tuple[tuple[int, ...], torch.dtype]],
    ckpt_objects: set[str],
) -> LoadView:
    """Flatten the targets of a load; ``ckpt_*`` describe the checkpoint (for optimizer state)."""
    check_state(state)
    view = LoadView()
    with _not_too_deep(view):
        names = _param_names(state)

    def walk(value: Any, key: str, setter: Setter) -> None:
        if isinstance(value, torch.optim.Optimizer):
            _load_optimizer(value, key, view, names, ckpt_tensors, ckpt_objects)
        elif _is_stateful(value):
            value = _unwrapped(value)
            holder = [value.state_dict()]  # any value, a dict or not, can be replaced
            walk(holder[0], key, _item_setter(holder, 0))
            if not _fills_in_place(value, holder[0]):
                view.finalizers.append(lambda: _restore(key, value, holder[0]))
        elif is_tensor_leaf(value):
            view.add_tensor(key, value)
        elif isinstance(value, tuple) and _contains_tensors(value):
            # Immutable: the loaded objects go into a list, rebuilt into a tuple afterwards.
            items, objects = list(value), len(view.objects)
            for child_key, child, index in _children(value, key):
                walk(child, child_key, _item_setter(items, index))
            if len(view.objects) > objects:
                view.finalizers.append(lambda: setter(_rebuilt(value, items)))
        elif isinstance(value, dict) or (isinstance(value, list) and _contains_tensors(value)):
            for child_key, child, name in _children(value, key):
                walk(child, child_key, _item_setter(value, name))
        else:
            view.add_object(key, lambda saved: setter(_in_live_form(value, saved)))

    with _not_too_deep(view):
        for child_key, child, name in _children(state, ""):
            walk(child, child_key, _item_setter(state, name))
    return view


@contextlib.contextmanager
def _not_too_deep(view: SaveView | LoadView) -> Iterator[None]:
    """A RecursionError of a walk (or of a check it makes) becomes an InvalidStateError."""
    try:
        yield
    except RecursionError:
        last = next(reversed([*view.shards, *view.objects]), None)
        raise InvalidStateError(
            "the state is nested deeper than Python's recursion limit lets unickpt walk it"
            + (f" (after {last!r})" if last else "")
            + "; flatten it, or save the deep value as one JSON string"
        ) from None


def _fills_in_place(stateful: Any, sd: Any) -> bool:
    """Whether filling ``sd`` (a module's state dict) in place restores the module without
    ``load_state_dict``: every value a tensor that IS one of its parameters or buffers, and no
    module in it that hooks or overrides loading (FSDP2's hooks, fused-weight splitters, tensor
    extra state, caches rebuilt after a load)."""
    if not isinstance(stateful, torch.nn.Module) or not isinstance(sd, dict):
        return False
    own = {memory_view(t) for t in itertools.chain(stateful.parameters(), stateful.buffers())}
    if not all(isinstance(v, torch.Tensor) and memory_view(v) in own for v in sd.values()):
        return False
    return not any(
        m._load_state_dict_pre_hooks
        or m._load_state_dict_post_hooks
        or type(m)._load_from_state_dict is not torch.nn.Module._load_from_state_dict
        or type(m).load_state_dict is not torch.nn.Module.load_state_dict
        for m in stateful.modules()
    )


def _restore(key: str, stateful: Any, sd: Any) -> None:
    try:
        if isinstance(stateful, torch.nn.Module):
            # ``sd`` is the module's own state_dict(): one that leaves keys out (a frozen
            # backbone, adapters only) must not be refused for them. Anything else torch's
            # strict load refuses (keys no module takes, extra state nothing sets) still is.
            def forgive_left_out(module: torch.nn.Module, keys: Any) -> None:
                keys.missing_keys[:] = [k for k in keys.missing_keys if k in sd]

            handle = stateful.register_load_state_dict_post_hook(forgive_left_out)  # type: ignore[no-untyped-call]
            try:
                stateful.load_state_dict(sd)
            finally:
                handle.remove()
        else:
            stateful.load_state_dict(sd)
    except CheckpointError:
        raise
    except Exception as exc:
        raise StateMismatchError(
            f"{key}: {type(stateful).__name__}.load_state_dict() refused the checkpoint's "
            f"state: {type(exc).__name__}: {exc}"
        ) from exc


def _rebuilt(like: tuple[Any, ...], items: list[Any]) -> tuple[Any, ...]:
    """A tuple of ``like``'s type (named tuples included) holding ``items``."""
    if hasattr(like, "_fields"):
        return type(like)(*items)
    return type(like)(items)
