"""`sdkit lora`: check adapters against a base, bake them in, merge, extract and resize LoRAs."""

from __future__ import annotations

import json
import sys
from typing import Any, Callable

import click
from rich.console import Console
from sdkit.cli.tables import Table

from sdkit.cli.common import is_quiet, progress_bar
from sdkit.cli.main import cli
from sdkit.cli.preflight import SAFETENSORS, require_inputs, require_output
from sdkit.cli.terminal import SafeConsole, styled
from sdkit.ops.adapter_input import parse_adapter_arg

_SHOWN = 5
_DTYPES = click.Choice(["fp16", "bf16", "fp32"])
_FORMATS = click.Choice(["kohya", "diffusers"])
_DYNAMIC = (click.Choice(["sv_ratio", "sv_fro", "sv_cumulative"]), float)


@cli.group("lora")
def lora_group() -> None:
    """LoRA / LyCORIS adapters: check, bake into a model, merge, extract, resize.

    Example: sdkit lora bake model.safetensors style.safetensors:0.8 -o baked.safetensors
    """


def _console() -> Console:
    return SafeConsole(stderr=True)


def _quiet(as_json: bool) -> bool:
    return as_json or is_quiet()


def _emit(report: dict[str, Any], as_json: bool, render: Callable[[Console, dict[str, Any]], None], *,
          summary: bool = False) -> None:
    """Print a command's result: JSON on request, else rendered; a `summary` of what a
    writing command did is chatter, left out under --quiet."""
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    elif not (summary and is_quiet()):
        render(SafeConsole(), report)


def _shown(items: dict[str, str], console: Console, label: str) -> None:
    for name, reason in list(items.items())[:_SHOWN]:
        console.print(f"  {label} {name}: {reason}")
    if len(items) > _SHOWN:
        console.print(f"  … and {len(items) - _SHOWN} more (--json lists all)")


# ---- check -------------------------------------------------------------------------------

@lora_group.command("check")
@click.argument("base", type=click.Path(path_type=str))
@click.argument("lora", type=click.Path(path_type=str))
@click.option("--rank", type=int, help="Rank alpha is divided by (adapters saved without it).")
@click.option("--alpha", type=float, help="Alpha for adapters that store none.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def check_command(base: str, lora: str, rank: int | None, alpha: float | None, as_json: bool) -> None:
    """Tell whether an adapter fits a model: families, modules that map and those that don't.

    Exits 1 when the adapter was made for another family or none of its modules fits.
    Example: sdkit lora check model.safetensors style.safetensors
    """
    require_inputs(base, lora)
    from sdkit.ops.lora.plan import check_adapter

    report = check_adapter(base, lora, rank=rank, alpha=alpha)
    _emit(report, as_json, _render_check)
    if not report["family_match"] or not report["mapped"]:
        sys.exit(1)


def _render_check(console: Console, report: dict[str, Any]) -> None:
    table = Table(title=report["path"], show_header=False, title_justify="left")
    table.add_column(style="bold cyan")
    table.add_column()
    verdict = "yes" if report["family_match"] else f"NO: {report['family_problem']}"
    evidence = f" from {report['family_evidence']}" if report["family_evidence"] else ""
    table.add_row("families", f"adapter {report['family']}{evidence}, base {report['base_family']} ({verdict})")
    table.add_row("type", str(report["adapter_type"]))
    if report.get("base_part"):
        convention = "single-file" if report["base_convention"] == "ldm" else report["base_convention"]
        table.add_row("base", f"{report['base_part']}, {convention} names")
    per = ", ".join(f"{c} {n}" for c, n in report["by_component"].items()) or "none"
    table.add_row("modules mapped", f"{report['mapped']} of {report['modules']} ({per})")
    console.print(table)
    _print_verdict(console, report)
    _shown(report["unmapped"], console, "unmapped")
    for note in report["notes"]:
        console.print(f"  note: {note}")


def _print_verdict(console: Console, report: dict[str, Any]) -> None:
    """Say loudly when modules would be skipped: a loader drops them with a log line at
    most ("lora key not loaded"), and the adapter silently does less or nothing."""
    unmapped = report["modules"] - report["mapped"]
    if report["verdict"] == "other-family":
        console.print(styled(f"NOT FOR THIS BASE: {report['family_problem']} "
                             f"({report['mapped']} of {report['modules']} modules fit by shape alone)", "bold red"))
    elif report["verdict"] == "none":
        console.print(styled(f"NONE of the {report['modules']} modules fits this base: "
                             "the adapter would do nothing on it", "bold red"))
    elif report["verdict"] == "partial":
        console.print(styled(f"only {report['mapped']} of {report['modules']} modules fit: {unmapped} "
                             "would be skipped, the adapter would do less than it was made to", "bold yellow"))


# ---- bake --------------------------------------------------------------------------------

@lora_group.command("bake")
@click.argument("base", type=click.Path(path_type=str))
@click.argument("adapters", nargs=-1, required=True, metavar="LORA[:STRENGTH]...")
@click.option("--output", "-o", required=True, type=click.Path(path_type=str),
              help="Output .safetensors file (or folder for a diffusers model).")
@click.option("--dtype", type=_DTYPES, help="Output dtype of float tensors (default: each keeps the base's).")
@click.option("--unet-only", is_flag=True, help="Apply only the UNet modules.")
@click.option("--te-only", is_flag=True, help="Apply only the text-encoder modules.")
@click.option("--blocks", help='Per-block strength factors: "BASE:0,IN04:0.5,…" or one value per block '
                                "(BASE, IN…, M00, OUT…; see sdkit merge --list-blocks), or a preset (GRAD_V, …).")
@click.option("--rank", type=int, help="Rank alpha is divided by (adapters saved without it).")
@click.option("--alpha", type=float, help="Alpha for adapters that store none.")
@click.option("--to", "to", type=click.Choice(["ldm", "diffusers"]),
              help="Output convention (default: the base's).")
@click.option("--force", is_flag=True, help="Overwrite the output if it exists.")
@click.option("--allow-family-mismatch", is_flag=True,
              help="Bake adapters made for another family (only the modules that fit apply).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def bake_command(base: str, adapters: tuple[str, ...], output: str, dtype: str | None, unet_only: bool,
                 te_only: bool, blocks: str | None, rank: int | None, alpha: float | None, to: str | None,
                 force: bool, allow_family_mismatch: bool, as_json: bool) -> None:
    """Bake LoRA / LyCORIS adapters into a model: W + Σ strength·ΔW, streamed.

    Example: sdkit lora bake model.safetensors a.safetensors:0.7 b.safetensors -o baked.safetensors
    """
    if unet_only and te_only:
        raise click.UsageError("--unet-only and --te-only exclude each other")
    inputs = [parse_adapter_arg(a) for a in adapters]
    require_inputs(base, *(item.path for item in inputs))
    require_output(output, (base, *(item.path for item in inputs)), force=force,
                   suffixes=SAFETENSORS if to == "ldm" else None)
    from sdkit.ops.lora.bake import BakeOptions, bake_loras

    components = "unet" if unet_only else "te" if te_only else "all"
    options = BakeOptions(dtype, components, blocks, rank, alpha, to=to,
                          allow_family_mismatch=allow_family_mismatch)
    with progress_bar(_console(), _quiet(as_json), "baking") as advance:
        result = bake_loras(base, inputs, output, options, overwrite=force, progress=advance)
    _emit(result.to_json(), as_json, _render_bake, summary=True)


def _render_bake(console: Console, report: dict[str, Any]) -> None:
    console.print(f"wrote {report['output']} ({report['convention']}, {report['touched']} of "
                  f"{report['tensors']} tensors changed)")
    for adapter in report["adapters"]:
        per = ", ".join(f"{c} {n}" for c, n in adapter["by_component"].items())
        console.print(f"• {adapter['path']} ×{adapter['strength']:g}: {adapter['mapped']} of "
                      f"{adapter['modules']} modules applied ({per})")
        if adapter["family_problem"]:
            console.print(f"  baked although {adapter['family_problem']}")
        _shown(adapter["unmapped"], console, "unmapped")
        _shown(adapter["skipped"], console, "skipped")
        if adapter["dropped_biases"]:
            console.print(f"  bias deltas dropped (the base layer has no bias): "
                          f"{len(adapter['dropped_biases'])}")
    for note in report["notes"]:
        console.print(f"• {note}")


# ---- convert -----------------------------------------------------------------------------

@lora_group.command("convert")
@click.argument("source", type=click.Path(path_type=str))
@click.option("--to", "to", required=True, type=click.Choice(["comfyui", "kohya", "diffusers"]),
              help="comfyui: diffusion_model.<single-file path>; kohya: lora_unet_<single-file path> "
                   "(sd-scripts); diffusers: transformer.<diffusers path> lora_A / lora_B (peft).")
@click.option("--output", "-o", required=True, type=click.Path(path_type=str), help="Output .safetensors file.")
@click.option("--base", type=click.Path(path_type=str),
              help="A model of the family: exact sizes and block counts, and every module's shape checked.")
@click.option("--family", help="The family (flux, sd3, …) where the LoRA's names fit several.")
@click.option("--force", is_flag=True, help="Overwrite the output if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def convert_command(source: str, to: str, output: str, base: str | None, family: str | None, force: bool,
                    as_json: bool) -> None:
    """Rewrite a transformer LoRA (FLUX, SD3, Chroma, Wan, …) in the layout a client loads.

    q / k / v modules are fused for kohya / comfyui and cut apart for diffusers, exactly.
    Example: sdkit lora convert style.safetensors --to comfyui -o style-comfy.safetensors
    """
    require_inputs(source, base)
    require_output(output, (source, base), force=force, suffixes=SAFETENSORS)
    from sdkit.ops.lora.convert import LoraConvertOptions, convert_transformer_lora

    result = convert_transformer_lora(source, output, LoraConvertOptions(to, base, family), overwrite=force)
    _emit(result.to_json(), as_json, _render_convert, summary=True)


def _render_convert(console: Console, report: dict[str, Any]) -> None:
    changes = [f"{report[k]} {word}" for k, word in (("fused", "fused"), ("split", "split"), ("swapped", "swapped"))
               if report[k]]
    console.print(f"wrote {report['output']}: {report['family']} LoRA, {report['layout']} layout, "
                  f"{report['modules_in']} modules in, {report['modules_out']} out"
                  + (f" ({', '.join(changes)})" if changes else ""))
    for note in report["notes"]:
        console.print(f"• {note}")


# ---- merge / extract / resize --------------------------------------------------------------

@lora_group.command("merge")
@click.argument("inputs", nargs=-1, required=True, metavar="LORA[:WEIGHT]...")
@click.option("--output", "-o", required=True, type=click.Path(path_type=str), help="Output .safetensors file.")
@click.option("--rank", type=int, help="Re-factorise every layer's summed delta to this rank (SVD); "
                                       "default: exact concatenation.")
@click.option("--conv-rank", type=int, help="Rank of 3x3 conv layers with --rank (default: --rank).")
@click.option("--clamp-quantile", type=float, help="With --rank: clamp factors to this quantile (kohya: 0.99).")
@click.option("--base", type=click.Path(path_type=str), help="Base model: aligns names across conventions, "
                                                              "gives layer shapes and base weights.")
@click.option("--format", "fmt", type=_FORMATS, default="kohya", show_default=True)
@click.option("--dtype", type=_DTYPES, help="Output dtype (default: the first input's).")
@click.option("--force", is_flag=True, help="Overwrite the output if it exists.")
@click.option("--allow-family-mismatch", is_flag=True, help="Merge LoRAs made for different families.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def merge_command(inputs: tuple[str, ...], output: str, rank: int | None, conv_rank: int | None,
                  clamp_quantile: float | None, base: str | None, fmt: str, dtype: str | None,
                  force: bool, allow_family_mismatch: bool, as_json: bool) -> None:
    """Merge LoRAs into one whose delta is Σ weight·ΔW.

    Example: sdkit lora merge a.safetensors:0.6 b.safetensors:0.4 -o ab.safetensors
    """
    loras = [parse_adapter_arg(item) for item in inputs]
    require_inputs(*(item.path for item in loras), base)
    require_output(output, (*(item.path for item in loras), base), force=force)
    from sdkit.ops.lora.merge import MergeOptions, merge_loras

    options = MergeOptions(rank, conv_rank, clamp_quantile, base, format=fmt, dtype=dtype,
                           allow_family_mismatch=allow_family_mismatch)
    result = merge_loras(loras, output, options, overwrite=force)
    _emit(result.to_json(), as_json, _render_merge, summary=True)


def _render_merge(console: Console, report: dict[str, Any]) -> None:
    ranks = sorted(set(report["ranks"].values()))
    console.print(f"wrote {report['output']}: {report['layers']} layers, {report['method']}, "
                  f"rank {'/'.join(map(str, ranks))}")
    if report["retained"]:
        values = list(report["retained"].values())
        console.print(f"• energy retained: mean {sum(values) / len(values):.2%}, lowest {min(values):.2%}")
    for note in report["notes"]:
        console.print(f"• {note}")


@lora_group.command("extract")
@click.argument("tuned", type=click.Path(path_type=str))
@click.argument("base", type=click.Path(path_type=str))
@click.option("--output", "-o", required=True, type=click.Path(path_type=str), help="Output .safetensors file.")
@click.option("--rank", type=int, default=4, show_default=True, help="Rank (the cap with --dynamic).")
@click.option("--conv-rank", type=int, help="Also extract ResNet convs and samplers, 3x3 at this rank.")
@click.option("--dynamic", type=_DYNAMIC, metavar="METHOD VALUE",
              help="Per-layer rank: sv_ratio, sv_fro or sv_cumulative, and its value.")
@click.option("--min-diff", type=float, default=0.01, show_default=True,
              help="Leave the text encoders out when no weight differs by more.")
@click.option("--clamp-quantile", type=float, default=0.99, show_default=True,
              help="Clamp the factors to this quantile of their values (1 = no clamp).")
@click.option("--randomized", is_flag=True, help="Randomized SVD (torch.svd_lowrank); reports its error on a sample.")
@click.option("--format", "fmt", type=_FORMATS, default="kohya", show_default=True)
@click.option("--to", type=click.Choice(["comfyui", "kohya", "diffusers"]),
              help="Layout (replaces --format); transformer models default to comfyui.")
@click.option("--full-diff", is_flag=True, help="Transformers: also keep the other differing tensors "
                                                "(biases, embedders, norms) as full differences.")
@click.option("--dtype", type=_DTYPES, help="Output dtype (default: the base's).")
@click.option("--force", is_flag=True, help="Overwrite the output.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def extract_command(tuned: str, base: str, output: str, rank: int, conv_rank: int | None,
                    dynamic: tuple[str, float] | None, min_diff: float, clamp_quantile: float,
                    randomized: bool, fmt: str, to: str | None, full_diff: bool, dtype: str | None, force: bool,
                    as_json: bool) -> None:
    """Extract a LoRA approximating TUNED − BASE (sd-scripts' extract_lora_from_models).

    Example: sdkit lora extract finetune.safetensors base.safetensors -o diff.safetensors --rank 32
    """
    require_inputs(tuned, base)
    require_output(output, (tuned, base), force=force)
    from sdkit.ops.lora.extract import ExtractOptions, extract_lora

    method, value = dynamic if dynamic else (None, None)
    clamp = None if clamp_quantile >= 1 else clamp_quantile
    options = ExtractOptions(rank, conv_rank, method, value, clamp, min_diff, randomized,
                             format=fmt, dtype=dtype, to=to, full_diff=full_diff)
    with progress_bar(_console(), _quiet(as_json), "extracting", unit="layers") as advance:
        report = extract_lora(tuned, base, output, options, overwrite=force, progress=advance)
    _emit(report.to_json(), as_json, _render_svd, summary=True)


@lora_group.command("resize")
@click.argument("source", type=click.Path(path_type=str))
@click.option("--output", "-o", required=True, type=click.Path(path_type=str), help="Output .safetensors file.")
@click.option("--rank", type=int, default=4, show_default=True, help="New rank (the cap with --dynamic).")
@click.option("--conv-rank", type=int, help="New rank of 3x3 conv layers (default: --rank).")
@click.option("--dynamic", type=_DYNAMIC, metavar="METHOD VALUE",
              help="Per-layer rank: sv_ratio, sv_fro or sv_cumulative, and its value.")
@click.option("--base", type=click.Path(path_type=str), help="Base model (layer shapes for some LyCORIS modules).")
@click.option("--format", "fmt", type=_FORMATS, default="kohya", show_default=True)
@click.option("--dtype", type=_DTYPES, help="Output dtype (default: the input's).")
@click.option("--force", is_flag=True, help="Overwrite the output.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def resize_command(source: str, output: str, rank: int, conv_rank: int | None, dynamic: tuple[str, float] | None,
                   base: str | None, fmt: str, dtype: str | None, force: bool, as_json: bool) -> None:
    """Change a LoRA's rank, keeping its strength (sd-scripts' resize_lora).

    Example: sdkit lora resize big.safetensors -o small.safetensors --rank 16
    """
    require_inputs(source, base)
    require_output(output, (source, base), force=force)
    from sdkit.ops.lora.extract import ResizeOptions, resize_lora

    method, value = dynamic if dynamic else (None, None)
    options = ResizeOptions(rank, conv_rank, method, value, base, fmt, dtype)
    report = resize_lora(source, output, options, overwrite=force)
    _emit(report.to_json(), as_json, _render_svd, summary=True)


def _render_svd(console: Console, report: dict[str, Any]) -> None:
    layers = report["layers"]
    ranks = sorted({layer["rank"] for layer in layers})
    console.print(f"wrote {report['output']}: {len(layers)} layers, rank {'/'.join(map(str, ranks))}")
    if layers:
        lowest = min(layers, key=lambda layer: layer["retained"])
        console.print(f"• energy retained: mean {report['mean_retained']:.2%}, lowest "
                      f"{lowest['retained']:.2%} ({lowest['name']})")
    for check in report["randomized_check"]:
        console.print(f"• {check['layer']}: relative error {check['error_randomized']:.3g} randomized, "
                      f"{check['error_full_svd']:.3g} full SVD")
    for note in report["notes"][:_SHOWN]:
        console.print(f"• {note}")
