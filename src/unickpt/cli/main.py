"""``unickpt inspect | verify | gc | convert | export-hf``."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from enum import Enum

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from unickpt.convert import (
    export_hf,
    import_dcp,
    import_deepspeed,
    import_hf,
    import_megatron,
)
from unickpt.convert.megatron import DEFAULT_SPEC as DEFAULT_MEGATRON_SPEC
from unickpt.errors import CheckpointError, IncompleteCheckpointError, printable
from unickpt.tools import collect_garbage, inspect, verify

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Universal checkpoints: inspect, verify, clean up, convert from other frameworks, "
    "export to Hugging Face.",
)
# soft_wrap: long paths and messages stay on one line in logs instead of being cut at 80 columns.
# No markup or emoji codes by default: paths, tensor names and error messages come from
# checkpoints, and a "[/]" in one made rich raise instead of printing it. Styled lines opt in
# with markup=True and escape() what they quote.
out = Console(soft_wrap=True, markup=False, emoji=False)
err = Console(stderr=True, soft_wrap=True, markup=False, emoji=False)

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def _size(n: int) -> str:
    """``n`` bytes in the largest binary unit it fills, to one decimal: "8.0 KiB".

    Integer arithmetic throughout: a manifest can claim more bytes than a float holds.
    """
    if n < 1024:
        return f"{n} B"
    exponent = (n.bit_length() - 1) // 10
    if exponent >= len(_UNITS):  # a zebibyte or more: only the order of magnitude means anything
        return f">= 2^{n.bit_length() - 1} B"
    unit = 1024**exponent
    tenths, rest = divmod(n * 10, unit)
    if 2 * rest > unit or (2 * rest == unit and tenths % 2):  # half to even, as format() rounds
        tenths += 1
    return f"{tenths // 10}.{tenths % 10} {_UNITS[exponent]}"


def _fail(exc: CheckpointError) -> typer.Exit:
    label = "INCOMPLETE" if isinstance(exc, IncompleteCheckpointError) else "ERROR"
    message = printable(str(exc), keep="\n")  # a verify report lists one problem a line
    err.print(f"[bold red]{label}[/]: {escape(message)}", markup=True, highlight=False)
    return typer.Exit(1)


@contextlib.contextmanager
def _progress(description: str) -> Iterator[Callable[[int, int], None]]:
    """A byte-progress bar on a terminal; nothing in logs and CI."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


@app.command("inspect")
def inspect_cmd(
    path: str,
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Show a checkpoint's tensors, shapes, dtypes, chunks and bytes; step and writer layout."""
    try:
        manifest = inspect(path)
    except CheckpointError as exc:
        raise _fail(exc) from exc
    if as_json:
        print(manifest.to_json())
        return
    writer = manifest.writer
    out.print(
        f"[bold]{escape(printable(path))}[/]  "
        + escape(
            printable(
                f"step={manifest.step}  format v{manifest.version}  "
                f"{_size(manifest.total_bytes)} in {len(manifest.files)} file(s)  "
                f"written by world_size={writer.get('world_size')} meshes={writer.get('meshes')}"
            )
        ),
        markup=True,
        highlight=False,
    )
    table = Table(show_lines=False)
    for column in ("tensor", "dtype", "shape", "chunks", "bytes"):
        table.add_column(column, justify="right" if column in ("chunks", "bytes") else "left")
    for key, meta in manifest.tensors.items():
        table.add_row(
            printable(key),
            meta.dtype + (" (pickle)" if meta.encoding != "raw" else ""),
            str(list(meta.shape)),
            str(len(meta.chunks)),
            _size(meta.nbytes),
        )
    out.print(table)
    if manifest.objects:
        objects = printable(json.dumps(manifest.objects)[:2000])  # json.dumps escapes them too
        out.print(f"objects: {objects}", highlight=False)
    if manifest.user_metadata:
        user_metadata = printable(json.dumps(manifest.user_metadata))
        out.print(f"user_metadata: {user_metadata}", highlight=False)


@app.command("verify")
def verify_cmd(path: str) -> None:
    """Check every file and chunk checksum; exit 1 naming each problem."""
    with _progress("verifying") as progress:
        try:
            report = verify(path, progress=progress)
        except CheckpointError as exc:
            raise _fail(exc) from exc
    out.print(
        f"OK: {report.tensors} tensors, {report.chunks} chunks in {report.files} file(s), "
        f"{_size(report.bytes_checked)} checked",
        highlight=False,
    )


@app.command("gc")
def gc_cmd(
    root: str,
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be removed."),
    min_age: float = typer.Option(
        3600.0,
        help="Keep incomplete checkpoints started on another host less than this many "
        "seconds ago (same-host saves are kept while their process lives).",
    ),
) -> None:
    """Delete never-committed checkpoints under ROOT; committed ones are never touched."""
    try:
        entries = collect_garbage(root, dry_run=dry_run, min_age=min_age)
    except CheckpointError as exc:
        raise _fail(exc) from exc
    if not entries:
        out.print("nothing to collect")
    for entry in entries:
        verb = "removed" if entry.removed else "kept"
        reason = f": {entry.reason}" if entry.reason else ""
        out.print(printable(f"{verb} {entry.name} (incomplete){reason}"), highlight=False)


class Source(str, Enum):
    deepspeed = "deepspeed"
    megatron = "megatron"
    dcp = "dcp"
    hf = "hf"


def _variables(assignments: list[str]) -> dict[str, int]:
    values = {}
    for item in assignments:
        name, sep, value = item.partition("=")
        try:
            values[name.strip()] = int(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise typer.BadParameter(f"--set expects NAME=INTEGER, got {item!r}")
    return values


@app.command("convert")
def convert_cmd(
    src: str,
    dst: str,
    source: Source = typer.Option(..., "--from", help="The framework that wrote SRC."),  # noqa: B008
    spec: str | None = typer.Option(
        None, help="Conversion spec: a YAML file or a shipped spec's name (docs/CONVERT.md)."
    ),
    assignments: list[str] = typer.Option(  # noqa: B008 - typer declares options this way
        [], "--set", help="Spec variable NAME=INTEGER (repeatable)."
    ),
    trust_pickle: bool = typer.Option(
        False,
        "--trust-pickle",
        help="Allow arbitrary pickled objects in SRC. Unpickling can execute code: only for "
        "files you trust.",
    ),
) -> None:
    """Convert a DeepSpeed, Megatron, DCP or HF checkpoint at SRC into a unickpt one at DST."""
    variables = _variables(assignments)
    if spec is not None and source is Source.dcp:
        raise typer.BadParameter("--from dcp takes no --spec")
    if variables and source in (Source.dcp, Source.hf):
        raise typer.BadParameter(f"--from {source.value} takes no --set")
    with _progress(f"converting {source.value}") as progress:
        try:
            if source is Source.deepspeed:
                manifest = import_deepspeed(
                    src,
                    dst,
                    spec=spec,
                    variables=variables,
                    trust_pickle=trust_pickle,
                    progress=progress,
                )
            elif source is Source.megatron:
                manifest = import_megatron(
                    src,
                    dst,
                    spec=spec or DEFAULT_MEGATRON_SPEC,
                    variables=variables,
                    trust_pickle=trust_pickle,
                    progress=progress,
                )
            elif source is Source.dcp:
                manifest = import_dcp(src, dst, trust_pickle=trust_pickle, progress=progress)
            else:
                manifest = import_hf(src, dst, spec=spec, progress=progress)
        except CheckpointError as exc:
            raise _fail(exc) from exc
    out.print(
        printable(
            f"converted {src} ({source.value}) -> {dst}: {len(manifest.tensors)} tensors, "
            f"{_size(manifest.total_bytes)}"
        ),
        highlight=False,
    )


@app.command("export-hf")
def export_hf_cmd(
    src: str,
    dst: str,
    spec: str | None = typer.Option(None, help="Spec whose rename rules map the names."),
    max_shard_size: str = typer.Option("5GB", help="Largest file, e.g. 5GB, 500MB, 2GiB."),
    dtype: str | None = typer.Option(None, help="Cast floating tensors: bf16, fp16 or fp32."),
) -> None:
    """Export the model of the unickpt checkpoint SRC as Hugging Face safetensors into DST."""
    with _progress("exporting") as progress:
        try:
            files = export_hf(
                src,
                dst,
                spec=spec,
                max_shard_size=max_shard_size,
                dtype=dtype,
                progress=progress,
            )
        except CheckpointError as exc:
            raise _fail(exc) from exc
    out.print(printable(f"exported {src} -> {dst}: {len(files)} file(s)"), highlight=False)


def main() -> None:
    app()
