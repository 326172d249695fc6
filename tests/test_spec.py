"""The conversion spec language (unickpt.convert.spec): parsing, every action, its errors, and
property tests that merging a tensor sharded the Megatron way gives it back exactly."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unickpt.convert.spec import Spec, shipped_specs
from unickpt.engine.stream import LazyTensor
from unickpt.errors import ConversionError


def spec(body: str, **variables: int) -> Spec:
    """A spec from YAML ``body`` (the version line is added)."""
    return Spec.from_yaml("unickpt_spec: 1\n" + textwrap.dedent(body), variables=variables)


def rule(action_yaml: str, match: str = ".*", **variables: int) -> Spec:
    return spec(f"rules:\n  - match: '{match}'\n    {action_yaml}\n", **variables)


def lazy(tensor: torch.Tensor, origin: str = "") -> LazyTensor:
    return LazyTensor.of(tensor, origin)


def tp_ranks(key: str, pieces: Sequence[torch.Tensor]) -> list[list[dict[str, LazyTensor]]]:
    """One pipeline stage whose TP ranks hold ``pieces`` of ``key``."""
    return [[{key: lazy(p, f"rank{r}")} for r, p in enumerate(pieces)]]


def merged(s: Spec, key: str, pieces: Sequence[torch.Tensor]) -> torch.Tensor:
    out = s.merge(tp_ranks(key, pieces))
    assert list(out) == [key]
    return out[key].materialize(key)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------- actions


def test_replicated_keeps_one_copy_and_checks_the_others() -> None:
    t = randn(3, 4)
    assert torch.equal(merged(rule("replicated: true"), "w", [t, t.clone(), t.clone()]), t)
    other = t.clone()
    other[1, 2] += 1
    out = rule("replicated: true").merge(tp_ranks("norm.w", [t, t, other]))
    with pytest.raises(
        ConversionError, match=r"norm\.w: declared replicated, but TP rank 2.*rank2"
    ):
        out["norm.w"].materialize("norm.w")


def test_replicated_shape_and_dtype_mismatch_name_the_key() -> None:
    with pytest.raises(ConversionError, match=r"ln\.w: TP copies differ in shape"):
        rule("replicated: true").merge(tp_ranks("ln.w", [randn(4), randn(5)]))
    with pytest.raises(ConversionError, match=r"ln\.w: TP copies differ in dtype"):
        rule("replicated: true").merge(tp_ranks("ln.w", [randn(4), randn(4).double()]))


def test_average_is_computed_in_float64_and_cast_back() -> None:
    pieces = [randn(5, seed=s).to(torch.bfloat16) for s in range(3)]
    expected = (sum(p.double() for p in pieces) / 3).to(torch.bfloat16)
    out = merged(rule("average: true"), "w", pieces)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected)


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_shard_concatenates_on_its_dim(dim: int) -> None:
    t = randn(6, 8)
    pieces = list(t.tensor_split([1, 4], dim=dim))  # uneven pieces are fine
    assert torch.equal(merged(rule(f"shard: {{dim: {dim}}}"), "w", pieces), t)


def test_shard_pieces_must_agree_outside_the_dim() -> None:
    with pytest.raises(ConversionError, match=r"proj\.w: TP pieces .* differ outside"):
        rule("shard: {dim: 1}").merge(tp_ranks("proj.w", [randn(4, 2), randn(5, 2)]))
    with pytest.raises(ConversionError, match=r"proj\.w: cannot concatenate .* on dim 2"):
        rule("shard: {dim: 2}").merge(tp_ranks("proj.w", [randn(4, 2), randn(4, 2)]))


def test_fused_qkv_per_query_group() -> None:
    """4 query heads in 2 groups, head size 1, TP 2: rank r holds group r as [q q k v]."""
    q, k, v = torch.arange(4.0), torch.arange(10.0, 12.0), torch.arange(20.0, 22.0)
    pieces = [torch.tensor([0.0, 1, 10, 20]), torch.tensor([2.0, 3, 11, 21])]
    s = rule("fused: {dim: 0, parts: [4, 2, 2], groups: 2}")
    assert torch.equal(merged(s, "qkv", pieces), torch.cat([q, k, v]))


def test_fused_swiglu_gate_up_per_rank() -> None:
    gate, up = randn(6, 3, seed=1), randn(6, 3, seed=2)
    pieces = [torch.cat([g, u]) for g, u in zip(gate.chunk(3), up.chunk(3), strict=True)]
    s = rule("fused: {dim: 0, parts: ['${ffn}', '${ffn}'], groups: '${tp}'}", ffn=6, tp=3)
    assert torch.equal(merged(s, "fc1", pieces), torch.cat([gate, up]))


def test_fused_errors_name_the_key() -> None:
    with pytest.raises(ConversionError, match=r"qkv: 3 fused group\(s\) cannot be split over 2"):
        rule("fused: {dim: 0, parts: [3, 3], groups: 3}").merge(
            tp_ranks("qkv", [randn(3), randn(3)])
        )
    with pytest.raises(ConversionError, match=r"qkv: part size 3 is not divisible by 2 group"):
        rule("fused: {dim: 0, parts: [3, 5], groups: 2}").merge(
            tp_ranks("qkv", [randn(4), randn(4)])
        )
    with pytest.raises(ConversionError, match=r"qkv: TP rank 1 holds 3 rows on dim 0.*need 4"):
        rule("fused: {dim: 0, parts: [4, 4], groups: 2}").merge(
            tp_ranks("qkv", [randn(4), randn(3)])
        )
    with pytest.raises(ConversionError, match="sizes and groups must be positive"):
        rule("fused: {dim: 0, parts: [4], groups: 0}")


def test_vocab_pad_strips_padding_rows() -> None:
    table = randn(10, 3)
    padded = torch.cat([table, torch.full((6, 3), 99.0)])
    s = rule("vocab_pad: {true_size: '${vocab}'}", vocab=10)
    assert torch.equal(merged(s, "emb", list(padded.chunk(4))), table)
    s = rule("vocab_pad: {true_size: 10, dim: 1}")
    assert torch.equal(merged(s, "head", list(padded.T.chunk(2, dim=1))), table.T)
    with pytest.raises(
        ConversionError, match=r"emb: true vocabulary size 17 exceeds the stored 16"
    ):
        rule("vocab_pad: {true_size: 17}").merge(tp_ranks("emb", padded.chunk(2)))


def test_drop() -> None:
    s = spec("""
        rules:
          - match: '_extra_state$'
            drop: true
          - match: '.*'
            replicated: true
    """)
    out = s.merge([[{"a._extra_state": lazy(torch.zeros(0)), "a.w": lazy(randn(2))}]])
    assert list(out) == ["a.w"]


def test_first_matching_rule_wins() -> None:
    s = spec("""
        rules:
          - match: 'bias$'
            replicated: true
          - match: '.*'
            shard: {dim: 0}
    """)
    out = s.merge([[{"l.bias": lazy(randn(2)), "l.w": lazy(randn(2))}] * 2])
    assert out["l.bias"].shape == (2,)
    assert out["l.w"].shape == (4,)


# ---------------------------------------------------------------------------- strict & keys


def test_strict_lists_every_unmatched_key() -> None:
    s = spec("""
        rules:
          - match: '^known$'
            replicated: true
    """)
    ranks = [[{"known": lazy(randn(1)), "odd.a": lazy(randn(1)), "odd.b": lazy(randn(1))}]]
    with pytest.raises(
        ConversionError, match=r"no rule for 2 key\(s\) \(strict mode\): odd\.a, odd\.b"
    ):
        s.merge(ranks)


def test_non_strict_passes_unmatched_keys_through_as_replicated() -> None:
    s = spec("""
        strict: false
        rules: []
    """)
    t = randn(3)
    out = s.merge([[{"x": lazy(t)}, {"x": lazy(t)}]])
    assert torch.equal(out["x"].materialize("x"), t)
    out = s.merge([[{"x": lazy(t)}, {"x": lazy(t + 1)}]])
    with pytest.raises(ConversionError, match="x: declared replicated"):
        out["x"].materialize("x")


def test_key_missing_on_some_tp_ranks() -> None:
    ranks = [[{"w": lazy(randn(2))}, {}, {"w": lazy(randn(2))}, {}]]
    with pytest.raises(
        ConversionError, match=r"'w' \(stage 0\) is missing on TP rank\(s\) \[1, 3\]"
    ):
        rule("replicated: true").merge(ranks)


def test_empty_sources_are_refused() -> None:
    with pytest.raises(ConversionError, match="no pipeline stage"):
        rule("replicated: true").merge([])
    with pytest.raises(ConversionError, match="no pipeline stage"):
        rule("replicated: true").merge([[{"w": lazy(randn(1))}], []])


# --------------------------------------------------------------- renumbering, rename, stages


def test_layer_renumbering_across_stages() -> None:
    s = spec("""
        layer_index: '^layers\\.(\\d+)\\.'
        rules:
          - match: '.*'
            replicated: true
    """)
    stage0 = {f"layers.{i}.w": lazy(randn(1, seed=i)) for i in range(3)} | {"emb": lazy(randn(1))}
    stage1 = {f"layers.{i}.w": lazy(randn(1, seed=10 + i)) for i in range(2)}
    stage2 = {"layers.0.w": lazy(randn(1, seed=20)), "final": lazy(randn(1))}
    out = s.merge([[stage0], [stage1], [stage2]])
    expected = ["layers.0.w", "layers.1.w", "layers.2.w", "emb"]
    expected += ["layers.3.w", "layers.4.w", "layers.5.w", "final"]
    assert list(out) == expected
    assert torch.equal(out["layers.4.w"].materialize(""), randn(1, seed=11))
    assert torch.equal(out["layers.5.w"].materialize(""), randn(1, seed=20))
    assert s.renumber([["layers.1.w"], ["layers.0.w", "x"]]) == [
        {"layers.1.w": "layers.1.w"},
        {"layers.0.w": "layers.2.w", "x": "x"},
    ]


def test_rename_templates() -> None:
    s = spec("""
        layer_index: '^decoder\\.layers\\.(\\d+)\\.'
        rules:
          - match: '^decoder\\.layers\\.(?P<n>\\d+)\\.attn\\.(weight|bias)$'
            replicated: true
            rename: 'blocks.\\g<n>.attention.\\2'
          - match: '^decoder\\.final\\.'
            replicated: true
            rename: 'head.'
    """)
    out = s.merge(
        [
            [{"decoder.layers.0.attn.weight": lazy(randn(1))}],
            [{"decoder.layers.0.attn.bias": lazy(randn(1)), "decoder.final.w": lazy(randn(1))}],
        ]
    )
    assert list(out) == ["blocks.0.attention.weight", "blocks.1.attention.bias", "head.w"]


def test_rename_to_a_missing_group_is_an_error_naming_the_key() -> None:
    s = rule("replicated: true\n    rename: 'x.\\3'", match="^(a)$")
    with pytest.raises(ConversionError, match="rename of 'a' failed"):
        s.merge([[{"a": lazy(randn(1))}]])


def test_two_keys_of_one_stage_becoming_one_output() -> None:
    s = rule("replicated: true\n    rename: 'same'", match="^(a|b)$")
    with pytest.raises(ConversionError, match="keys 'a' and 'b' both become 'same'"):
        s.merge([[{"a": lazy(randn(1)), "b": lazy(randn(1))}]])


TIED = """
    rules:
      - match: '^embedding$'
        vocab_pad: {true_size: 3}
        rename: 'embed'
      - match: '^output$'
        vocab_pad: {true_size: 3}
        %s
        rename: 'embed'
      - match: '.*'
        replicated: true
"""


def test_pipeline_replicated_keeps_the_first_stages_copy() -> None:
    s = spec(TIED % "pipeline_replicated: true")
    first = randn(4, 2, seed=1)
    first[3, 1] = float("nan")  # copies are compared bit for bit: NaN equals its own copy
    out = s.merge(
        [
            [{"embedding": lazy(first)}],
            [{"mid": lazy(randn(1))}],
            [{"output": lazy(first.clone())}],
        ]
    )
    assert list(out) == ["embed", "mid"]
    assert torch.equal(out["embed"].materialize("embed"), first[:3])


def test_diverged_pipeline_copies_are_refused() -> None:
    s = spec(TIED % "pipeline_replicated: true")
    first = randn(4, 2, seed=1)
    last = first.clone()
    last[2, 0] += 1e-6
    out = s.merge([[{"embedding": lazy(first)}], [{"output": lazy(last)}]])
    with pytest.raises(
        ConversionError,
        match=r"embed: stage 1's copy \('output'\) differs from stage 0's \('embedding'\)",
    ):
        out["embed"].materialize("embed")


def test_a_key_on_two_stages_needs_pipeline_replicated() -> None:
    s = spec(TIED % "")
    with pytest.raises(
        ConversionError,
        match=r"'embed' comes from 'embedding' \(stage 0\) and 'output' \(stage 1\)",
    ):
        s.merge([[{"embedding": lazy(randn(4, 2))}], [{"output": lazy(randn(4, 2))}]])


def test_merge_is_lazy() -> None:
    loads: list[str] = []

    def counted(name: str, tensor: torch.Tensor) -> LazyTensor:
        def load() -> torch.Tensor:
            loads.append(name)
            return tensor

        return LazyTensor(tuple(tensor.shape), tensor.dtype, load, name)

    s = rule("shard: {dim: 0}")
    out = s.merge([[{"w": counted("r0", randn(2))}, {"w": counted("r1", randn(3))}]])
    assert out["w"].shape == (5,) and loads == []
    out["w"].materialize("w")
    assert loads == ["r0", "r1"]


# ----------------------------------------------------------------------- parsing & variables


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("rules: []\nstrictt: true", r"unknown field\(s\) \['strictt'\]"),
        ("rules:\n  - match: 'x'\n    shrad: {dim: 0}", r"rule 1: unknown field\(s\) \['shrad'\]"),
        ("rules:\n  - match: 'x'\n    shard: {dimm: 0}", r"shard: unknown field\(s\) \['dimm'\]"),
        ("rules:\n  - match: 'x'\n    fused: {dim: 0, part: [1]}", r"\['part'\]"),
        ("rules:\n  - replicated: true", "rule 1: missing 'match'"),
        ("rules:\n  - match: 'x'", r"needs exactly one action .* got \[\]"),
        ("rules:\n  - match: 'x'\n    drop: true\n    average: true", r"got \['average', 'drop'\]"),
        ("rules:\n  - match: 'x'\n    replicated: false", "write 'replicated: true'"),
        ("rules:\n  - match: '('", "invalid regular expression"),
        ("rules:\n  - match: 'x'\n    fused: {parts: []}", "non-empty list"),
        ("rules:\n  - match: 'x'\n    vocab_pad: {dim: 0}", "missing 'true_size'"),
        ("rules:\n  - match: 'x'\n    drop: true\n    rename: 3", "rename must be a template"),
        ("rules:\n  - match: 'x'\n    drop: true\n    pipeline_replicated: 1", "true or false"),
        ("rules: {}", "'rules' must be a list"),
        ("rules: []\nstrict: 'yes'", "'strict' must be true or false"),
        ("rules: []\nlayer_index: 'layers'", "exactly one capture group"),
        ("rules: []\nvariables: [1]", "'variables' must be a mapping"),
        ("rules: []\nvariables: {a: 1.5}", r"expected an integer or '\$\{expression\}', got 1\.5"),
        ("rules: [", "not valid YAML"),
    ],
)
def test_spec_errors(body: str, message: str) -> None:
    with pytest.raises(ConversionError, match=message):
        spec(body)


def test_version_is_required() -> None:
    with pytest.raises(ConversionError, match="'unickpt_spec: 1' is required"):
        Spec.from_yaml("rules: []")
    with pytest.raises(ConversionError, match="expected a mapping"):
        Spec.from_yaml("- 1")


def test_expressions_over_variables() -> None:
    body = """
        variables: {heads: 4, kv: 3}
        rules:
          - match: '.*'
            vocab_pad: {true_size: '${(heads + 2) * kv // 2 - 1}'}
    """
    assert spec(body).rules[0].true_size == 8
    assert spec(body, kv=5).rules[0].true_size == 14  # given variables override the defaults
    assert spec(body, kv=5).variables == {"heads": 4, "kv": 5}


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("${vocab}", r"variable 'vocab' is not set \(known: none; set it with --set vocab=N\)"),
        ("${2 ** 3}", "not integer arithmetic"),
        ("${__import__('os').getpid()}", "not integer arithmetic"),
        ("${1 / 2}", "not integer arithmetic"),
        ("${1 +}", "cannot parse"),
        ("'1.0'", "expected an integer"),
        ("${4 // (2 - 2)}", r"'4 // \(2 - 2\)' divides by zero"),
    ],
)
def test_bad_expressions(expression: str, message: str) -> None:
    with pytest.raises(ConversionError, match=message):
        spec(f"rules:\n  - match: 'x'\n    vocab_pad: {{true_size: {expression!r}}}")


def test_shipped_specs_load_by_name_and_path(tmp_path: object) -> None:
    assert {"plain", "megatron_gpt"} <= set(shipped_specs())
    assert Spec.load("plain").name == "plain"
    variables = {"vocab_size": 10, "heads": 4, "query_groups": 2, "kv_channels": 3}
    loaded = Spec.load("megatron_gpt", variables={**variables, "ffn_hidden": 8, "glu": 1, "tp": 2})
    assert loaded.layer_index is not None and loaded.strict
    with pytest.raises(ConversionError, match=r"no shipped spec of that name \(shipped: \["):
        Spec.load("nonexistent_spec")
    with pytest.raises(ConversionError, match="cannot read spec"):
        Spec.load("/nonexistent/dir/spec.yaml")


# ------------------------------------------------------------------------------- properties


def fuse_like_megatron(
    full: torch.Tensor, parts: list[int], groups: int, tp: int, dim: int
) -> list[torch.Tensor]:
    """Each part cut into ``groups`` slices; group g = every part's g-th slice, in part order;
    TP rank r holds groups [r*G/tp, (r+1)*G/tp) one after another."""
    sliced = [
        p.chunk(groups, dim=dim) if p.shape[dim] else [p] * groups
        for p in full.split(parts, dim=dim)
    ]
    per_group = [torch.cat([s[g] for s in sliced], dim=dim) for g in range(groups)]
    per_rank = groups // tp
    return [torch.cat(per_group[r * per_rank : (r + 1) * per_rank], dim=dim) for r in range(tp)]


@settings(max_examples=60, deadline=None)
@given(
    tp=st.integers(1, 4),
    groups_per_rank=st.integers(1, 3),
    rows_per_group=st.lists(st.integers(0, 3), min_size=1, max_size=3),
    other=st.integers(1, 3),
    dim=st.sampled_from([0, 1]),
    seed=st.integers(0, 2**16),
)
def test_fused_merge_inverts_megatron_fusing(
    tp: int, groups_per_rank: int, rows_per_group: list[int], other: int, dim: int, seed: int
) -> None:
    groups = tp * groups_per_rank
    parts = [groups * r for r in rows_per_group]
    shape = [sum(parts), other] if dim == 0 else [other, sum(parts)]
    full = randn(*shape, seed=seed)
    pieces = fuse_like_megatron(full, parts, groups, tp, dim)
    s = rule(f"fused: {{dim: {dim}, parts: {parts}, groups: '${{g}}'}}", g=groups)
    assert torch.equal(merged(s, "qkv", pieces), full)


@settings(max_examples=60, deadline=None)
@given(
    tp=st.integers(1, 4),
    rows=st.integers(1, 9),
    other=st.integers(1, 3),
    dim=st.sampled_from([0, 1, -1]),
    seed=st.integers(0, 2**16),
)
def test_shard_merge_inverts_even_and_uneven_splits(
    tp: int, rows: int, other: int, dim: int, seed: int
) -> None:
    full = randn(rows, other, seed=seed) if dim == 0 else randn(other, rows, seed=seed)
    pieces = list(full.tensor_split(tp, dim=dim))
    assert torch.equal(merged(rule(f"shard: {{dim: {dim}}}"), "w", pieces), full)


@settings(max_examples=60, deadline=None)
@given(
    tp=st.integers(1, 4),
    multiple=st.integers(1, 4),
    vocab=st.integers(1, 30),
    hidden=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_vocab_pad_merge_strips_megatron_padding(
    tp: int, multiple: int, vocab: int, hidden: int, seed: int
) -> None:
    padded = -(-vocab // (multiple * tp)) * multiple * tp
    table = randn(vocab, hidden, seed=seed)
    junk = torch.full((padded - vocab, hidden), float(seed))
    pieces = list(torch.cat([table, junk]).chunk(tp))
    assert len(pieces) == tp
    s = rule("vocab_pad: {true_size: '${vocab_size}'}", vocab_size=vocab)
    assert torch.equal(merged(s, "embedding", pieces), table)
