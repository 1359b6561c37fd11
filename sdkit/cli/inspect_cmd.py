"""`sdkit inspect` and `sdkit hash`."""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Any

import click

from sdkit.cli.common import human_bytes
from sdkit.cli.main import cli
from sdkit.cli.preflight import ModelInput
from sdkit.errors import SdkitError

if TYPE_CHECKING:  # rich only for tables: --json prints without it, tens of ms sooner
    from rich.console import Console
    from sdkit.cli.tables import Table

_VALUE_WIDTH = 72
_METADATA_ROWS = 200


def _short(value: str) -> str:
    """One line of at most _VALUE_WIDTH characters (values can be megabytes long)."""
    value = value[: _VALUE_WIDTH + 1].replace("\n", " ")
    return value if len(value) <= _VALUE_WIDTH else value[: _VALUE_WIDTH - 1] + "…"


def _literal_console() -> Console:
    """A console that prints text as it is: paths, metadata and prompts come from files,
    and A1111 prompt syntax (`[a:b:0.5]`, `<lora:name:1>`) must not be read as rich
    markup or `:emoji:` codes (control characters are escaped)."""
    from sdkit.cli.terminal import SafeConsole

    return SafeConsole()


def _table(title: str) -> Table:
    """A two-column table under a left-aligned title (rich imported here: human output only)."""
    from sdkit.cli.tables import Table

    return Table(title=title, show_header=False, title_justify="left")


def _render_report(console: Console, report: dict[str, Any]) -> None:
    table = _table(report["path"])
    table.add_column(style="bold cyan")
    table.add_column()
    adapter = f" ({report['adapter_type']})" if report.get("adapter_type") else ""
    if report.get("summary"):
        table.add_row("is", report["summary"])
    table.add_row("kind", f"{report['kind']}{adapter}")
    table.add_row("family", str(report["family"]) + (" (non-standard dimensions)" if report["nonstandard"] else ""))
    table.add_row("format", f"{report['format']}, {report['key_convention']} keys")
    if report.get("components"):
        table.add_row("components", ", ".join(report["components"]))
    for field in ("variant", "prediction"):
        if report.get(field) not in (None, "normal", "unknown"):
            table.add_row(field, str(report[field]))
    quantization = (report.get("precision") or {}).get("label")
    if quantization:
        table.add_row("precision", quantization)
    dtypes = ", ".join(f"{dtype}×{count}" for dtype, count in report["dtypes"].items())
    table.add_row("tensors", f"{report['tensors']:,} ({dtypes})")
    table.add_row("parameters", f"{report['parameters']:,}")
    table.add_row("size", human_bytes(report["size_bytes"]))
    for name, value in (report.get("hashes") or {}).items():
        table.add_row(name, value or "—")
    console.print(table)
    if report["metadata"]:
        console.print(_metadata_table(report["metadata"]))
    for note in report["notes"]:
        console.print(f"• {note}")


def _metadata_table(metadata: dict[str, str]) -> Table:
    """The first keys in sorted order (kohya writes ~100; a header may hold tens of
    thousands, which rich would take minutes to lay out); --json has them all."""
    meta = _table("metadata")
    meta.add_column(style="bold")
    meta.add_column()
    keys = sorted(metadata)
    for key in keys[:_METADATA_ROWS]:
        meta.add_row(_short(key), _short(metadata[key]))
    if len(keys) > _METADATA_ROWS:
        meta.add_row("…", f"and {len(keys) - _METADATA_ROWS:,} more keys (all with --json)")
    return meta


def _render_parameters(console: Console, report: dict[str, Any]) -> None:
    table = _table(report["path"])
    table.add_column(style="bold cyan")
    table.add_column()
    for field, value in report["parameters"].items():
        table.add_row(field, value)
    console.print(table)


@cli.command("inspect")
@click.argument("path", type=ModelInput())
@click.option("--json", "as_json", is_flag=True, help="One JSON object (schema in the README).")
@click.option("--hash", "with_hashes", is_flag=True, help="Also compute sha256, AutoV2, legacy and AutoV3 hashes.")
@click.option("--deep", is_flag=True,
              help="Read every tensor to find NaN/Inf values (exit 1 if any); slower.")
def inspect_command(path: str, as_json: bool, with_hashes: bool, deep: bool) -> None:
    """Tell what a model file is: kind, family, convention, precision, notable facts.

    With --deep, exits 1 when a tensor holds NaN or Inf values (after the report).
    Example: sdkit inspect model.safetensors --hash
    """
    from sdkit.inspect import inspect_path

    report = inspect_path(path, with_hashes=with_hashes, deep=deep)
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=False))
    elif report["format"] == "png":
        _render_parameters(_literal_console(), report)
    else:
        _render_report(_literal_console(), report)
    if (report.get("facts") or {}).get("nan_tensors"):
        sys.exit(1)  # a failed check, like `lora check`: the report says which tensors


def _refuse_unhashable(path: str) -> None:
    """A folder (a diffusers model, any directory) has no single hash: the hashes A1111
    and Civitai show are of one file's bytes."""
    if os.path.isdir(path):
        raise SdkitError(f"{path}: a folder has no single hash; give the model files in it "
                         "instead (e.g. its */*.safetensors)")
    if not os.path.exists(path):
        raise SdkitError(f"{path}: no such file")


@cli.command("hash")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="A JSON list of {path, sha256, autov2, legacy, autov3}.")
@click.option("--sha256sum", "sha256sum", is_flag=True,
              help="Only `SHA256  PATH` lines, as sha256sum prints them (`sha256sum -c` checks them).")
def hash_command(paths: tuple[str, ...], as_json: bool, sha256sum: bool) -> None:
    """Hash model files the ways A1111 and Civitai do (one read per file).

    Each file gets a `SHA256  PATH` line as sha256sum writes it, then its AutoV2, A1111
    legacy and AutoV3 hashes; nothing is cut to fit the terminal.

    Example: sdkit hash a.safetensors b.ckpt --json
    """
    from sdkit.inspect import hashes_report

    for path in paths:  # all checked before any is read: no partial output
        _refuse_unhashable(path)
    rows = [{"path": path, **hashes_report(path)} for path in paths]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from sdkit.cli.terminal import echo

    for row in rows:
        echo(f"{row['sha256']}  {row['path']}")
        if not sha256sum:
            echo(f"  AutoV2 {row['autov2']}  legacy {row['legacy']}  AutoV3 {row['autov3'] or '—'}")
