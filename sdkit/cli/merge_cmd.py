"""`sdkit merge`: merge checkpoints, run a recipe file, or replay a merged file's recipe."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any

import click
from rich.console import Console

from sdkit.cli.common import human_bytes, is_quiet, key_examples, progress_bar
from sdkit.cli.main import cli
from sdkit.cli.preflight import SAFETENSORS, require_inputs, require_output
from sdkit.cli.tables import Table
from sdkit.cli.terminal import SafeConsole, echo


@cli.command("merge")
@click.argument("inputs", nargs=-1, type=click.Path(path_type=str))
@click.option("--method", "-m", help="Merge method (see --list-methods); default weighted_sum.")
@click.option("--alpha", "-a", type=float, help="The method's alpha (its blend weight).")
@click.option("--param", "-p", "params", multiple=True, metavar="NAME=VALUE",
              help="Any other method parameter, e.g. -p k=0.3 -p seed=42.")
@click.option("--seed", type=int, help="Shortcut for -p seed=N (random methods: dare).")
@click.option("--blocks", help='Per-block alpha: "BASE:0.5,IN00:0.2,…" (transformers: "IN:0,D00:1,…"), '
                                "one value per block in the order --list-blocks shows (26 for SD1/SD2, "
                                "20 for SDXL, 59 for FLUX.1), or a preset name (GRAD_V, FLAT_25, …).")
@click.option("--unet-alpha", type=float, help="Alpha for the UNet.")
@click.option("--te-alpha", type=float, help="Alpha for the text encoder(s).")
@click.option("--vae-alpha", type=float, help="Alpha for the VAE (with --vae merge).")
@click.option("--component", "components", multiple=True, metavar="NAME=ALPHA,…",
              help="Per-component alpha: unet, text_encoder, text_encoder_2, te (both), vae, other.")
@click.option("--vae", "vae_source", metavar="merge|A|B|…",
              help="Where the VAE comes from: an input (default A) or merged like the rest.")
@click.option("--take", "takes", multiple=True, metavar="COMPONENT=INPUT,…",
              help="Copy whole components from one input, e.g. --take text_encoder=B.")
@click.option("--dtype", type=click.Choice(["fp16", "bf16", "fp32"]),
              help="Output dtype of float tensors (default: each key keeps A's dtype).")
@click.option("--allow-nan", is_flag=True, help="Keep NaN/Inf results (reported) instead of stopping.")
@click.option("--threads", type=click.IntRange(1, 64),
              help="Keys computed in parallel, default 2 (the output is the same for any value).")
@click.option("--output", "-o", type=click.Path(path_type=str), help="Output .safetensors file.")
@click.option("--force", is_flag=True, help="Overwrite the output if it exists.")
@click.option("--recipe", "recipe_file", type=click.Path(path_type=str),
              help="Run a YAML recipe (inputs, method, params, blocks, …); options given here override it.")
@click.option("--replay", "replay_file", type=click.Path(path_type=str),
              help="Re-run the recipe stored in a merged file: check the tensors are identical, "
                   "or with -o write the result there.")
@click.option("--dry-run", is_flag=True,
              help="Check the inputs and plan every key (and every step of a recipe), print the steps "
                   "in the order they run, write nothing.")
@click.option("--list-methods", is_flag=True, help="List the merge methods and their parameters.")
@click.option("--list-blocks", "list_blocks", metavar="FAMILY",
              help="List a family's block ids in --blocks order (sd1, sdxl, flux, wan, …) and its presets.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.pass_context
def merge_command(ctx: click.Context, inputs: tuple[str, ...], list_methods: bool,
                  list_blocks: str | None, replay_file: str | None, recipe_file: str | None, as_json: bool,
                  threads: int | None, output: str | None, force: bool, dry_run: bool, **options: Any) -> None:
    """Merge checkpoints key by key into a new .safetensors file.

    Inputs are A, B, C… in order. Example:
    sdkit merge a.safetensors b.safetensors --method weighted_sum --alpha 0.3 -o ab.safetensors
    """
    console = SafeConsole(stderr=True)
    quiet = bool((ctx.obj or {}).get("quiet")) or as_json
    if list_methods:
        _print_methods(SafeConsole())
        return
    if list_blocks:
        _print_blocks(list_blocks, as_json)
        return
    if replay_file:
        if inputs or recipe_file:
            raise click.UsageError("--replay takes no inputs and no --recipe")
        require_inputs(replay_file)
        if output:
            require_output(output, (replay_file,), force=force, suffixes=SAFETENSORS)
            from sdkit.ops.merge import replay_into

            with progress_bar(console, quiet, "replaying") as advance:
                written = replay_into(replay_file, output, overwrite=force, threads=threads, progress=advance)
            _report_merge(written, as_json, console)
            return
        from sdkit.ops.merge import replay_merge

        with progress_bar(console, quiet, "replaying") as advance:
            result = replay_merge(replay_file, threads=threads, progress=advance)
        _report_replay(result, as_json, console)
        if not result.identical:
            sys.exit(1)
        return
    _check_merge_arguments(inputs, recipe_file, output, force, dry_run)
    from sdkit.ops.merge import load_recipe_file, merge_models

    if recipe_file:
        recipe = _override(load_recipe_file(recipe_file), options)
        if output is None and recipe.output is None and not dry_run:
            raise click.UsageError(f"{recipe_file} names no output: give -o/--output")
    else:
        recipe = _override(_recipe_from_inputs(inputs), options)
    _check_arity(recipe)
    if dry_run:
        _dry_run(recipe, output, as_json)
        return
    with progress_bar(console, quiet, "merging") as advance:
        result = merge_models(recipe, output, overwrite=force, threads=threads, progress=advance)
    _report_merge(result, as_json, console)


def _check_merge_arguments(inputs: tuple[str, ...], recipe_file: str | None, output: str | None,
                           force: bool, dry_run: bool) -> None:
    """What can be refused before torch loads: the inputs, a missing -o, the output path."""
    if recipe_file:
        if inputs:
            raise click.UsageError("give the inputs in the recipe or on the command line, not both")
        require_inputs(recipe_file)
    elif not inputs:
        raise click.UsageError("give the models to merge (A B [C …]), --recipe or --replay")
    elif output is None and not dry_run:
        raise click.UsageError("missing option '-o' / '--output' (the file to write)")
    require_inputs(*inputs)
    if output is not None:
        require_output(output, inputs, force=force, suffixes=SAFETENSORS)


def _recipe_from_inputs(inputs: tuple[str, ...]) -> Any:
    from sdkit.ops.merge import MergeRecipe, RecipeInput

    return MergeRecipe([RecipeInput(path) for path in inputs], "weighted_sum")


def _check_arity(recipe: Any) -> None:
    """A method given the wrong number of models is a usage error (an unknown method is
    left to the merge, which lists the known ones; a step's, to the merge, which names
    the step)."""
    from sdkit.errors import SdkitError
    from sdkit.ops.merge import get_method

    if hasattr(recipe, "steps"):
        return

    try:
        method = get_method(recipe.method)
    except SdkitError:
        return
    try:
        method.check_inputs(len(recipe.inputs))
    except SdkitError as exc:
        raise click.UsageError(str(exc)) from None


def _override(recipe: Any, options: dict[str, Any]) -> Any:
    """The recipe with every option given on the command line applied over it (a recipe
    in steps takes none: which step would they change?)."""
    from sdkit.ops.block_weights import parse_assignments, parse_block_spec

    if hasattr(recipe, "steps"):
        given = sorted(name for name, value in options.items() if value not in (None, False, ()))
        if given:
            raise click.UsageError(f"--{given[0].replace('_', '-')}: a recipe with steps sets the "
                                   "method and its options in each step")
        return recipe
    if options["method"]:
        recipe.method = options["method"]
    params = dict(recipe.params)
    for item in options["params"]:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise click.UsageError(f"--param {item!r} is not NAME=VALUE")
        params[name.strip()] = value.strip()
    if options["alpha"] is not None:
        params["alpha"] = options["alpha"]
    if options["seed"] is not None:
        params["seed"] = options["seed"]
    recipe.params = params
    if options["blocks"]:
        recipe.blocks = parse_block_spec(options["blocks"])
    components = dict(recipe.components)
    for item in options["components"]:
        components.update(parse_assignments(item, "--component"))
    for name in ("unet", "te", "vae"):
        if options[f"{name}_alpha"] is not None:
            components[name] = options[f"{name}_alpha"]
    recipe.components = components
    recipe.take = {**recipe.take, **_takes(options["takes"], options["vae_source"])}
    if options["dtype"]:
        recipe.dtype = options["dtype"]
    if options["allow_nan"]:
        recipe.allow_nan = True
    return recipe


def _takes(items: tuple[str, ...], vae_source: str | None) -> dict[str, str]:
    takes: dict[str, str] = {}
    for item in items:
        for part in filter(None, (p.strip() for p in item.split(","))):
            name, sep, source = part.partition("=")
            if not sep:
                raise click.UsageError(f"--take {part!r} is not COMPONENT=INPUT")
            takes[name.strip()] = source.strip()
    if vae_source:
        takes["vae"] = vae_source
    return takes


def _step_lines(recipe: Any) -> Iterator[str]:
    """The steps in the order they run, each with its method and inputs."""
    from pathlib import Path

    if hasattr(recipe, "steps"):
        yield "steps: " + " → ".join(recipe.steps)
        steps = recipe.steps.items()
    else:
        steps = [("merge", recipe)]
    for name, step in steps:
        names = [getattr(item, "step", None) or Path(item.path).name for item in step.inputs]
        yield f"• {name}: {step.method} of {', '.join(names)}"


def _dry_run(recipe: Any, output: str | None, as_json: bool) -> None:
    """Every check a merge makes before writing, and what it would do; nothing written."""
    from pathlib import Path

    from sdkit.ops.merge import prepare_merge

    target = Path(output or recipe.output or "merged.safetensors")
    with prepare_merge(recipe, target, check_disk=False) as prepared:
        report = prepared.plan.report
        if as_json:
            click.echo(json.dumps({"output": str(target), "bytes": prepared.plan.output_bytes,
                                   "recipe": recipe.to_json(), "report": report.to_json()}, indent=2))
            return
        for line in _step_lines(recipe):
            echo(line)
        for line in _report_lines(report, {}):
            echo(f"• {line}")
        echo(f"would write {target} ({human_bytes(prepared.plan.output_bytes)}); nothing written (--dry-run)")


def _report_lines(report: Any, non_finite: dict[str, int]) -> Iterator[str]:
    copied = ", ".join(f"{count} from {name}" for name, count in sorted(report.copied.items()))
    yield f"{report.merged} tensors merged" + (f", {copied} copied" if copied else "")
    for component, source in sorted(report.components_taken.items()):
        yield f"{component}: taken from {source}"
    for name, keys in sorted(report.missing.items()):
        yield f"missing in {name} (taken from the first input that has them): {key_examples(keys)}"
    for name, keys in sorted(report.only_in.items()):
        yield f"not in A, copied from {name}: {key_examples(keys)}"
    if report.partial_channels:
        yield f"A's extra input channels kept: {key_examples(report.partial_channels)}"
    for key, count in sorted(non_finite.items()):
        yield f"NaN/Inf kept in {key}: {count} values"


def _report_merge(result: Any, as_json: bool, console: Console) -> None:
    if as_json:
        click.echo(json.dumps({
            "output": str(result.path), "bytes": result.output_bytes,
            "recipe": result.recipe.to_json(), "report": result.report.to_json(),
            "non_finite": result.non_finite,
        }, indent=2))
        return
    if is_quiet():
        return
    console.print(f"wrote {result.path} ({human_bytes(result.output_bytes)})")
    if hasattr(result.recipe, "steps"):
        for line in _step_lines(result.recipe):
            console.print(line, markup=False, highlight=False)
    for line in _report_lines(result.report, result.non_finite):
        console.print(f"• {line}", markup=False, highlight=False)


def _report_replay(result: Any, as_json: bool, console: Console) -> None:
    if as_json:
        click.echo(json.dumps({
            "path": str(result.path), "identical": result.identical, "matched": result.matched,
            "different": result.different, "missing": result.missing, "extra": result.extra,
        }, indent=2))
        return
    if result.identical:
        console.print(f"{result.path}: identical ({result.matched} tensors reproduced bit for bit)")
        return
    console.print(f"{result.path}: NOT identical ({result.matched} tensors match)")
    for label, keys in (("differ", result.different), ("missing from the file", result.missing),
                        ("not produced by the recipe", result.extra)):
        if keys:
            console.print(f"• {label}: {key_examples(keys)}", markup=False, highlight=False)


def _print_methods(console: Console) -> None:
    from sdkit.ops.merge import METHODS

    table = Table(show_header=True, header_style="bold")
    for column in ("method", "models", "parameters", "what it does"):
        table.add_column(column)
    for name, method in sorted(METHODS.items()):
        params = ", ".join(f"{p.name}={p.default!r}" for p in method.params.values())
        table.add_row(name, method.arity_text(), params or "—", method.doc)
    console.print(table)


def _print_blocks(family: str, as_json: bool) -> None:
    from sdkit.arch.block_listing import family_block_listing

    listing = family_block_listing(family)
    if as_json:
        click.echo(json.dumps(listing, indent=2))
        return
    for size in listing["sizes"]:
        echo(f"{listing['title']} ({', '.join(size['releases'])}): {len(size['blocks'])} blocks")
        width = max(len(block["id"]) for block in size["blocks"])
        for block in size["blocks"]:
            echo(f"  {block['id']:<{width}}  {block['covers']}")
    echo(f"presets: {', '.join(listing['presets'])}")
