"""`sdkit sample`: draw pictures from any model file with any stack of adapters."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from sdkit.cli.common import quiet_peer_logs
from sdkit.cli.main import cli
from sdkit.cli.preflight import require_inputs, require_output
from sdkit.cli.terminal import SafeConsole, echo, shown
from sdkit.runtime.sample.png import picture_paths
from sdkit.runtime.sample.scheduler import SAMPLERS

_DEVICES = ("auto", "cpu", "cuda")
_DTYPES = ("auto", "fp32", "fp16", "bf16")


@contextmanager
def _step_bar(quiet: bool) -> Iterator[Any]:
    """A rich progress bar over sampling steps on a terminal; None otherwise."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    console = SafeConsole(stderr=True)
    if quiet or not console.is_terminal:
        yield None
        return
    with Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("loading", total=None)

        def update(label: str, done: int, total: int) -> None:
            bar.update(task, description=shown(label), completed=done, total=total)
        yield update


@cli.command("sample")
@click.argument("model", type=click.Path(path_type=str))
@click.option("--prompt", "-p", "prompts", multiple=True, required=True,
              help="Prompt (repeatable); A1111 tags <lora:NAME:W>, <lyco:NAME:W>, <hypernet:NAME:W> "
                   "and embedding names are understood, and on SD1/SD2/SDXL A1111's syntax: (word:1.2), "
                   "[word], BREAK, [from:to:when], [a|b].")
@click.option("--negative", "-n", default="", help="Negative prompt (same syntax).")
@click.option("--steps", type=int, default=20, show_default=True)
@click.option("--cfg", type=float, default=7.0, show_default=True, help="Guidance scale.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the first picture; -1 picks one.")
@click.option("--width", type=int, help="Width in pixels (default: the model's native size).")
@click.option("--height", type=int, help="Height in pixels (default: the model's native size).")
@click.option("--batch", type=int, default=1, show_default=True, help="Pictures per prompt (seeds SEED, SEED+1, ...).")
@click.option("--scheduler", type=click.Choice(list(SAMPLERS)), default=None,
              help="Sampler (default: euler-a; euler, the flow-matching one, for FLUX.1).")
@click.option("--clip-skip", type=int, default=1, show_default=True,
              help="A1111 CLIP skip: 1 = last layer, 2 = penultimate.")
@click.option("--lora", "loras", multiple=True, metavar="FILE[:W]", help="LoRA / LyCORIS file or library name.")
@click.option("--embedding", "embeddings", multiple=True, metavar="FILE[:TOKEN]",
              help="Textual-inversion file or library name; TOKEN defaults to the file's own.")
@click.option("--hypernet", "hypernets", multiple=True, metavar="FILE[:W]",
              help="A1111 hypernetwork file or library name.")
@click.option("--vae", metavar="FILE", help="Another VAE (file, diffusers folder or library name); "
              "for a FLUX.1 diffusion model alone, its VAE (ae.safetensors).")
@click.option("--text-encoder", "text_encoders", multiple=True, metavar="FILE",
              help="For a FLUX.1 diffusion model alone: its text encoder files (clip_l, t5xxl); repeatable.")
@click.option("--config", "config", type=click.Path(file_okay=False, path_type=str),
              help="Local diffusers folder of the model's family (configs and tokenizers).")
@click.option("--library", type=click.Path(file_okay=False, path_type=str),
              help="WebUI folder (A1111 or ComfyUI layout) to find adapters by name.")
@click.option("--device", type=click.Choice(_DEVICES), default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(_DTYPES), default="auto", show_default=True,
              help="auto: fp16 on CUDA, fp32 on CPU.")
@click.option("--grid", is_flag=True, help="One picture: a row per prompt, a column per seed; each picture is also written on its own (OUT-0, OUT-1, …).")
@click.option("--xy", metavar="PARAM=V1,V2,...",
              help="One picture: a column per value of lora_strength, steps, cfg, seed, clip_skip or scheduler.")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False, path_type=str),
              help="PNG to write (OUT-0.png, OUT-1.png, ... for several pictures).")
@click.option("--force", is_flag=True, help="Overwrite existing outputs.")
@click.option("--json", "as_json", is_flag=True, help="Report as one JSON object.")
@click.pass_context
def sample_command(ctx: click.Context, model: str, prompts: tuple[str, ...], negative: str, steps: int,
                   cfg: float, seed: int, width: int | None, height: int | None, batch: int, scheduler: str | None,
                   clip_skip: int, loras: tuple[str, ...], embeddings: tuple[str, ...],
                   hypernets: tuple[str, ...], vae: str | None, text_encoders: tuple[str, ...],
                   config: str | None, library: str | None,
                   device: str, dtype: str, grid: bool, xy: str | None, output: str, force: bool,
                   as_json: bool) -> None:
    """Draw pictures from a checkpoint or diffusers folder; every PNG carries A1111's
    generation parameters.

    Example: sdkit sample model.safetensors -p "a red circle <lora:style:0.8>" --library ~/webui -o out.png
    """
    from sdkit.runtime.sample.grid import parse_axis

    axis = parse_axis(xy) if xy else None
    require_inputs(model, config, library, *text_encoders)
    for path in picture_paths(output, len(prompts), batch, one_picture=grid or axis is not None):
        require_output(path, (model,), force=force)
    from sdkit.runtime.sample.plan import AdapterArgs
    from sdkit.runtime.sample.run import SampleJob, run_sample
    from sdkit.runtime.sample.sampler import Settings

    if seed == -1:
        seed = random.randrange(4294967294)  # A1111's range for a random seed
    settings = Settings(steps=steps, cfg=cfg, seed=seed, width=width, height=height, scheduler=scheduler,
                        clip_skip=clip_skip, negative=negative)
    job = SampleJob(model=model, prompts=list(prompts), settings=settings, batch=batch,
                    adapters=AdapterArgs(loras, embeddings, hypernets), library=library, config=config,
                    vae=vae, text_encoders=text_encoders, device=device, dtype=dtype, grid=grid, xy=axis)
    quiet = bool((ctx.obj or {}).get("quiet"))
    if not (ctx.obj or {}).get("debug"):
        quiet_peer_logs()
    with _step_bar(quiet or as_json) as progress:
        result = run_sample(job, output, overwrite=force, progress=progress)
    if as_json:
        click.echo(json.dumps({"outputs": [str(p) for p in result.outputs],
                               "seeds": [s.seed for s in result.samples],
                               "parameters": result.samples[0].parameters, "notes": result.notes,
                               "warnings": result.warnings}, indent=2))
        return
    for warning in result.warnings:  # shown even with --quiet: the picture lacks an asked-for adapter
        echo(f"warning: {warning}", err=True)
    if quiet:
        return
    for note in result.notes:
        echo(f"note: {note}", err=True)
    for path in result.outputs:
        echo(path)
