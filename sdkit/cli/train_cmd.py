"""`sdkit train` and `sdkit verify`: train an adapter or a fine-tune; measure its effect."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import click

from sdkit.cli.common import is_quiet, quiet_peer_logs, split_parts
from sdkit.cli.main import cli
from sdkit.cli.preflight import MODEL_KINDS, ModelInput, configured_library, require_inputs, require_output
from sdkit.cli.terminal import SafeConsole, echo
from sdkit.cli.train_options import MethodCommand, refuse_foreign_options, with_kohya_options
from sdkit.errors import SdkitError
from sdkit.runtime.train.config import (CACHES, CROPS, DREAMBOOTH_FORMATS, LORA_LAYOUTS, LR_SCHEDULERS, METHODS,
                                        OPTIMIZERS, PRECISIONS, PREDICTIONS, SAVE_PRECISIONS, TIMESTEP_SAMPLINGS,
                                        check_config)

_PATH = click.Path(path_type=Path)


def _ratio_range(text: str | None) -> tuple[float | None, float | None]:
    if not text:
        return None, None
    low, sep, high = text.partition(":")
    try:
        return (float(low) if low else None), (float(high) if high else None)
    except ValueError:
        raise SdkitError(f"--aspect-range {text!r}: expected MIN:MAX width/height ratios, e.g. 0.5:2") from None


def _numbers(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise SdkitError(f"{what} {text!r}: expected comma-separated numbers, e.g. 1,2,1") from None


@contextmanager
def _train_progress(quiet: bool) -> Iterator[Any]:
    """A rich bar per phase (loss, it/s and time left while training) on a terminal."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = SafeConsole(stderr=True)
    if quiet:
        yield None
        return
    if not console.is_terminal:  # a log file or a pipe: lines, not a redrawn bar
        yield ProgressLines(echo_line=lambda line: echo(line, err=True))
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[loss]}"), TextColumn("{task.fields[rate]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        tasks: dict[str, Any] = {}

        def update(event: Any) -> None:
            if event.phase not in tasks:
                tasks[event.phase] = bar.add_task(event.phase, total=event.total, loss="", rate="")
            task = tasks[event.phase]
            fields = {}
            if event.loss is not None:
                fields["loss"] = f"loss {event.loss:.4f}"
                speed = next(t for t in bar.tasks if t.id == task).speed
                fields["rate"] = f"{speed:.2f} it/s" if speed else ""
            bar.update(task, completed=event.done, total=event.total, **fields)
        yield update


class ProgressLines:
    """Training progress as plain lines for logs: the training phase every twentieth of its
    steps and at its end (step, loss, learning rate, steps per second, time left); the
    other phases when they finish."""

    def __init__(self, echo_line: Callable[[str], None], clock: Callable[[], float] = time.monotonic,
                 lines: int = 20) -> None:
        self.echo_line, self.clock, self.lines = echo_line, clock, lines
        self.started: dict[str, tuple[float, int]] = {}

    def __call__(self, event: Any) -> None:
        now = self.clock()
        start, first = self.started.setdefault(event.phase, (now, event.done))
        if event.phase != "train":
            if event.done >= event.total > 0:
                self.echo_line(f"{event.phase}: {event.done}/{event.total} done in {now - start:.1f} s")
            return
        every = max(1, event.total // self.lines)
        if event.done % every and event.done != event.total:
            return
        self.echo_line(self._train_line(event, now - start, event.done - first))

    @staticmethod
    def _train_line(event: Any, elapsed: float, steps: int) -> str:
        rate = steps / elapsed if elapsed > 0 and steps else None
        parts = [f"step {event.done}/{event.total}"]
        if event.loss is not None:
            parts.append(f"loss {event.loss:.4f}")
        if event.lr is not None:
            parts.append(f"lr {event.lr:.2e}")
        if rate:
            left = (event.total - event.done) / rate
            parts += [f"{rate:.2f} it/s", f"ETA {int(left // 60)}:{int(left % 60):02d}"]
        return "train: " + " · ".join(parts)


@cli.command("train", cls=MethodCommand)
@click.argument("method", type=click.Choice(METHODS))
@click.option("--base", required=True, type=ModelInput(*MODEL_KINDS, as_path=True), help="Model to train on: a checkpoint file or diffusers folder.")
@click.option("--data", "data_dir", type=_PATH,
              help="Folder of images with captions (sidecar .txt/.caption, metadata.csv or metadata.jsonl), "
                   "or of kohya N_concept subfolders (required unless --dataset-config).")
@click.option("--output", "-o", required=True, type=_PATH,
              help="File to write (.safetensors; .pt for hypernetworks or A1111 embeddings; a folder for "
                   "DreamBooth --format diffusers).")
@click.option("--config", "config_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Local diffusers folder of the base's family (tokenizers, configs).")
@click.option("--vae", type=ModelInput("vae", as_path=True), metavar="FILE",
              help="For a FLUX.1 diffusion model alone: its VAE (ae.safetensors; default: found in the library).")
@click.option("--text-encoder", "text_encoders", multiple=True, type=ModelInput("text-encoder", as_path=True),
              metavar="FILE", help="For a FLUX.1 diffusion model alone: its text encoder files (clip_l, t5xxl; "
              "default: found in the library); repeatable.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
# data
@click.option("--resolution", type=int, help="Training side in pixels (default: the model's native size).")
@click.option("--no-buckets", is_flag=True, help="Square crops only, no aspect-ratio buckets.")
@click.option("--bucket-step", type=int, help="Bucket side step (default: VAE factor x UNet downsampling).")
@click.option("--crop", type=click.Choice(CROPS), default="center", show_default=True,
              help="random: a new crop at every load (needs --cache-latents off, as in kohya).")
@click.option("--min-width", type=int, default=0, show_default=True, help="Drop narrower images.")
@click.option("--min-height", type=int, default=0, show_default=True, help="Drop lower images.")
@click.option("--aspect-range", metavar="MIN:MAX", help="Keep images whose width/height ratio is in this range.")
@click.option("--cache-latents", type=click.Choice(CACHES), default="memory", show_default=True,
              help="Run the VAE once per picture and keep the latents in memory or on disk.")
@click.option("--cache-dir", type=_PATH,
              help="Folder of --cache-latents disk (default: DATA/.sdkit-latents).")
@click.option("--caption-dropout", type=float, default=0.0, show_default=True,
              help="Probability of training a sample with an empty caption.")
@click.option("--repeats", type=int, default=1, show_default=True, help="Times each image appears per epoch.")
@click.option("--trigger", help="Word put in front of every caption.")
# optimisation
@click.option("--steps", type=int, default=500, show_default=True, help="Optimizer steps.")
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--lr", type=float, default=1e-4, show_default=True, help="Learning rate.")
@click.option("--text-encoder-lr", type=float, help="Learning rate of trained text encoders (default: --lr).")
@click.option("--lr-scheduler", type=click.Choice(LR_SCHEDULERS), default="constant", show_default=True)
@click.option("--warmup-steps", type=int, default=0, show_default=True)
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="adamw", show_default=True)
@click.option("--weight-decay", type=float, default=1e-2, show_default=True)
@click.option("--max-grad-norm", type=float, default=1.0, show_default=True, help="Gradient clipping (0: off).")
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute activations to save memory.")
@click.option("--prediction-type", type=click.Choice(PREDICTIONS), help="Override the base's scheduler config.")
@click.option("--min-snr-gamma", type=float, help="Min-SNR loss weighting (5 is usual).")
@click.option("--noise-offset", type=float, default=0.0, show_default=True)
@click.option("--timestep-sampling", type=click.Choice(TIMESTEP_SAMPLINGS),
              help="FLUX.1 noise levels: uniform over the scheduler's sigmas (default), logit-normal, or "
                   "kohya's shift.")
@click.option("--flow-shift", type=float, help="Shift of --timestep-sampling shift (default 3.0, kohya's).")
# methods
@click.option("--rank", type=int, default=4, show_default=True, help="LoRA / LoHa / LoKr rank.")
@click.option("--alpha", type=float, help="Network alpha (default: the rank).")
@click.option("--dropout", type=float, default=0.0, show_default=True, help="LoRA dropout (LoHa/LoKr: rank dropout).")
@click.option("--train-text-encoder", is_flag=True, help="Also train the text encoder(s) (networks, DreamBooth).")
@click.option("--layout", type=click.Choice(LORA_LAYOUTS), default="kohya", show_default=True,
              help="LoRA file names: kohya (A1111, ComfyUI, Forge) or diffusers (peft names).")
@click.option("--token", help="Textual-inversion trigger word (default: the output's file name).")
@click.option("--init-word", default="*", show_default=True, help="Word the new vectors start from.")
@click.option("--vectors", type=int, default=1, show_default=True, help="Vectors per embedding.")
@click.option("--layer-structure", default="1,2,1", show_default=True, help="Hypernetwork layer widths.")
@click.option("--activation", default="linear", show_default=True, help="Hypernetwork activation (A1111 names).")
@click.option("--layer-norm", is_flag=True, help="Hypernetwork layer norm.")
@click.option("--hypernet-dropout", is_flag=True, help="Hypernetwork dropout (A1111's use_dropout).")
@click.option("--weight-init", default="Normal", show_default=True, help="Hypernetwork weight initialisation.")
@click.option("--class-prompt", help="DreamBooth prior preservation: prompt of the class pictures.")
@click.option("--class-dir", type=_PATH, help="Folder of class pictures (drawn there when too few).")
@click.option("--num-class-images", type=int, help="Class pictures for prior preservation (default: 50).")
@click.option("--prior-loss-weight", type=float,
              help="Weight of the class or regularization pictures' loss (default: 1.0).")
@click.option("--format", "output_format", type=click.Choice(DREAMBOOTH_FORMATS), default="single-file",
              show_default=True, help="DreamBooth output: one checkpoint file or a diffusers folder.")
# run
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
              help="auto: bf16 where the GPU has it, else fp16 with loss scaling; fp32 on CPU.")
@click.option("--device", type=click.Choice(("auto", "cpu", "cuda")), default="auto", show_default=True)
@click.option("--save-precision", type=click.Choice(SAVE_PRECISIONS),
              help="dtype of the written tensors (default: fp16 for checkpoints, fp32 for adapters; "
                   "hypernetworks are always fp32).")
@click.option("--save-every", type=int, default=0, show_default=True,
              help="Save the training state every N steps (for --resume).")
@click.option("--state-dir", type=_PATH, help="Where the state goes (default: OUTPUT.state).")
@click.option("--resume", type=_PATH, help="Continue from a saved training state.")
@click.option("--preview-every", type=int, default=0, show_default=True, help="Sample previews every N steps.")
@click.option("--preview-prompt", "preview_prompts", multiple=True, help="Preview prompt (repeatable).")
@click.option("--preview-seeds", type=int, default=1, show_default=True, help="Seeds per preview prompt.")
@click.option("--sample-steps", type=int, default=20, show_default=True,
              help="Sampling steps of previews and class pictures.")
# kohya sd-scripts
@click.option("--dataset-config", type=_PATH, help="kohya dataset TOML ([general], [[datasets]], "
              "[[datasets.subsets]]), instead of --data.")
@click.option("--reg-data", type=_PATH, help="Regularization pictures in kohya N_class subfolders (networks).")
@click.option("--shuffle-caption", is_flag=True, help="Shuffle the comma-separated tags of each caption.")
@click.option("--keep-tokens", type=int, default=0, show_default=True,
              help="With --shuffle-caption: the first N tags stay in place.")
@click.option("--flip-aug", is_flag=True, help="Train each picture mirrored half the time.")
@click.option("--unet-lr", type=float, help="Learning rate of the UNet (default: --lr).")
@click.option("--conv-dim", type=int, help="Also train 3x3 convolutions at this rank (kohya's LoCon conv_dim).")
@click.option("--conv-alpha", type=float, help="Alpha of the convolutions (default: 1).")
@click.option("--preset", help="LyCORIS preset of LoHa / LoKr targets: full, attn-only, attn-mlp, "
              "unet-transformer-only, unet-convblock-only (default: kohya's networks.lora layers).")
@click.option("--save-every-n-epochs", type=int, default=0, show_default=True,
              help="Also write OUT-00000N.safetensors after every N epochs.")
@click.option("--log-dir", type=_PATH, help="Write loss and learning rates per step for TensorBoard here.")
@click.option("--metadata-title", help="modelspec.title of the output (default: its name).")
@click.option("--metadata-author", help="modelspec.author of the output.")
@click.option("--metadata-description", help="modelspec.description of the output.")
@click.option("--json", "as_json", is_flag=True, help="Report as one JSON object.")
@click.pass_context
def train_command(ctx: click.Context, method: str, base: Path, data_dir: Path, output: Path, **options: Any) -> None:
    """Train a LoRA, LoHa, LoKr, textual inversion, hypernetwork or DreamBooth fine-tune.

    Example: sdkit train lora --base toy-sd1.safetensors --data pictures/ -o sks.safetensors --steps 300
    """
    refuse_foreign_options(ctx, method)
    require_inputs(base, options["config_dir"], options["dataset_config"], options["vae"], *options["text_encoders"])
    inputs = (base, data_dir, options["config_dir"], options["resume"], options["class_dir"],
              options["dataset_config"], options["reg_data"], options["vae"], *options["text_encoders"])
    require_output(output, inputs, force=options["force"])
    config = _train_config(method, base, data_dir, output, options)
    check_config(config)  # the output's suffix first: torch only for a hypernetwork's options
    vae, text_encoders = split_parts(base, config.vae, config.text_encoders, configured_library())
    config = replace(config, vae=vae, text_encoders=tuple(text_encoders))
    from sdkit.runtime.train import train

    if not (ctx.obj or {}).get("debug"):
        quiet_peer_logs()
    with _train_progress(is_quiet(ctx) or options["as_json"]) as progress:
        result = train(config, progress)
    if not result.main_process:
        return
    if options["as_json"]:
        click.echo(json.dumps({"outputs": [str(p) for p in result.outputs], "record": str(result.record),
                               "loss_curve": str(result.loss_curve), "steps": result.steps,
                               "resumed_from": result.resumed_from, "precision": result.precision,
                               "final_loss": result.losses[-1] if result.losses else None,
                               "timings": result.timings, "notes": result.notes}))
        return
    if is_quiet(ctx):
        return
    for note in result.notes:
        echo(f"note: {note}", err=True)
    loss = f", last loss {result.losses[-1]:.4f}" if result.losses else ""
    echo(f"trained {config.method} for {result.steps} steps ({result.precision}{loss}) -> "
         f"{', '.join(str(p) for p in result.outputs)}")
    echo(f"record: {result.record}  loss curve: {result.loss_curve}")


def _train_config(method: str, base: Path, data_dir: Path, output: Path, o: dict[str, Any]) -> Any:
    from sdkit.runtime.train import (
        DataOptions,
        DreamBoothOptions,
        EmbeddingOptions,
        HypernetOptions,
        LossOptions,
        NetworkOptions,
        OptimOptions,
        RunOptions,
        TrainConfig,
    )

    low, high = _ratio_range(o["aspect_range"])
    data = DataOptions(data_dir, o["resolution"], not o["no_buckets"], o["bucket_step"], o["crop"], o["min_width"],
                       o["min_height"], low, high, o["cache_latents"], o["cache_dir"], o["caption_dropout"],
                       o["repeats"], o["trigger"])
    optim = OptimOptions(o["steps"], o["batch_size"], o["grad_accum"], o["lr"], o["text_encoder_lr"],
                         o["lr_scheduler"], o["warmup_steps"], o["optimizer"], o["weight_decay"], o["max_grad_norm"],
                         o["gradient_checkpointing"])
    config = TrainConfig(
        method, base, output, data, o["config_dir"], optim,
        LossOptions(o["prediction_type"], o["min_snr_gamma"], o["noise_offset"], o["timestep_sampling"],
                    o["flow_shift"]),
        NetworkOptions(o["rank"], o["alpha"], o["dropout"], o["train_text_encoder"], o["layout"]),
        EmbeddingOptions(o["token"], o["init_word"], o["vectors"]),
        HypernetOptions(_numbers(o["layer_structure"], "--layer-structure"), o["activation"], o["layer_norm"],
                        o["hypernet_dropout"], o["weight_init"]),
        DreamBoothOptions(o["class_prompt"], o["class_dir"], o["num_class_images"], o["prior_loss_weight"],
                          o["train_text_encoder"], o["output_format"]),
        RunOptions(o["seed"], o["precision"], o["device"], o["save_precision"], o["save_every"], o["state_dir"],
                   o["resume"], o["preview_every"], tuple(o["preview_prompts"]), o["preview_seeds"],
                   o["sample_steps"], o["force"]),
        vae=o["vae"], text_encoders=tuple(o["text_encoders"]))
    return with_kohya_options(config, o)


@cli.command("verify")
@click.argument("adapter", type=ModelInput("lora", "embedding", "hypernetwork", as_path=True))
@click.option("--base", required=True, type=ModelInput(*MODEL_KINDS, as_path=True), help="The model the adapter was trained on.")
@click.option("--concept", required=True, help="Prompt that should show the concept (name embeddings by trigger).")
@click.option("--expect", required=True, metavar="LABEL[/LABEL...]",
              help="Labels the scorer must read in a picture, e.g. red/circle.")
@click.option("--seeds", type=int, default=8, show_default=True, help="Pictures per side (seeds SEED, SEED+1, ...).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--min-rate", type=float, default=0.8, show_default=True,
              help="Fraction of pictures with the adapter that must show the concept.")
@click.option("--max-base-rate", type=float, default=0.2, show_default=True,
              help="Fraction of pictures without the adapter that may show it.")
@click.option("--scorer", metavar="MODULE|FILE.py:CALLABLE",
              help="picture -> label(s): module:callable (the current folder is searched) or "
                   "path/to/file.py:callable (default: the toy colour/shape scorer).")
@click.option("--strength", type=float, default=1.0, show_default=True, help="LoRA / hypernetwork strength.")
@click.option("--steps", type=int, default=20, show_default=True)
@click.option("--cfg", type=float, default=7.0, show_default=True)
@click.option("--size", type=int, help="Picture side in pixels (default: the model's native size).")
@click.option("--config", "config_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Local diffusers folder of the base's family (tokenizers, configs).")
@click.option("--device", type=click.Choice(("auto", "cpu", "cuda")), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Report as one JSON object.")
@click.pass_context
def verify_command(ctx: click.Context, adapter: Path, base: Path, concept: str, expect: str, seeds: int, seed: int,
                   min_rate: float, max_base_rate: float, scorer: str | None, strength: float, steps: int,
                   cfg: float, size: int | None, config_dir: Path | None, device: str, as_json: bool) -> None:
    """Sample a concept with and without an adapter; fail (exit 1) when it shows too rarely
    with it, or too often without it.

    Example: sdkit verify sks.safetensors --base toy-sd1.safetensors --concept "a photo of sks" --expect purple/cross
    """
    require_inputs(adapter, base, config_dir)
    from sdkit.runtime.train.verify import VerifyJob, verify_adapter

    if not (ctx.obj or {}).get("debug"):
        quiet_peer_logs()
    job = VerifyJob(adapter, base, concept, expect, seeds, seed, min_rate, scorer, strength, steps, cfg,
                    size=size, config=config_dir, device=device, max_base_rate=max_base_rate)
    result = verify_adapter(job)
    if as_json:
        click.echo(json.dumps(result.to_json()))
    else:
        wanted = "/".join(result.expected)
        echo(f"{adapter} ({result.kind}): {wanted!r} in {result.with_rate:.0%} of {seeds} pictures with it, "
             f"{result.without_rate:.0%} without; needed at least {min_rate:.0%} with it and at most "
             f"{max_base_rate:.0%} without: {'passed' if result.passed else 'FAILED'}")
    if not result.passed:
        raise SdkitError(f"{adapter}: {'; '.join(result.failures())}")

