"""Entry point: the `sdkit` group, error rendering and exit codes.

Exit codes: 0 ok, 1 refused input or failed check, 2 usage error (click's own).
A refused input prints one line `sdkit: error: ...`; a traceback only with --debug.
Error lines, usage errors and Python warnings are escaped for the terminal here, in one
place (sdkit.cli.escape); every other output goes through sdkit.cli.terminal's console
and echo.

Each command lives in its own module, imported only when that command runs: importing
all of them (and what they import) would cost every command, `sdkit inspect` included,
several hundred milliseconds before it starts.
"""

from __future__ import annotations

import importlib
import io
import sys
import warnings

import click

from sdkit import __version__
from sdkit.cli.escape import shown
from sdkit.errors import SdkitError

# name -> ("module:attribute", short help). `sdkit --help` lists the short help from here,
# so that it imports no command module; tests/cli keeps it equal to the commands' own.
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("sdkit.cli.convert_cmd:convert_command",
                "Convert a model file: pickle to safetensors, precision, pruning, repairs, "
                "single-file <-> diffusers, one component, LoRA kohya <-> diffusers, "
                "embedding layouts."),
    "download": ("sdkit.cli.hub_cmd:download_command",
                 "Download SOURCE, resuming any earlier attempt, and verify its sha256."),
    "embed": ("sdkit.cli.embed_cmd:embed_group",
              "Textual-inversion embeddings (A1111 .pt, kohya, SDXL clip_l/clip_g, diffusers)."),
    "hash": ("sdkit.cli.inspect_cmd:hash_command",
             "Hash model files the ways A1111 and Civitai do (one read per file)."),
    "hypernet": ("sdkit.cli.hypernet_cmd:hypernet_group", "A1111 hypernetworks (.pt)."),
    "join": ("sdkit.cli.parts_cmd:join_command",
             "Assemble one checkpoint ComfyUI loads from a diffusion model, its text encoders and VAE."),
    "inspect": ("sdkit.cli.inspect_cmd:inspect_command",
                "Tell what a model file is: kind, family, convention, precision, notable facts."),
    "library": ("sdkit.cli.hub_cmd:library_group",
                "Keep model files in A1111 / ComfyUI / InvokeAI-like folders, indexed."),
    "lora": ("sdkit.cli.lora_cmd:lora_group",
             "LoRA / LyCORIS adapters: check, bake into a model, merge, extract, resize."),
    "merge": ("sdkit.cli.merge_cmd:merge_command",
              "Merge checkpoints key by key into a new .safetensors file."),
    "split": ("sdkit.cli.parts_cmd:split_command",
              "Write a checkpoint's diffusion model, text encoders and VAE each on its own (ComfyUI folders)."),
    "sample": ("sdkit.cli.sample_cmd:sample_command",
               "Draw pictures from a checkpoint or diffusers folder; every PNG carries A1111's "
               "generation parameters."),
    "train": ("sdkit.cli.train_cmd:train_command",
              "Train a LoRA, LoHa, LoKr, textual inversion, hypernetwork or DreamBooth fine-tune."),
    "vae": ("sdkit.cli.vae_cmd:vae_group", "Swap, extract and check VAEs."),
    "verify": ("sdkit.cli.train_cmd:verify_command",
               "Sample a concept with and without an adapter; fail (exit 1) when it shows too "
               "rarely with it, or too often without it."),
}


class LazyGroup(click.Group):
    """A group whose commands (from COMMANDS) are imported when they are looked up."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            self.add_command(load_command(cmd_name), cmd_name)
        return self.commands.get(cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # click's own would import every command for its short help
        names = [name for name in self.list_commands(ctx)
                 if name not in self.commands or not self.commands[name].hidden]
        limit = formatter.width - 6 - max(len(name) for name in names)
        rows = [(name, self._short_help(name, limit)) for name in names]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def _short_help(self, name: str, limit: int) -> str:
        if name in self.commands:  # loaded already, or attached by a test
            return self.commands[name].get_short_help_str(limit)
        return click.utils.make_default_short_help(COMMANDS[name][1], limit)


def load_command(name: str) -> click.Command:
    """The command `name` of COMMANDS, its module imported."""
    module, attribute = COMMANDS[name][0].split(":")
    command: click.Command = getattr(importlib.import_module(module), attribute)
    return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sdkit")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.option("--quiet", "-q", is_flag=True,
              help="Print only errors, --json output and the reports of reporting commands "
                   "(no progress bars, summaries, notes or warnings).")
@click.option("--record-paths", is_flag=True,
              help="Record inputs in written metadata by absolute path, not file name.")
@click.option("--library", metavar="DIR",
              help="A library whose files every command takes by name (default: $SDKIT_LIBRARY).")
@click.pass_context
def cli(ctx: click.Context, debug: bool, quiet: bool, record_paths: bool, library: str | None) -> None:
    """Inspect, convert, merge and apply Stable Diffusion model files.

    Example: sdkit inspect fixtures/toy/sd1/toy-sd1.safetensors
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    ctx.obj["quiet"] = quiet
    ctx.obj["library"] = library
    if record_paths:  # recipe_meta is a heavy import; names are recorded without it
        from sdkit.ops.recipe_meta import full_paths_recorded

        ctx.with_resource(full_paths_recorded())
    if quiet:
        warnings.simplefilter("ignore")  # the peers' warnings are chatter too


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().replace("\n", " ") or exc.__class__.__name__
    return text


def _error(message: str) -> None:
    """The one line of a refused input. Messages quote file names, metadata and server
    answers, so they are escaped like every other output."""
    click.echo(f"sdkit: error: {shown(message)}", err=True)


def _show_usage_error(exc: click.ClickException) -> None:
    # click's own rendering (usage line, hint, message), escaped: it quotes arguments
    rendered = io.StringIO()
    exc.show(file=rendered)
    click.echo(shown(rendered.getvalue()), err=True, nl=False)


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: object = None, line: str | None = None) -> None:
    """Python warnings (ours and the peers'), escaped: they may quote file contents."""
    text = warnings.formatwarning(message, category, filename, lineno, line)
    click.echo(shown(text), err=True, nl=False)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    warnings.showwarning = _show_warning
    try:
        cli.main(args=args, prog_name="sdkit", standalone_mode=False)
    except click.exceptions.Abort:
        _error("aborted")
        sys.exit(1)
    except click.ClickException as exc:  # usage errors keep click's own rendering, exit 2
        _show_usage_error(exc)
        sys.exit(exc.exit_code)
    except SdkitError as exc:
        if debug:
            raise
        _error(_one_line(exc))
        sys.exit(1)
    except KeyboardInterrupt:
        _error("interrupted")
        sys.exit(130)
    except Exception as exc:  # a bug or an unforeseen bad input: still one line
        if debug:
            raise
        _error(f"{exc.__class__.__name__}: {_one_line(exc)} (rerun with --debug for details)")
        sys.exit(1)


