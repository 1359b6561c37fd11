"""`sdkit download` and `sdkit library …`: thin wrappers over sdkit.hub."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

import click
from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from sdkit.cli.common import is_quiet
from sdkit.cli.main import cli
from sdkit.cli.preflight import LIBRARY_ENV
from sdkit.cli.tables import table_or_lines
from sdkit.cli.terminal import SafeConsole, echo, shown
from sdkit.errors import SdkitError, with_article


class _RichProgress:
    """A transfer bar on stderr; sdkit.hub calls begin/update/end."""

    def __init__(self, console: Console) -> None:
        self.bar = Progress(TextColumn("{task.description}", markup=False), BarColumn(), DownloadColumn(),
                            TransferSpeedColumn(), TimeRemainingColumn(), console=console,
                            transient=True)
        self.task: TaskID | None = None

    def begin(self, name: str, total: int | None, done: int) -> None:
        self.bar.start()
        self.task = self.bar.add_task(shown(name), total=total, completed=done)

    def update(self, done: int) -> None:
        if self.task is not None:
            self.bar.update(self.task, completed=done)

    def end(self) -> None:
        if self.task is not None:
            self.bar.remove_task(self.task)
            self.task = None
        self.bar.stop()


def _errors_console() -> Console:
    return SafeConsole(stderr=True)


def _notifier(ctx: click.Context) -> Callable[[str], None] | None:
    if is_quiet(ctx):
        return None
    console = _errors_console()
    return lambda message: console.print(message)


def _policy(rename: bool, force: bool) -> str:
    if rename and force:
        raise click.UsageError("--rename and --force exclude each other")
    return "rename" if rename else "overwrite" if force else "refuse"


def _force_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--force, and --overwrite: its old name, hidden, kept so that scripts still work."""
    command = click.option("--overwrite", "force_alias", is_flag=True, hidden=True)(command)
    return click.option("--force", is_flag=True, help="If the name is taken, replace that file.")(command)


def _size(count: int | None) -> str:
    if count is None:
        return "?"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


# --- download ---------------------------------------------------------------------------

@cli.command("download")
@click.argument("source")
@click.option("--library", type=click.Path(file_okay=False, path_type=Path),
              help="Put the file where its kind belongs in this library, and index it.")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Target folder (existing, or a name without extension) or file name (default: the current folder).")
@click.option("--file-type", help="Civitai file type: Model, Pruned Model, VAE, Config, …")
@click.option("--fp", help="Civitai precision: fp16, fp32, bf16, …")
@click.option("--format", "file_format", help="Civitai format: SafeTensor, PickleTensor, GGUF, …")
@click.option("--sha256", "expected_sha256", help="Expected sha256 of a plain URL's file.")
@click.option("--rename", is_flag=True, help="If the name is taken, save as 'name (1).ext'.")
@_force_options
@click.option("--family-subfolders/--no-family-subfolders", default=None,
              help="In a library, file by family too (models/Lora/sdxl/…).")
@click.option("--retries", type=click.IntRange(1, 100), default=6, show_default=True,
              help="Give up on a file after this many failed tries that brought under 1 MiB "
                   "each, or 10 times as many tries in all (a later run still resumes).")
@click.option("--max-time", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Stop after this many seconds in all (a later run still resumes).")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@click.pass_context
def download_command(ctx: click.Context, source: str, library: Path | None, output: Path | None,
                     file_type: str | None, fp: str | None, file_format: str | None,
                     expected_sha256: str | None, rename: bool, force: bool, force_alias: bool,
                     family_subfolders: bool | None, retries: int, max_time: float | None,
                     as_json: bool) -> None:
    """Download SOURCE, resuming any earlier attempt, and verify its sha256.

    SOURCE: hf:OWNER/REPO[/PATH][@REVISION], civitai:MODEL_ID[@VERSION_ID], a civitai.com
    model URL, or any https:// URL. Tokens come from HF_TOKEN and CIVITAI_TOKEN. No more
    bytes are read than the hub lists for the file. A connection slower than 1 KiB/s over
    60 s is cut and counts as a failed try.

    Example: sdkit download civitai:4201 --library ~/stable-diffusion-webui
    """
    from sdkit.hub import FileChoice, RetryPolicy, TransferOptions, download

    policy = _policy(rename, force or force_alias)
    console = _errors_console()
    show_bar = not is_quiet(ctx) and console.is_terminal
    options = TransferOptions(policy=RetryPolicy(attempts=retries, max_time=max_time),
                              progress=_RichProgress(console) if show_bar else None,
                              notify=_notifier(ctx))
    outcomes = download(source, library=library, output=output,
                        choice=FileChoice(file_type, fp, file_format), policy=policy,  # type: ignore[arg-type]
                        family_subfolders=family_subfolders, expected_sha256=expected_sha256,
                        options=options)
    if as_json:
        _echo_json([vars(o) for o in outcomes])
        return
    for outcome in outcomes:
        what = f" ({outcome.kind}, {outcome.family})" if outcome.kind else ""
        verb = "downloaded" if outcome.status == "downloaded" else "already present"
        echo(f"{verb}: {outcome.path}{what} [{_size(outcome.size)}]")


# --- library ----------------------------------------------------------------------------

def _library_root(option: Path | None) -> Path:
    """--library, else `sdkit --library` or $SDKIT_LIBRARY, else the library around the
    current folder."""
    from sdkit.cli.preflight import configured_library
    from sdkit.hub.library import find_library_root

    return option or configured_library() or find_library_root(Path.cwd()) or Path.cwd()


_library_option = click.option("--library", type=click.Path(file_okay=False, path_type=Path),
                               help=f"The library folder (default: `sdkit --library`, ${LIBRARY_ENV}, "
                                    "else the library around the current folder).")


@cli.group("library")
def library_group() -> None:
    """Keep model files in A1111 / ComfyUI / InvokeAI-like folders, indexed.

    Example: sdkit library init ~/ComfyUI --layout comfyui
    """


@library_group.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--layout", type=click.Choice(["a1111", "comfyui", "invokeai-like"]), required=True)
@click.option("--family-subfolders", is_flag=True, help="File models by family too (…/sdxl/).")
def init_command(directory: Path, layout: str, family_subfolders: bool) -> None:
    """Create a library's folders and its index.

    Example: sdkit library init ~/stable-diffusion-webui --layout a1111
    """
    from sdkit.hub.library import Library

    with Library.init(directory, layout, family_subfolders=family_subfolders) as library:
        echo(f"{library.root}: {layout} library, index at {library.index.path}")


@library_group.command("add")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@_library_option
@click.option("--move", "method", flag_value="move", help="Move the files in.")
@click.option("--copy", "method", flag_value="copy", default=True, help="Copy the files in (default).")
@click.option("--link", "method", flag_value="link", help="Hard-link them (symlink across disks).")
@click.option("--family-subfolders/--no-family-subfolders", default=None,
              help="File by family too (models/Lora/sdxl/…).")
@click.option("--rename", is_flag=True, help="If the name is taken, use 'name (1).ext'.")
@_force_options
@click.option("--json", "as_json", is_flag=True)
def add_command(files: tuple[Path, ...], library: Path | None, method: str,
                family_subfolders: bool | None, rename: bool, force: bool, force_alias: bool,
                as_json: bool) -> None:
    """Put FILES where their identified kind belongs, and index them. A file that is not
    a model file (one `sdkit inspect` refuses) stops the command before anything is added.

    Example: sdkit library add ~/Downloads/*.safetensors --move --library ~/ComfyUI
    """
    from sdkit.hub.library import Library

    policy = _policy(rename, force or force_alias)
    with Library.open(_library_root(library)) as lib:
        placements = lib.add(list(files), method=method, policy=policy,  # type: ignore[arg-type]
                             family_subfolders=family_subfolders)
    if as_json:
        _echo_json([{"status": p.status, **p.entry.to_json()} for p in placements])
        return
    for source, placement in zip(files, placements):
        verb = "added" if placement.status == "installed" else "already present"
        entry = placement.entry
        echo(f"{verb}: {source} -> {entry.path} ({entry.part or entry.kind}; {_family_words(entry)})")


_WEBUI_FOLDER_FLAGS = ("--ckpt-dir", "--lora-dir", "--vae-dir", "--embeddings-dir", "--hypernetwork-dir")


def _folder_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """A1111's folder flags and ComfyUI's yaml, for folders outside the library's root."""
    from sdkit.hub.library.folders import WEBUI_DIR_FLAGS

    for flag in reversed(_WEBUI_FOLDER_FLAGS):
        command = click.option(flag, multiple=True, metavar="DIR",
                               help=f"A folder of {WEBUI_DIR_FLAGS[flag]} files (A1111's {flag}).")(command)
    return click.option("--extra-model-paths", "yaml_files", multiple=True, metavar="FILE",
                        type=click.Path(dir_okay=False, exists=True, path_type=Path),
                        help="A ComfyUI extra_model_paths.yaml whose folders belong to the library.")(command)


def _given_folders(yaml_files: tuple[Path, ...], webui_dirs: dict[str, tuple[str, ...]]) -> list[Any]:
    from sdkit.hub.library.folders import (
        folders_from_webui_args,
        read_extra_model_paths,
    )

    words = [word for flag in _WEBUI_FOLDER_FLAGS
             for value in webui_dirs[flag.lstrip("-").replace("-", "_")] for word in (flag, value)]
    folders = folders_from_webui_args(words, Path.cwd())
    for yaml_file in yaml_files:
        folders += read_extra_model_paths(yaml_file)
    return folders


@library_group.command("scan")
@click.argument("directory", required=False, type=click.Path(file_okay=False, path_type=Path))
@_folder_options
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def scan_command(ctx: click.Context, directory: Path | None, yaml_files: tuple[Path, ...], as_json: bool,
                 **webui_dirs: tuple[str, ...]) -> None:
    """Index the model files under DIRECTORY (only new or changed files are read).

    Folders outside it count too: those in ComfyUI's extra_model_paths.yaml or A1111's
    webui-user COMMANDLINE_ARGS, and those given here (remembered for later commands).

    Example: sdkit library scan ~/ComfyUI
    """
    from sdkit.hub.library import open_for_scan, scan_library

    root = directory or _library_root(None)
    if not root.is_dir():
        raise SdkitError(f"{root}: no such folder")
    given = _given_folders(yaml_files, webui_dirs)
    notify = _notifier(ctx)
    library, rebuilt = open_for_scan(root)
    with library:
        if given:
            library.remember_folders(given)
        report = scan_library(library, progress=(lambda p: notify(f"hashing {p}")) if notify else None)
    report.rebuilt = rebuilt
    if as_json:
        _echo_json(vars(report))
        return
    rebuilt_note = " (the damaged index was set aside and rebuilt)" if rebuilt else ""
    echo(f"{library.root}: {report.files} model files; {report.added} added, "
         f"{report.updated} updated, {report.removed} removed, {report.unchanged} unchanged; "
         f"{report.rehashed} hashed{rebuilt_note}")
    for folder in report.folders:
        echo(f"also reads: {folder['path']} ({folder['kind']} files; {folder['origin']})")
    for misplaced in report.misplaced:
        echo(f"misplaced: {misplaced['path']} is {with_article(misplaced['kind'])}; "
             f"{report.layout} reads those from {misplaced['folder']}")


def _family_words(entry: Any) -> str:
    """The family, with the release where known, and whether Civitai named it."""
    words = entry.family + (f" ({entry.release})" if entry.release else "")
    return words + (", from Civitai" if entry.family_source == "civitai" else "")


def _entries_table(entries: list[Any], title: str | None = None,
                   extras: dict[str, Any] | None = None) -> RenderableType:
    """One row per entry; with `extras` (path -> Sidecars) a column naming its sidecars."""
    rows = []
    for entry in entries:
        kind = entry.kind + (f" ({entry.adapter_type})" if entry.adapter_type else "")
        # a row from before the index kept parts shows "?" until the next scan
        part = "?" if entry.part is None else entry.part
        row = (entry.path, kind, _family_words(entry), part, _size(entry.size), (entry.sha256 or "")[:12])
        rows.append(row + ((", ".join(extras[entry.path].names()) or "-",) if extras is not None else ()))
    header = ("path", "kind", "family", "part", "size", "sha256") + (("sidecars",) if extras is not None else ())
    return table_or_lines(header, rows, SafeConsole().width, title)


def _sidecars_of(lib: Any, entries: list[Any]) -> dict[str, Any]:
    from sdkit.hub.library.sidecars import read_sidecars

    return {entry.path: read_sidecars(lib.root / entry.path) for entry in entries}


def _with_sidecars(entry: Any, found: Any) -> dict[str, Any]:
    return {**entry.to_json(), "sidecars": found.to_json()}


@library_group.command("ls")
@_library_option
@click.option("--kind", help="Only this kind (checkpoint, lora, vae, embedding, …).")
@click.option("--family", help="Only this family (sd1, sdxl-base, flux, …).")
@click.option("--json", "as_json", is_flag=True)
def ls_command(library: Path | None, kind: str | None, family: str | None, as_json: bool) -> None:
    """List the indexed files, and the A1111 sidecars beside each.

    Example: sdkit library ls --kind lora --family sdxl-base
    """
    from sdkit.hub.library import Library

    with Library.open_existing(_library_root(library)) as lib:
        entries = lib.index.entries(kind=kind, family=family)
        found = _sidecars_of(lib, entries)
    if as_json:
        _echo_json([_with_sidecars(e, found[e.path]) for e in entries])
    else:
        SafeConsole().print(_entries_table(entries, extras=found))


@library_group.command("find")
@click.argument("query")
@_library_option
@click.option("--json", "as_json", is_flag=True)
def find_command(query: str, library: Path | None, as_json: bool) -> None:
    """Find files by sha256 prefix, AutoV2, AutoV3, legacy hash or part of the name.

    Example: sdkit library find 6ce0161689
    """
    from sdkit.hub.library import Library

    with Library.open_existing(_library_root(library)) as lib:
        entries = lib.index.find(query)
    if as_json:
        _echo_json([e.to_json() for e in entries])
        if not entries:
            sys.exit(1)  # like grep: no match is a failed search, in every output form
    elif not entries:
        raise SdkitError(f"{query}: nothing in the library matches")
    else:
        SafeConsole().print(_entries_table(entries))


@library_group.command("dupes")
@_library_option
@click.option("--json", "as_json", is_flag=True)
def dupes_command(library: Path | None, as_json: bool) -> None:
    """Show files stored more than once (same sha256).

    Example: sdkit library dupes
    """
    from sdkit.hub.library import Library

    with Library.open_existing(_library_root(library)) as lib:
        groups = lib.index.duplicates()
    if as_json:
        _echo_json([[e.to_json() for e in group] for group in groups])
        return
    if not groups:
        click.echo("no duplicates")
    for group in groups:
        SafeConsole().print(_entries_table(group, title=f"{len(group)} copies of {group[0].sha256[:12]}"))


@library_group.command("verify")
@_library_option
@click.option("--full", is_flag=True, help="Re-hash every file, not only those whose size or date changed.")
@click.option("--json", "as_json", is_flag=True)
def verify_command(library: Path | None, full: bool, as_json: bool) -> None:
    """Check that indexed files are still there and unchanged; exit 1 if not.

    Example: sdkit library verify --full
    """
    from sdkit.hub.library import Library, verify_library

    with Library.open_existing(_library_root(library)) as lib:
        report = verify_library(lib, full=full)
    if as_json:
        _echo_json({"ok": report.ok, **vars(report)})
    else:
        for path in report.changed:
            echo(f"changed: {path}")
        for path in report.missing:
            echo(f"missing: {path}")
        echo(f"{report.checked} files checked, {report.rehashed} re-hashed")
    if not report.ok:
        raise SdkitError(f"{len(report.changed)} changed and {len(report.missing)} missing "
                         "since they were indexed")


from sdkit.cli import library_cmd  # noqa: F401  (attaches `library show` and `library lookup`)
