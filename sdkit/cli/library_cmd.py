"""`sdkit library show` and `sdkit library lookup`: one file with its A1111 sidecars, and
Civitai's answers for one file or a whole library (thin wrappers over sdkit.hub.library)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from sdkit.cli.hub_cmd import (
    _echo_json,
    _family_words,
    _library_option,
    _library_root,
    _notifier,
    _sidecars_of,
    _size,
    _with_sidecars,
    library_group,
)
from sdkit.cli.terminal import echo
from sdkit.errors import SdkitError


@library_group.command("show")
@click.argument("name")
@_library_option
@click.option("--json", "as_json", is_flag=True)
def show_command(name: str, library: Path | None, as_json: bool) -> None:
    """Show one file by name: its index row and its A1111 sidecars.

    NAME: the file's stem, its file name or the end of its path in the library.

    Example: sdkit library show style
    """
    from sdkit.hub.library import Library
    from sdkit.hub.library.names import entries_named

    with Library.open_existing(_library_root(library)) as lib:
        entries = entries_named(lib, name)
        found = _sidecars_of(lib, entries)
    if not entries:
        raise SdkitError(f"{name}: no file of that name in the library")
    if as_json:
        _echo_json([_with_sidecars(e, found[e.path]) for e in entries])
        return
    for entry in entries:
        _show_entry(entry, found[entry.path])


_USER_METADATA_SHOWN = ("activation text", "preferred weight", "negative text", "sd version", "description", "notes")


def _show_entry(entry: Any, found: Any) -> None:
    kind = entry.kind + (f" ({entry.adapter_type})" if entry.adapter_type else "")
    lines = [entry.path, f"  {kind}; {_family_words(entry)}; {entry.part or '?'}; {_size(entry.size)}",
             f"  sha256: {entry.sha256 or '?'}"]
    if entry.source:
        lines.append(f"  source: {entry.source}")
    if entry.trigger_words:
        lines.append(f"  trigger words: {', '.join(entry.trigger_words)}")
    for key in _USER_METADATA_SHOWN:
        value = (found.user_metadata or {}).get(key)
        if value not in (None, ""):
            lines.append(f"  {key}: {value}")
    if found.civitai_info:
        facts = found.to_json()["civitai"]
        lines.append(f"  civitai: {facts['model_name']} — {facts['version_name']} ({facts['base_model']}; "
                     f"model {facts['model_id']}, version {facts['version_id']})")
    if found.preview:
        lines.append(f"  preview: {found.preview}")
    lines += [f"  problem: {problem}" for problem in found.problems]
    for line in lines:
        echo(line)


@library_group.command("lookup")
@click.argument("file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@_library_option
@click.option("--again", is_flag=True, help="Without FILE: ask again for files answered or unknown before.")
@click.option("--no-previews", is_flag=True, help="Without FILE: download no preview images.")
@click.option("--pause", type=click.FloatRange(min=0), default=1.0, show_default=True, metavar="SECONDS",
              help="Without FILE: wait this long between two requests to Civitai.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def lookup_command(ctx: click.Context, file: Path | None, library: Path | None, again: bool, no_previews: bool,
                   pause: float, as_json: bool) -> None:
    """Ask Civitai what FILE is (by sha256) and store the answer in the index.

    Without FILE, every file of the library, writing A1111's sidecars beside each:
    NAME.civitai.info, the keys NAME.json lacks (activation text, preferred weight,
    sd version) and NAME.preview.EXT. Stop it at any time: the same command goes on.

    Example: sdkit library lookup models/Lora/mystery.safetensors
    """
    from sdkit.hub.civitai import CivitaiClient

    client = CivitaiClient(notify=_notifier(ctx))
    if file is None:
        from sdkit.hub.library.lookup_all import LookupSettings

        settings = LookupSettings(pause=pause, previews=not no_previews, again=again)
        _lookup_library(ctx, _library_root(library), client, settings, as_json)
    else:
        _lookup_one_file(file, library, client, as_json)


def _lookup_library(ctx: click.Context, root: Path, client: Any, settings: Any, as_json: bool) -> None:
    from sdkit.hub import TransferOptions
    from sdkit.hub.library import Library
    from sdkit.hub.library.lookup_all import lookup_library

    notify = _notifier(ctx)
    settings.progress = (lambda p: notify(f"looking up {p}")) if notify else None
    settings.transfer = TransferOptions(policy=client.policy, notify=notify)
    with Library.open_existing(root) as lib:
        report = lookup_library(lib, client, settings)
    if as_json:
        _echo_json(vars(report))
        return
    for path in report.written:
        echo(f"wrote {path}")
    for problem in report.problems:
        echo(f"note: {problem}")
    echo(f"{report.files} files: {len(report.found)} known to Civitai, {len(report.unknown)} unknown "
         f"({report.skipped_unknown} unknown before, not asked again); {report.asked} asked, "
         f"{report.from_info} answered by their .civitai.info")


def _lookup_one_file(file: Path, library: Path | None, client: Any, as_json: bool) -> None:
    from sdkit.hub.library import Library, find_library_root, lookup_file

    root = library or find_library_root(file.parent)
    if root is None:
        result = lookup_file(file, None, client)
    else:
        with Library.open_existing(root) as lib:
            result = lookup_file(file, lib, client)
    if as_json:
        _echo_json({"path": str(result.path), "sha256": result.sha256, "stored": result.stored,
                    **result.facts, "family": result.family, "notes": result.notes})
        return
    facts = result.facts
    echo(f"{file}: {facts['model_name']} — {facts['version_name']} "
         f"({facts['model_type']}, {facts['base_model']})")
    if facts["trigger_words"]:
        echo(f"trigger words: {', '.join(facts['trigger_words'])}")
    if result.stored:
        echo(f"family: {result.family}")
    for note in result.notes:
        echo(f"note: {note}")
    click.echo("stored in the library index" if result.stored else "not in a library: nothing stored")
