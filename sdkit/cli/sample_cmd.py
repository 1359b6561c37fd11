"""`sdkit sample`: draw pictures from any model file with any stack of adapters."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
from click.core import ParameterSource

from sdkit.cli.common import quiet_peer_logs, split_parts
from sdkit.cli.main import cli
from sdkit.cli.preflight import MODEL_KINDS, ModelInput, require_inputs, require_output
from sdkit.cli.terminal import SafeConsole, echo, shown
from sdkit.errors import SdkitError
from sdkit.runtime.sample.png import picture_paths

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


_HIRES_UPSCALERS = "Latent, Latent (bicubic), Latent (nearest-exact), …, Lanczos, Nearest"


@cli.command("sample")
@click.argument("model", type=ModelInput(*MODEL_KINDS))
@click.option("--prompt", "-p", "prompts", multiple=True,
              help="Prompt (repeatable); A1111 tags <lora:NAME:W>, <lyco:NAME:W>, <hypernet:NAME:W> "
                   "and embedding names are understood, and on SD1/SD2/SDXL A1111's syntax: (word:1.2), "
                   "[word], BREAK, [from:to:when], [a|b].")
@click.option("--negative", "-n", default="", help="Negative prompt (same syntax).")
@click.option("--steps", type=int, default=20, show_default=True)
@click.option("--cfg", type=float, default=7.0, show_default=True, help="Guidance scale.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the first picture; -1 picks one.")
@click.option("--width", type=int, help="Width in pixels (default: the init image's, else the model's native size).")
@click.option("--height", type=int, help="Height in pixels (default: the init image's, else the model's native size).")
@click.option("--batch", type=int, default=1, show_default=True, help="Pictures per prompt (seeds SEED, SEED+1, ...).")
@click.option("--sampler", "--scheduler", "scheduler", metavar="NAME", default=None,
              help="Sampler: sdkit (euler-a, dpm++2m-karras, …), A1111 (\"DPM++ 2M Karras\", \"Euler a\", …) "
                   "or ComfyUI (dpmpp_2m, …) name (default: euler-a; euler for transformer families: FLUX.1, SD3, …).")
@click.option("--schedule", metavar="TYPE", default=None,
              help="Schedule type: Automatic, Uniform, Karras, Exponential, SGM Uniform, Simple, Normal, DDIM, "
                   "Beta (A1111 labels or ComfyUI scheduler names).")
@click.option("--clip-skip", type=int, default=1, show_default=True,
              help="A1111 CLIP skip: 1 = last layer, 2 = penultimate.")
@click.option("--init-image", metavar="PNG", type=click.Path(dir_okay=False, path_type=str),
              help="img2img: start from this picture.")
@click.option("--denoise", type=float, default=0.75, show_default=True,
              help="img2img: A1111's denoising strength (about steps * denoise steps run; 1 ignores the picture).")
@click.option("--hires-scale", type=float, help="Hires fix: draw again at this scale of the first picture.")
@click.option("--hires-steps", type=int, default=0, show_default=True,
              help="Hires fix: steps of the second pass (0: --steps).")
@click.option("--hires-denoise", type=float, default=0.7, show_default=True,
              help="Hires fix: denoising strength of the second pass.")
@click.option("--hires-upscaler", default="Latent", show_default=True, metavar="NAME",
              help=f"Hires fix: how the first picture is enlarged ({_HIRES_UPSCALERS}).")
@click.option("--from-png", metavar="PNG", type=click.Path(dir_okay=False, path_type=str),
              help="Draw with the settings of an A1111 or ComfyUI PNG; options given here override its own.")
@click.option("--lora", "loras", multiple=True, metavar="FILE[:W]", type=ModelInput("lora", strength=True),
              help="LoRA / LyCORIS file or library name.")
@click.option("--embedding", "embeddings", multiple=True, metavar="FILE[:TOKEN]",
              help="Textual-inversion file or library name; TOKEN defaults to the file's own.")
@click.option("--hypernet", "hypernets", multiple=True, metavar="FILE[:W]",
              help="A1111 hypernetwork file or library name.")
@click.option("--vae", metavar="FILE", type=ModelInput("vae"), help="Another VAE (file, diffusers folder or library name); "
              "for a transformer diffusion model alone (FLUX.1, SD3, Chroma, Z-Image, …), its VAE.")
@click.option("--text-encoder", "text_encoders", multiple=True, metavar="FILE", type=ModelInput("text-encoder"),
              help="For a transformer diffusion model alone: its text encoder files (clip_l, clip_g, t5xxl, "
                   "qwen_3_4b, … in any order; FLUX.1's default: found in the library); repeatable.")
@click.option("--config", "config", type=click.Path(file_okay=False, path_type=str),
              help="Local diffusers folder of the model's family (configs and tokenizers).")
@click.option("--library", type=click.Path(file_okay=False, path_type=str),
              help="WebUI folder (A1111 or ComfyUI layout) to find adapters by name, and the text encoders and VAE "
                   "a diffusion model alone lacks (those also in sdkit --library or $SDKIT_LIBRARY).")
@click.option("--device", type=click.Choice(_DEVICES), default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(_DTYPES), default="auto", show_default=True,
              help="auto: fp16 on CUDA, fp32 on CPU.")
@click.option("--grid", is_flag=True, help="One picture: a row per prompt, a column per seed; each picture is also written on its own (OUT-0, OUT-1, …).")
@click.option("--xy", metavar="PARAM=V1,V2,...",
              help="One picture: a column per value of lora_strength, steps, cfg, seed, clip_skip, scheduler, "
                   "schedule or denoise.")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False, path_type=str),
              help="PNG to write (OUT-0.png, OUT-1.png, ... for several pictures).")
@click.option("--force", is_flag=True, help="Overwrite existing outputs.")
@click.option("--json", "as_json", is_flag=True, help="Report as one JSON object.")
@click.pass_context
def sample_command(ctx: click.Context, **options: Any) -> None:
    """Draw pictures from a checkpoint or diffusers folder; every PNG carries A1111's
    generation parameters.

    Example: sdkit sample model.safetensors -p "a red circle <lora:style:0.8>" --library ~/webui -o out.png
    """
    from sdkit.runtime.sample.grid import parse_axis

    o = options
    axis = parse_axis(o["xy"]) if o["xy"] else None
    require_inputs(o["model"], o["config"], o["library"], o["init_image"], o["from_png"], *o["text_encoders"])
    replay = _apply_png(ctx, o) if o["from_png"] else None
    if not o["prompts"]:
        raise SdkitError("no prompt given (--prompt TEXT or --from-png PNG)")
    for path in picture_paths(o["output"], len(o["prompts"]), o["batch"], one_picture=o["grid"] or axis is not None):
        require_output(path, (o["model"], o["init_image"], o["from_png"]), force=o["force"])
    from sdkit.cli.preflight import configured_library
    from sdkit.runtime.sample.plan import AdapterArgs
    from sdkit.runtime.sample.run import SampleJob, run_sample

    vae, text_encoders = split_parts(o["model"], o["vae"], o["text_encoders"], o["library"] or configured_library())
    job = SampleJob(model=o["model"], prompts=list(o["prompts"]), settings=_settings(o), batch=o["batch"],
                    adapters=AdapterArgs(o["loras"], o["embeddings"], o["hypernets"]), library=o["library"],
                    config=o["config"], vae=vae, text_encoders=text_encoders, device=o["device"],
                    dtype=o["dtype"], grid=o["grid"], xy=axis)
    quiet = bool((ctx.obj or {}).get("quiet"))
    if not (ctx.obj or {}).get("debug"):
        quiet_peer_logs()
    with _step_bar(quiet or o["as_json"]) as progress:
        result = run_sample(job, o["output"], overwrite=o["force"], progress=progress)
    notes = _replay_notes(replay, o["model"], result) + result.notes
    if o["as_json"]:
        click.echo(json.dumps({"outputs": [str(p) for p in result.outputs],
                               "seeds": [s.seed for s in result.samples],
                               "parameters": result.samples[0].parameters, "notes": notes,
                               "warnings": result.warnings}, indent=2))
        return
    for warning in result.warnings:  # shown even with --quiet: the picture lacks an asked-for adapter
        echo(f"warning: {warning}", err=True)
    if quiet:
        return
    for note in notes:
        echo(f"note: {note}", err=True)
    for path in result.outputs:
        echo(path)


def _settings(o: dict[str, Any]) -> Any:
    from sdkit.runtime.sample.img2img import Hires
    from sdkit.runtime.sample.sampler import Settings

    seed = random.randrange(4294967294) if o["seed"] == -1 else o["seed"]  # A1111's range for a random seed
    hires = None if o["hires_scale"] is None else \
        Hires(o["hires_scale"], o["hires_steps"], o["hires_denoise"], o["hires_upscaler"])
    return Settings(steps=o["steps"], cfg=o["cfg"], seed=seed, width=o["width"], height=o["height"],
                    scheduler=o["scheduler"], schedule=o["schedule"], clip_skip=o["clip_skip"],
                    negative=o["negative"], init_image=o["init_image"], denoise=o["denoise"], hires=hires)


def _apply_png(ctx: click.Context, options: dict[str, Any]) -> Any:
    """Take into `options` what the `--from-png` PNG states, except options given on the
    command line; the PNG's `Replay`."""
    from sdkit.runtime.sample.replay import read_replay

    replay = read_replay(options["from_png"])
    given = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    for name, value in replay.options.items():
        if ctx.get_parameter_source(name) not in given:
            options[name] = value
    return replay


def _replay_notes(replay: Any, model: str, result: Any) -> list[str]:
    from sdkit.runtime.sample.replay import model_note

    if replay is None:
        return []
    note = model_note(replay, model, result.samples[0].parameters)
    return [*replay.notes, *([note] if note else [])]
