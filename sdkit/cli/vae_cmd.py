"""`sdkit vae`: swap a checkpoint's VAE, extract it, check whether a VAE fits a model."""

from __future__ import annotations

import json
import sys
from typing import Any

import click
from rich.text import Text

from sdkit.cli.common import is_quiet, progress_bar, quiet_peer_logs
from sdkit.cli.main import cli
from sdkit.cli.preflight import SAFETENSORS, require_inputs, require_output
from sdkit.cli.terminal import SafeConsole, shown, styled
from sdkit.errors import with_article


@cli.group("vae")
def vae_group() -> None:
    """Swap, extract and check VAEs.

    Example: sdkit vae check model.safetensors vae-ft-mse-840000-ema-pruned.safetensors
    """


def _print_json(value: dict[str, Any]) -> None:
    click.echo(json.dumps(value, indent=2))


def _quiet(ctx: click.Context, as_json: bool) -> bool:
    return is_quiet(ctx) or as_json


@vae_group.command("swap")
@click.argument("checkpoint", type=click.Path(path_type=str))
@click.argument("vae", type=click.Path(path_type=str))
@click.option("--output", "-o", required=True, type=click.Path(path_type=str),
              help="Output .safetensors file (a folder when CHECKPOINT is a diffusers folder).")
@click.option("--force", is_flag=True, help="Overwrite the output if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.pass_context
def swap_command(ctx: click.Context, checkpoint: str, vae: str, output: str, force: bool, as_json: bool) -> None:
    """Replace CHECKPOINT's VAE with VAE (A1111 .vae.pt/.vae.safetensors/.ckpt, a diffusers
    vae folder or its weights file, or any model holding a VAE).

    Example: sdkit vae swap model.safetensors vae-ft-mse-840000-ema-pruned.safetensors -o model-mse.safetensors
    """
    require_inputs(checkpoint, vae)
    require_output(output, (checkpoint, vae), force=force)
    from sdkit.ops.vae.swap import swap_vae

    console = SafeConsole(stderr=True)
    with progress_bar(console, _quiet(ctx, as_json), "swapping") as advance:
        result = swap_vae(checkpoint, vae, output, force=force, progress=advance)
    if as_json:
        _print_json(result.to_json())
        return
    if is_quiet(ctx):
        return
    console.print(f"wrote {result.output} ({result.written}, {result.convention} keys, "
                  f"{result.vae_tensors} VAE tensors from {with_article(result.vae_convention)} VAE)")
    for note in result.notes:
        console.print(f"• {note}")


@vae_group.command("extract")
@click.argument("checkpoint", type=click.Path(path_type=str))
@click.option("--output", "-o", required=True, type=click.Path(path_type=str),
              help="Output .safetensors file, or a folder with --to diffusers.")
@click.option("--to", "convention", type=click.Choice(["ldm", "diffusers"]), default="ldm", show_default=True,
              help="ldm: A1111 .vae.safetensors keys (encoder.*, decoder.*); diffusers: AutoencoderKL keys.")
@click.option("--force", is_flag=True, help="Overwrite the output if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.pass_context
def extract_command(ctx: click.Context, checkpoint: str, output: str, convention: str, force: bool,
                    as_json: bool) -> None:
    """Write the VAE baked into CHECKPOINT on its own.

    Example: sdkit vae extract model.safetensors -o model.vae.safetensors
    """
    require_inputs(checkpoint)
    require_output(output, (checkpoint,), force=force, suffixes=SAFETENSORS if convention == "ldm" else None)
    from sdkit.ops.vae.swap import extract_vae

    console = SafeConsole(stderr=True)
    with progress_bar(console, _quiet(ctx, as_json), "extracting") as advance:
        result = extract_vae(checkpoint, output, to=convention, force=force, progress=advance)
    if as_json:
        _print_json(result.to_json())
        return
    if is_quiet(ctx):
        return
    console.print(f"wrote {result.output} ({result.written}, {result.convention} keys, {result.tensors} tensors)")


@vae_group.command("check")
@click.argument("base", type=click.Path(path_type=str))
@click.argument("vae", type=click.Path(path_type=str))
@click.option("--config", "config_dir", type=click.Path(path_type=str),
              help="A local diffusers folder of BASE's architecture (tokenizer, configs single files lack).")
@click.option("--text-encoder", "text_encoders", multiple=True, metavar="FILE",
              help="A text encoder of a FLUX.1 diffusion model given alone (CLIP-L and T5; with --config), "
                   "so that its latent space is measured.")
@click.option("--no-fp16", "skip_fp16", is_flag=True, help="Skip the float16 encode/decode test.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.pass_context
def check_command(ctx: click.Context, base: str, vae: str, config_dir: str | None, text_encoders: tuple[str, ...],
                  skip_fp16: bool, as_json: bool) -> None:
    """Tell whether VAE fits BASE: match, mismatch (another latent space) or incompatible
    (another architecture), with the evidence. Exits 1 unless the verdict is match.

    Example: sdkit vae check model.safetensors kl-f8-anime2.ckpt --json
    """
    from contextlib import nullcontext

    require_inputs(base, vae, config_dir, *text_encoders)
    from sdkit.runtime.vae_check import check_vae

    if not (ctx.obj or {}).get("debug"):
        quiet_peer_logs()
    console = SafeConsole(stderr=True)
    spinning = console.is_terminal and not _quiet(ctx, as_json)
    with console.status("loading the base model and measuring") if spinning else nullcontext():
        report = check_vae(base, vae, config=config_dir, fp16=not skip_fp16, text_encoders=text_encoders)
    if as_json:
        _print_json(report.to_json())
    else:
        _render_check(report)
    if report.verdict != "match":
        sys.exit(1)


def _render_check(report: Any) -> None:
    from sdkit.cli.tables import Table

    console = SafeConsole()
    known = report.candidate.get("known")
    console.print(Text.assemble("verdict: ", styled(report.verdict, "bold"),
                                shown(f"  ({known['name']}, {known['family']})") if known else ""))
    for reason in report.reasons:
        console.print(f"• {reason}")
    table = Table("evidence", "value", show_header=False)
    if report.scaling:
        table.add_row("scaling factor", f"{report.scaling['factor']} ({report.scaling['source']}); measured "
                                        f"1/std {report.scaling['measured_candidate']}")
    if report.denoising:
        scores = ", ".join(f"{k}={v}" for k, v in report.denoising.items() if k.endswith(("score", "ratio")))
        table.add_row("denoising", scores)
    if report.reconstruction:
        table.add_row("reconstruction PSNR", ", ".join(f"{k}={v}" for k, v in report.reconstruction.items()))
    fp16 = report.fp16
    table.add_row("fp16", fp16["status"] + (f": {fp16['advice']}" if fp16.get("advice") else "")
                  + (f" ({fp16['reason']})" if fp16.get("reason") else ""))
    console.print(table)
