"""`sdkit convert`: formats, layouts, precision, pruning and repairs of model files."""

from __future__ import annotations

import json
from typing import Any

import click

from sdkit.cli.common import human_bytes, key_examples, progress_bar
from sdkit.cli.main import cli
from sdkit.cli.preflight import ModelInput, require_inputs, require_output
from sdkit.cli.terminal import SafeConsole



@cli.command("convert")
@click.argument("source", type=ModelInput())
@click.option("--output", "-o", required=True, type=click.Path(path_type=str),
              help="Output .safetensors file, .pt (A1111 embeddings) or folder (diffusers).")
@click.option("--to", "target", type=click.Choice(["safetensors", "single-file", "diffusers", "gguf"]),
              default="safetensors", show_default=True,
              help="safetensors: keep the key layout; single-file: LDM / A1111 keys (kohya names "
                   "for LoRA, what ComfyUI and A1111 load); diffusers: a diffusers folder (diffusers / peft "
                   "names for LoRA, for diffusers only: ComfyUI and A1111 miss them on SD/SDXL); gguf: the diffusion "
                   "model as ComfyUI-GGUF loads it (--quant).")
@click.option("--quant", metavar="TYPE",
              help="With --to gguf: F16, BF16, Q8_0, Q6_K, Q5_K, Q5_1, Q5_0, Q4_K, Q4_1, Q4_0, Q3_K or Q2_K "
                   "(2-D weights; vectors, small tensors and the architecture's embedders and final layers "
                   "stay in F32/F16/BF16, as ComfyUI-GGUF's tools keep them), with the error per layer class.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2"]),
              help="Cast float tensors (integer tensors are never touched). fp8: the matrices of the "
                   "diffusion model and text encoders only (the family keeps its embedders and final layer; "
                   "VAEs stay), with the quantization error per layer class; scaled fp8 input is multiplied "
                   "out first.")
@click.option("--fp8-scaling", type=click.Choice(["plain", "scaled", "mixed"]), default="scaled",
              show_default=True,
              help="How fp8 weights are stored: plain; scaled (per-tensor scale_weight + scaled_fp8 marker, "
                   "ComfyUI); mixed (weight_scale + comfy_quant + _quantization_metadata, ComfyUI).")
@click.option("--keep-fp32", "--keep", "keep_fp32", multiple=True, metavar="PATTERN",
              help="Keys that keep their stored dtype (--to gguf: stay F16/BF16): a glob (first_stage_model.*) or "
                   "re:REGEX. Repeatable.")
@click.option("--clamp", is_flag=True, help="Clamp values beyond the fp16 range instead of refusing.")
@click.option("--allow-inf", is_flag=True, help="Let values beyond the fp16 range become inf (reported).")
@click.option("--prune", is_flag=True, help="Drop EMA, scheduler buffers, training leftovers, non-model keys.")
@click.option("--ema", is_flag=True, help="Use the EMA weights as the UNet (model_ema.* -> model.diffusion_model.*).")
@click.option("--only", type=click.Choice(["unet", "vae", "text_encoder", "text_encoder_2"]),
              help="Write this component alone (single-file: no checkpoint prefix, as A1111 / ComfyUI load it).")
@click.option("--fix-clip", is_flag=True, help="Rewrite broken CLIP position_ids as int64 0..n-1.")
@click.option("--config", "config_dir", type=click.Path(path_type=str),
              help="A local diffusers folder of the same model: configs, tokenizers and scheduler come from it.")
@click.option("--force", is_flag=True, help="Overwrite the output if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.pass_context
def convert_command(ctx: click.Context, source: str, output: str, target: str, clamp: bool,
                    allow_inf: bool, as_json: bool, **options: Any) -> None:
    """Convert a model file: pickle to safetensors, precision, pruning, repairs, single-file <-> diffusers,
    one component, LoRA kohya <-> diffusers, embedding layouts.

    Example: sdkit convert model.ckpt -o model.safetensors --dtype fp16 --prune
    """
    if clamp and allow_inf:
        raise click.UsageError("--clamp and --allow-inf exclude each other")
    require_inputs(source, options["config_dir"])
    require_output(output, (source, options["config_dir"]), force=options["force"])
    from sdkit.ops.convert.model import ConvertOptions, convert_model

    policy = "clamp" if clamp else "allow-inf" if allow_inf else "refuse"
    settings = ConvertOptions(to=target, overflow=policy, keep_fp32=tuple(options.pop("keep_fp32")), **options)
    console = SafeConsole(stderr=True)
    quiet = bool((ctx.obj or {}).get("quiet")) or as_json
    with progress_bar(console, quiet, "converting") as advance:
        result = convert_model(source, output, settings, progress=advance)
    if as_json:  # warnings are in it
        click.echo(json.dumps(result.to_json(), indent=2))
        return
    if quiet:
        return
    for warning in result.warnings:
        console.print(f"warning: {warning}", markup=False, highlight=False, soft_wrap=True)
    for line in _report_lines(result):
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def _report_lines(result: Any) -> list[str]:
    lines = [f"wrote {result.output} ({result.written}, {result.convention} keys, {result.tensors} tensors, "
             f"{human_bytes(result.bytes)})"]
    if result.precision is not None:
        report = result.precision
        lines.append(f"• cast {len(report.cast)} float tensors to {report.target}"
                     + (f", kept {len(report.kept)} by --keep-fp32" if report.kept else ""))
    if result.fp8 is not None:
        fp8 = result.fp8
        lines.append(f"• {len(fp8.cast)} matrices to {fp8.dtype} ({fp8.scaling})"
                     + (f", {len(fp8.kept)} kept in their precision (family or --keep)" if fp8.kept else "")
                     + "; other tensors keep their dtype")
        lines += [f"  {line}" for line in fp8.summary()]
    if getattr(result, "gguf", None) is not None:
        report = result.gguf
        kept = sum(len(names) for names in report.kept.values())
        lines.append(f"• general.architecture {report.architecture}: {len(report.quantized)} weights to "
                     f"{report.quant}, {kept} tensors kept in F32/F16/BF16"
                     + (f" ({len(report.reshaped)} reshaped to rows of 256)" if report.reshaped else ""))
        lines += [f"  {line}" for line in report.summary()]
    for reason, keys in result.prune.dropped.items():
        lines.append(f"• dropped ({reason}, {human_bytes(result.prune.bytes.get(reason, 0))}): {key_examples(keys)}")
    if result.prune.ema_swapped:
        lines.append(f"• EMA weights used for {result.prune.ema_swapped} UNet tensors")
    for name, problem in result.fixed_position_ids.items():
        lines.append(f"• fixed {name} ({problem})")
    if result.shared:
        lines.append(f"• {len(result.shared)} groups of tensors shared storage in the pickle; each written "
                     f"as its own copy ({key_examples([', '.join(g) for g in result.shared])})")
    lines += [f"• {note}" for note in result.notes]
    return lines
