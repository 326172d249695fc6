"""The conversion spec language: ordered regex rules saying how a tensor's parallel copies merge.

A source checkpoint written with tensor parallelism (TP) and pipeline parallelism (PP) holds, for
each pipeline stage and TP rank, a dict of tensors under stage-local names. A spec turns that
into one consolidated tensor per name (docs/CONVERT.md is the user-facing reference):

* ``layer_index`` renumbers stage-local layer indices to global ones (stage s's layers follow
  those of stages 0..s-1);
* the first rule whose ``match`` regex is found in the (renumbered) key decides how the TP
  copies merge: ``replicated``, ``average``, ``shard``, ``fused``, ``vocab_pad`` or ``drop``;
* ``pipeline_replicated`` keeps the first stage's copy of a tensor several stages hold (tied
  embeddings), once the later copies are found bit-identical; otherwise a key on two stages is
  an error;
* ``rename`` rewrites the key (``re.sub`` template of the rule's regex).

Merging is lazy: :meth:`Spec.merge` returns shapes at once and reads a merged tensor's pieces
only when it is materialised, so a converter holds one output tensor (plus its pieces) at a time.
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml

from unickpt.engine.stream import LazyTensor
from unickpt.errors import ConversionError

SPEC_VERSION = 1
ACTIONS = ("replicated", "average", "shard", "fused", "vocab_pad", "drop")
_RULE_FIELDS = {"match", "pipeline_replicated", "rename", *ACTIONS}
_TOP_FIELDS = {
    "unickpt_spec",
    "name",
    "description",
    "strict",
    "variables",
    "layer_index",
    "rules",
}

Stages = Sequence[Sequence[Mapping[str, LazyTensor]]]
"""``stages[pp][tp]``: the tensors of one pipeline stage's TP rank, by stage-local key."""


# ------------------------------------------------------------------------------ parsing & values

_OPS: dict[type, Callable[[int, int], int]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
}
_VARIABLE = re.compile(r"^\$\{(.+)\}$")


def _evaluate(expr: str, variables: Mapping[str, int], where: str) -> int:
    """Integer arithmetic (+ - * //) over literals and variables; nothing else is evaluated."""

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in variables:
                raise ConversionError(
                    f"{where}: variable {node.id!r} is not set "
                    f"(known: {sorted(variables) or 'none'}; set it with --set {node.id}=N)"
                )
            return variables[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.FloorDiv) and right == 0:
                raise ConversionError(f"{where}: {expr!r} divides by zero")
            return _OPS[type(node.op)](left, right)
        raise ConversionError(f"{where}: {expr!r} is not integer arithmetic over variables")

    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as exc:
        raise ConversionError(f"{where}: cannot parse expression {expr!r}") from exc
    return walk(tree.body)


def _int(value: Any, variables: Mapping[str, int], where: str) -> int:
    if isinstance(value, str) and (m := _VARIABLE.match(value.strip())):
        return _evaluate(m.group(1), variables, where)
    if type(value) is not int:
        raise ConversionError(f"{where}: expected an integer or '${{expression}}', got {value!r}")
    return value


def _regex(value: Any, where: str) -> re.Pattern[str]:
    if not isinstance(value, str):
        raise ConversionError(f"{where}: expected a regular expression string, got {value!r}")
    try:
        return re.compile(value)
    except re.error as exc:
        raise ConversionError(f"{where}: invalid regular expression {value!r}: {exc}") from exc


def _fields(doc: Any, allowed: set[str], where: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise ConversionError(f"{where}: expected a mapping, got {type(doc).__name__}")
    unknown = sorted(str(k) for k in doc if k not in allowed)
    if unknown:
        raise ConversionError(f"{where}: unknown field(s) {unknown} (allowed: {sorted(allowed)})")
    return doc


# ------------------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rule:
    """One parsed rule: how the TP copies of the keys it matches merge (see module docs)."""

    pattern: re.Pattern[str]
    action: str
    dim: int = 0
    parts: tuple[int, ...] = ()
    groups: int = 1
    true_size: int = 0
    pipeline_replicated: bool = False
    rename: str | None = None
    where: str = ""

    def output_key(self, key: str) -> str:
        if self.rename is None:
            return key
        try:
            return self.pattern.sub(self.rename, key, count=1)
        except (re.error, IndexError) as exc:
            raise ConversionError(f"{self.where}: rename of {key!r} failed: {exc}") from exc

    def merge(self, key: str, pieces: Sequence[LazyTensor]) -> LazyTensor:
        """The merged tensor of ``key`` from its TP ``pieces`` (in TP rank order), lazily."""
        if not pieces:
            raise ConversionError(f"{key}: no source tensor")
        shapes = [p.shape for p in pieces]
        dtypes = {p.dtype for p in pieces}
        if len(dtypes) != 1:
            raise ConversionError(f"{key}: TP copies differ in dtype: {sorted(map(str, dtypes))}")
        first = pieces[0]
        origin = f"{len(pieces)} TP piece(s) of {key}, first from {first.origin or '?'}"
        if self.action in ("replicated", "average"):
            if len(set(shapes)) != 1:
                raise ConversionError(f"{key}: TP copies differ in shape: {shapes} ({self.where})")
            load = _equal_copies if self.action == "replicated" else _average
            return LazyTensor(first.shape, first.dtype, lambda: load(key, pieces), origin)
        shape = _concat_shape(key, shapes, self.dim, self.where)
        if self.action == "shard":
            return LazyTensor(shape, first.dtype, lambda: _concat(pieces, self.dim), origin)
        if self.action == "vocab_pad":
            if self.true_size > shape[self.dim]:
                raise ConversionError(
                    f"{key}: true vocabulary size {self.true_size} exceeds the stored "
                    f"{shape[self.dim]} rows ({self.where})"
                )
            trimmed = list(shape)
            trimmed[self.dim] = self.true_size
            return LazyTensor(
                tuple(trimmed),
                first.dtype,
                lambda: _concat(pieces, self.dim, keep=self.true_size),
                origin,
            )
        assert self.action == "fused"
        self._check_fused(key, pieces)
        return LazyTensor(shape, first.dtype, lambda: self._unfuse(shape, pieces), origin)

    def _check_fused(self, key: str, pieces: Sequence[LazyTensor]) -> None:
        tp = len(pieces)
        if self.groups % tp:
            raise ConversionError(
                f"{key}: {self.groups} fused group(s) cannot be split over {tp} TP ranks "
                f"({self.where})"
            )
        for part in self.parts:
            if part % self.groups:
                raise ConversionError(
                    f"{key}: part size {part} is not divisible by {self.groups} group(s) "
                    f"({self.where})"
                )
        expected = sum(self.parts) // tp
        for rank, piece in enumerate(pieces):
            if piece.shape[self.dim] != expected:
                raise ConversionError(
                    f"{key}: TP rank {rank} holds {piece.shape[self.dim]} rows on dim "
                    f"{self.dim}, the parts {list(self.parts)} over {tp} ranks need {expected} "
                    f"({self.where})"
                )

    def _unfuse(self, shape: tuple[int, ...], pieces: Sequence[LazyTensor]) -> torch.Tensor:
        """Each TP piece is ``groups/tp`` groups, each the concatenation of every part's share;
        the output is the parts, each whole, one after another."""
        out = torch.empty(shape, dtype=pieces[0].dtype)
        per_rank = self.groups // len(pieces)
        starts = [sum(self.parts[:k]) for k in range(len(self.parts))]
        for rank, piece in enumerate(pieces):
            local = piece.load()
            position = 0
            for g in range(rank * per_rank, (rank + 1) * per_rank):
                for part, start in zip(self.parts, starts, strict=True):
                    rows = part // self.groups
                    out.narrow(self.dim, start + g * rows, rows).copy_(
                        local.narrow(self.dim, position, rows)
                    )
                    position += rows
            del local
        return out


def _concat_shape(key: str, shapes: list[tuple[int, ...]], dim: int, where: str) -> tuple[int, ...]:
    ndim = len(shapes[0])
    if not -ndim <= dim < ndim or any(len(s) != ndim for s in shapes):
        raise ConversionError(f"{key}: cannot concatenate shapes {shapes} on dim {dim} ({where})")
    dim %= ndim
    others = {s[:dim] + s[dim + 1 :] for s in shapes}
    if len(others) != 1:
        raise ConversionError(
            f"{key}: TP pieces {shapes} differ outside the concatenated dim {dim} ({where})"
        )
    out = list(shapes[0])
    out[dim] = sum(s[dim] for s in shapes)
    return tuple(out)


def _concat(pieces: Sequence[LazyTensor], dim: int, keep: int | None = None) -> torch.Tensor:
    """The pieces concatenated on ``dim``, of which only the first ``keep`` entries are built
    (vocabulary padding is never copied)."""
    shape = list(_concat_shape("", [p.shape for p in pieces], dim, ""))
    dim %= len(shape)
    shape[dim] = shape[dim] if keep is None else keep
    if len(pieces) == 1 and keep is None:
        return pieces[0].load()
    out = torch.empty(shape, dtype=pieces[0].dtype)
    position = 0
    for piece in pieces:
        size = min(piece.shape[dim], shape[dim] - position)
        if size <= 0:
            break
        out.narrow(dim, position, size).copy_(piece.load().narrow(dim, 0, size))
        position += size
    return out


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors hold identical bytes (NaNs included, unlike ``torch.equal``)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    flat_a, flat_b = a.contiguous().reshape(-1), b.contiguous().reshape(-1)
    return torch.equal(flat_a.view(torch.uint8), flat_b.view(torch.uint8))


def _equal_copies(key: str, pieces: Sequence[LazyTensor]) -> torch.Tensor:
    kept = pieces[0].load()
    for rank, piece in enumerate(pieces[1:], start=1):
        if not _same_bits(piece.load(), kept):
            raise ConversionError(
                f"{key}: declared replicated, but TP rank {rank}'s copy differs from rank 0's "
                f"({piece.origin or 'source'}); use 'average' or 'shard' if that is intended"
            )
    return kept


def _average(key: str, pieces: Sequence[LazyTensor]) -> torch.Tensor:
    total = pieces[0].load().to(torch.float64, copy=True)
    for piece in pieces[1:]:
        total += piece.load()
    return (total / len(pieces)).to(pieces[0].dtype)


def _parse_rule(doc: Any, index: int, variables: Mapping[str, int]) -> Rule:
    where = f"rule {index + 1}"
    doc = _fields(doc, _RULE_FIELDS, where)
    if "match" not in doc:
        raise ConversionError(f"{where}: missing 'match'")
    pattern = _regex(doc["match"], f"{where}.match")
    where = f"rule {index + 1} ({doc['match']})"
    actions = [a for a in ACTIONS if a in doc]
    if len(actions) != 1:
        raise ConversionError(
            f"{where}: needs exactly one action of {list(ACTIONS)}, got {actions}"
        )
    action = actions[0]
    args = doc[action]
    rename = doc.get("rename")
    if rename is not None and not isinstance(rename, str):
        raise ConversionError(f"{where}: rename must be a template string")
    flag = doc.get("pipeline_replicated", False)
    if not isinstance(flag, bool):
        raise ConversionError(f"{where}: pipeline_replicated must be true or false")
    common: dict[str, Any] = {
        "pattern": pattern,
        "action": action,
        "pipeline_replicated": flag,
        "rename": rename,
        "where": where,
    }
    if action in ("replicated", "average", "drop"):
        if args is not True:
            raise ConversionError(f"{where}: write '{action}: true'")
        return Rule(**common)
    at = f"{where}.{action}"
    if action == "shard":
        args = _fields(args, {"dim"}, at)
        return Rule(**common, dim=_int(args.get("dim", 0), variables, at))
    if action == "vocab_pad":
        args = _fields(args, {"true_size", "dim"}, at)
        if "true_size" not in args:
            raise ConversionError(f"{at}: missing 'true_size'")
        size = _int(args["true_size"], variables, f"{at}.true_size")
        return Rule(**common, dim=_int(args.get("dim", 0), variables, at), true_size=size)
    args = _fields(args, {"dim", "parts", "groups"}, at)
    parts = args.get("parts")
    if not isinstance(parts, list) or not parts:
        raise ConversionError(f"{at}: 'parts' must be a non-empty list of sizes")
    sizes = tuple(_int(p, variables, f"{at}.parts") for p in parts)
    groups = _int(args.get("groups", 1), variables, f"{at}.groups")
    if groups < 1 or any(s < 0 for s in sizes):
        raise ConversionError(f"{at}: sizes and groups must be positive")
    return Rule(**common, dim=_int(args.get("dim", 0), variables, at), parts=sizes, groups=groups)


# -------------------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class Spec:
    """A parsed conversion spec (see module docs and docs/CONVERT.md)."""

    rules: tuple[Rule, ...]
    strict: bool = True
    layer_index: re.Pattern[str] | None = None
    name: str = ""
    variables: Mapping[str, int] = field(default_factory=dict)

    @staticmethod
    def from_yaml(
        text: str, *, variables: Mapping[str, int] | None = None, origin: str = "<spec>"
    ) -> Spec:
        """Parse a spec; ``variables`` override the spec's own defaults."""
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConversionError(f"spec {origin} is not valid YAML: {exc}") from exc
        doc = _fields(doc, _TOP_FIELDS, f"spec {origin}")
        if doc.get("unickpt_spec") != SPEC_VERSION:
            raise ConversionError(
                f"spec {origin}: 'unickpt_spec: {SPEC_VERSION}' is required "
                f"(got {doc.get('unickpt_spec')!r})"
            )
        defaults = doc.get("variables") or {}
        if not isinstance(defaults, dict):
            raise ConversionError(f"spec {origin}: 'variables' must be a mapping")
        values = {str(k): _int(v, {}, f"spec {origin} variable {k}") for k, v in defaults.items()}
        values.update(variables or {})
        rules = doc.get("rules")
        if not isinstance(rules, list):
            raise ConversionError(f"spec {origin}: 'rules' must be a list")
        strict = doc.get("strict", True)
        if not isinstance(strict, bool):
            raise ConversionError(f"spec {origin}: 'strict' must be true or false")
        layer_index = doc.get("layer_index")
        index_pattern = None if layer_index is None else _regex(layer_index, "layer_index")
        if index_pattern is not None and index_pattern.groups != 1:
            raise ConversionError(
                f"spec {origin}: layer_index needs exactly one capture group (the layer number)"
            )
        return Spec(
            tuple(_parse_rule(r, i, values) for i, r in enumerate(rules)),
            strict,
            index_pattern,
            str(doc.get("name", origin)),
            values,
        )

    @staticmethod
    def load(name_or_path: str | Path, *, variables: Mapping[str, int] | None = None) -> Spec:
        """A spec file, or a spec shipped with unickpt by name (see :func:`shipped_specs`)."""
        path = Path(name_or_path)
        if path.suffix in (".yaml", ".yml") or path.exists():
            try:
                text = path.read_text()
            except OSError as exc:
                raise ConversionError(f"cannot read spec {path}: {exc}") from exc
            return Spec.from_yaml(text, variables=variables, origin=str(path))
        shipped = resources.files("unickpt.convert") / "specs" / f"{name_or_path}.yaml"
        if not shipped.is_file():
            raise ConversionError(
                f"no spec file {str(name_or_path)!r} and no shipped spec of that name "
                f"(shipped: {shipped_specs()})"
            )
        return Spec.from_yaml(shipped.read_text(), variables=variables, origin=str(name_or_path))

    def rule_for(self, key: str) -> Rule | None:
        """The first rule matching ``key`` (a renumbered, global key)."""
        return next((r for r in self.rules if r.pattern.search(key)), None)

    def renumber(self, stage_keys: Sequence[Sequence[str]]) -> list[dict[str, str]]:
        """For each pipeline stage, its stage-local keys mapped to global keys."""
        if self.layer_index is None:
            return [{k: k for k in keys} for keys in stage_keys]
        pattern = self.layer_index
        out: list[dict[str, str]] = []
        offset = 0
        for keys in stage_keys:
            found = [int(m.group(1)) for k in keys if (m := pattern.search(k))]
            mapping = {}
            for key in keys:
                m = pattern.search(key)
                mapping[key] = (
                    key
                    if m is None
                    else f"{key[: m.start(1)]}{int(m.group(1)) + offset}{key[m.end(1) :]}"
                )
            out.append(mapping)
            offset += max(found) + 1 if found else 0
        return out

    def merge(self, stages: Stages) -> dict[str, LazyTensor]:
        """One lazy, consolidated tensor per output key, in source order."""
        if not stages or any(not ranks for ranks in stages):
            raise ConversionError("the source has no pipeline stage or a stage with no TP rank")
        stage_keys = [list(dict.fromkeys(k for rank in ranks for k in rank)) for ranks in stages]
        renumbered = self.renumber(stage_keys)
        merged: dict[str, LazyTensor] = {}
        producer: dict[str, tuple[int, str]] = {}
        copies: dict[str, list[tuple[str, LazyTensor]]] = {}  # later stages' tied copies
        unmatched: list[str] = []
        for stage, (ranks, mapping) in enumerate(zip(stages, renumbered, strict=True)):
            for local_key, global_key in mapping.items():
                rule = self.rule_for(global_key)
                if rule is None:
                    if self.strict:
                        unmatched.append(global_key)
                        continue
                    rule = _PASS_THROUGH
                if rule.action == "drop":
                    continue
                missing = [tp for tp, rank in enumerate(ranks) if local_key not in rank]
                if missing:
                    raise ConversionError(
                        f"{global_key!r} (stage {stage}) is missing on TP rank(s) {missing}"
                    )
                out_key = rule.output_key(global_key)
                candidate = rule.merge(global_key, [rank[local_key] for rank in ranks])
                if out_key in producer:
                    first_stage, first_key = producer[out_key]
                    if first_stage != stage and rule.pipeline_replicated:
                        if candidate.shape != merged[out_key].shape:
                            raise ConversionError(
                                f"{out_key!r}: stage {stage}'s copy ({global_key!r}) has shape "
                                f"{list(candidate.shape)}, stage {first_stage}'s "
                                f"{list(merged[out_key].shape)}: not copies of one tensor"
                            )
                        where = f"stage {stage}'s copy ({global_key!r})"
                        copies.setdefault(out_key, []).append((where, candidate))
                        continue
                    raise ConversionError(
                        f"output {out_key!r} comes from {first_key!r} (stage {first_stage}) and "
                        f"{global_key!r} (stage {stage}); mark its rule pipeline_replicated if "
                        "the stages hold copies of one tensor (tied embeddings)"
                        if first_stage != stage
                        else f"keys {first_key!r} and {global_key!r} both become {out_key!r}"
                    )
                producer[out_key] = (stage, global_key)
                merged[out_key] = candidate
        if unmatched:
            raise ConversionError(
                f"spec {self.name!r} has no rule for {len(unmatched)} key(s) (strict mode): "
                + ", ".join(unmatched[:50])
                + (" ..." if len(unmatched) > 50 else "")
            )
        for out_key, later in copies.items():
            first_stage, first_key = producer[out_key]
            merged[out_key] = _checked_copies(
                out_key, merged[out_key], f"stage {first_stage}'s ({first_key!r})", later
            )
        return merged


def _checked_copies(
    key: str, kept: LazyTensor, kept_where: str, copies: list[tuple[str, LazyTensor]]
) -> LazyTensor:
    """``kept``, loaded only after each copy has been checked to hold the same bits."""

    def load() -> torch.Tensor:
        tensor = kept.load()
        for where, copy in copies:
            if not _same_bits(copy.load(), tensor):
                raise ConversionError(
                    f"{key}: {where} differs from {kept_where}: the pipeline stages' copies of "
                    "this tied tensor diverged, so neither can be taken as the tensor"
                )
        return tensor

    return LazyTensor(kept.shape, kept.dtype, load, kept.origin)


_PASS_THROUGH = Rule(re.compile(""), "replicated", where="non-strict pass-through")


def shipped_specs() -> list[str]:
    """Names of the specs that ship with unickpt."""
    folder = resources.files("unickpt.convert") / "specs"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


__all__ = ["ACTIONS", "SPEC_VERSION", "Rule", "Spec", "Stages", "shipped_specs"]
