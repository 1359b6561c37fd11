"""`sdkit split` / `sdkit join`: an all-in-one checkpoint and ComfyUI's separate parts."""

from __future__ import annotations

import json

import click

from sdkit.cli.common import human_bytes, is_quiet, progress_bar
from sdkit.cli.main import cli
from sdkit.cli.preflight import (
    MODEL_KINDS,
    SAFETENSORS,
    ModelInput,
    require_inputs,
    require_output,
)
from sdkit.cli.terminal import SafeConsole


@cli.command("split")
@click.argument("checkpoint", type=ModelInput(*MODEL_KINDS))
@click.option("--output", "-o", required=True, type=click.Path(path_type=str),
              help="Folder to create, with diffusion_models/, text_encoders/ and vae/ inside.")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.pass_context
def split_command(ctx: click.Context, checkpoint: str, output: str, force: bool, as_json: bool) -> None:
    """Write a checkpoint's diffusion model, text encoders and VAE each on its own (ComfyUI folders).

    Parts go into FOLDER/diffusion_models/, text_encoders/ and vae/, named as ComfyUI's loaders
    read them; bytes are copied as stored.

    Example: sdkit split flux1-dev-aio.safetensors -o parts/
    """
    require_inputs(checkpoint)
    require_output(output, (checkpoint,), force=force)
    from sdkit.ops.parts.split import left_out_note, split_checkpoint

    console = SafeConsole(stderr=True)
    with progress_bar(console, is_quiet(ctx) or as_json, "splitting") as advance:
        result = split_checkpoint(checkpoint, output, force=force, progress=advance)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
        return
    if is_quiet(ctx):
        return
    console.print(f"wrote {result.output} ({len(result.parts)} parts)", markup=False, highlight=False)
    for part in result.parts:
        console.print(f"• {part['path']}: {part['kind']} {part['name']} ({part['tensors']} tensors, "
                      f"{human_bytes(part['bytes'])})", markup=False, highlight=False, soft_wrap=True)
    note = left_out_note(result)
    if note:
        console.print(f"• {note}", markup=False, highlight=False, soft_wrap=True)


@cli.command("join")
@click.argument("parts", nargs=-1, required=True, type=ModelInput("unet", "text-encoder", "vae"))
@click.option("--output", "-o", required=True, type=click.Path(path_type=str), help="Output .safetensors file.")
@click.option("--force", is_flag=True, help="Overwrite the output if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.pass_context
def join_command(ctx: click.Context, parts: tuple[str, ...], output: str, force: bool, as_json: bool) -> None:
    """Assemble one checkpoint ComfyUI loads from a diffusion model, its text encoders and VAE.

    PARTS: a transformer diffusion model, its text encoders and its VAE; which ones the
    family needs is checked and missing ones are named.

    Example: sdkit join flux1-dev.safetensors clip_l.safetensors t5xxl_fp16.safetensors ae.safetensors -o flux1-dev-aio.safetensors
    """
    require_inputs(*parts)
    require_output(output, parts, force=force, suffixes=SAFETENSORS)
    from sdkit.ops.parts.join import join_parts

    console = SafeConsole(stderr=True)
    with progress_bar(console, is_quiet(ctx) or as_json, "joining") as advance:
        result = join_parts(list(parts), output, force=force, progress=advance)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
        return
    if is_quiet(ctx):
        return
    console.print(f"wrote {result.output} ({result.family}, {result.tensors} tensors, {human_bytes(result.bytes)})",
                  markup=False, highlight=False)
    for part in result.parts:
        console.print(f"• {part['kind']}: {part['name']} ({part['path']})", markup=False, highlight=False,
                      soft_wrap=True)
