"""``unickpt inspect | verify | gc``."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from unickpt.errors import CheckpointError, IncompleteCheckpointError
from unickpt.tools import collect_garbage, inspect, verify

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Universal checkpoints: inspect, verify and clean them up.",
)
# soft_wrap: long paths and messages stay on one line in logs instead of being cut at 80 columns.
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _fail(exc: CheckpointError) -> typer.Exit:
    label = "INCOMPLETE" if isinstance(exc, IncompleteCheckpointError) else "ERROR"
    err.print(f"[bold red]{label}[/]: {exc}", markup=True, highlight=False)
    return typer.Exit(1)


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
        f"[bold]{path}[/]  step={manifest.step}  format v{manifest.version}  "
        f"{_size(manifest.total_bytes)} in {len(manifest.files)} file(s)  "
        f"written by world_size={writer.get('world_size')} meshes={writer.get('meshes')}",
        highlight=False,
    )
    table = Table(show_lines=False)
    for column in ("tensor", "dtype", "shape", "chunks", "bytes"):
        table.add_column(column, justify="right" if column in ("chunks", "bytes") else "left")
    for key, meta in manifest.tensors.items():
        table.add_row(
            key,
            meta.dtype + (" (pickle)" if meta.encoding != "raw" else ""),
            str(list(meta.shape)),
            str(len(meta.chunks)),
            _size(meta.nbytes),
        )
    out.print(table)
    if manifest.objects:
        out.print(f"objects: {json.dumps(manifest.objects)[:2000]}", highlight=False)
    if manifest.user_metadata:
        out.print(f"user_metadata: {json.dumps(manifest.user_metadata)}", highlight=False)


@app.command("verify")
def verify_cmd(path: str) -> None:
    """Check every file and chunk checksum; exit 1 naming each problem."""
    # A bar on a terminal only: logs and CI get the one-line verdict.
    with Progress(console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("verifying", total=None)
        try:
            report = verify(
                path, progress=lambda done, total: bar.update(task, completed=done, total=total)
            )
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
    entries = collect_garbage(root, dry_run=dry_run, min_age=min_age)
    if not entries:
        out.print("nothing to collect")
    for entry in entries:
        verb = "removed" if entry.removed else "kept"
        out.print(
            f"{verb} {entry.name} (incomplete){': ' + entry.reason if entry.reason else ''}",
            highlight=False,
        )


def main() -> None:
    app()
