"""Entry point: the `sdkit` group, error rendering and exit codes.

Exit codes: 0 ok, 1 refused input or failed check, 2 usage error (click's own).
A refused input prints one line `sdkit: error: ...`; a traceback only with --debug.
Error lines, usage errors and Python warnings are escaped for the terminal here, in one
place (sdkit.cli.terminal); every other output goes through its console and echo.
"""

from __future__ import annotations

import io
import sys
import warnings

import click

from sdkit import __version__
from sdkit.cli.terminal import shown
from sdkit.errors import SdkitError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sdkit")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.option("--quiet", "-q", is_flag=True,
              help="Print only errors, --json output and the reports of reporting commands "
                   "(no progress bars, summaries, notes or warnings).")
@click.option("--record-paths", is_flag=True,
              help="Record inputs in written metadata by absolute path, not file name.")
@click.pass_context
def cli(ctx: click.Context, debug: bool, quiet: bool, record_paths: bool) -> None:
    """Inspect, convert, merge and apply Stable Diffusion model files.

    Example: sdkit inspect fixtures/toy/sd1/toy-sd1.safetensors
    """
    from sdkit.ops.recipe_meta import full_paths_recorded

    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    ctx.obj["quiet"] = quiet
    ctx.with_resource(full_paths_recorded(record_paths))
    if quiet:
        warnings.simplefilter("ignore")  # the peers' warnings are chatter too


def _register_commands() -> None:
    # each command group lives in its own module; importing it attaches it to `cli`
    from sdkit.cli import (  # noqa: F401
        convert_cmd, embed_cmd, hub_cmd, hypernet_cmd, inspect_cmd, lora_cmd, merge_cmd, sample_cmd,
        train_cmd, vae_cmd,
    )


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
    _register_commands()
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


