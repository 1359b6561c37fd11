"""`sdkit embed`: inspect textual-inversion embeddings and insert them into a model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from sdkit.cli.common import progress_bar
from sdkit.cli.main import cli
from sdkit.cli.preflight import MODEL_KINDS, ModelInput, require_inputs, require_output
from sdkit.cli.tables import Table
from sdkit.cli.terminal import SafeConsole


@cli.group("embed")
def embed_group() -> None:
    """Textual-inversion embeddings (A1111 .pt, kohya, SDXL clip_l/clip_g, diffusers).

    Example: sdkit embed inspect my-style.pt
    """


@embed_group.command("inspect")
@click.argument("path", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def inspect_command(path: str, as_json: bool) -> None:
    """Tell an embedding's token, vectors, dimension and the text encoder it fits.

    Example: sdkit embed inspect my-style.safetensors --json
    """
    from sdkit.adapters.embedding import read_embedding

    report = read_embedding(path).to_json()
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    _render(SafeConsole(), report)


def _render(console: Console, report: dict[str, Any]) -> None:
    table = Table(title=report["path"], show_header=False, title_justify="left")
    table.add_column(style="bold cyan")
    table.add_column()
    table.add_row("token", report["token"])
    table.add_row("format", report["layout"])
    table.add_row("vectors", str(report["vectors"]))
    widths = ", ".join(f"{name} {width}" for name, width in report["widths"].items())
    table.add_row("dimension", widths)
    table.add_row("fits", f"{report['text_encoder']} ({report['family']})")
    table.add_row("dtype", report["dtype"])
    for label, key in (("stored name", "stored_name"), ("step", "step"), ("trained on", "checkpoint_name")):
        if report[key] is not None:
            table.add_row(label, str(report[key]))
    if report["vectors"] > 1:
        table.add_row("tokenizer tokens", " ".join(report["tokens"]))
    console.print(table)


def _split_spec(spec: str) -> tuple[str, str | None]:
    """EMB[:TOKEN]: the path wins when a file by the whole name exists (drive letters, colons)."""
    if Path(spec).exists() or ":" not in spec:
        return spec, None
    path, token = spec.rsplit(":", 1)
    if not token:
        raise click.UsageError(f"{spec!r}: empty token after ':'")
    return path, token


def _request(spec: str) -> Any:
    from sdkit.adapters.embedding import read_embedding
    from sdkit.ops.embed.add import EmbeddingRequest

    path, token = _split_spec(spec)
    embedding = read_embedding(path, token)
    return EmbeddingRequest(embedding, embedding.token)


@embed_group.command("add")
@click.argument("model", type=ModelInput(*MODEL_KINDS))
@click.argument("embeddings", nargs=-1, required=True, metavar="EMB[:TOKEN]...")
@click.option("--output", "-o", required=True, type=click.Path(path_type=str),
              help="The new diffusers pipeline folder.")
@click.option("--to", "to", type=click.Choice(["diffusers"]),
              help="Needed for a single-file MODEL: convert it to a diffusers folder on the way.")
@click.option("--config", "config_dir", type=click.Path(path_type=str),
              help="Single-file MODEL: a local diffusers folder of the same model; configs, scheduler and "
                   "tokenizers come from it.")
@click.option("--tokenizer", "tokenizer_source", type=click.Path(path_type=str),
              help="Single-file MODEL: a pipeline folder with tokenizer/ (and tokenizer_2/) to extend; "
                   "default: --config's, else the family's tokenizer from the local Hugging Face cache.")
@click.option("--force", is_flag=True,
              help="Overwrite the output, and let tokens already in the vocabulary take the vectors.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.pass_context
def add_command(ctx: click.Context, model: str, embeddings: tuple[str, ...], output: str, to: str | None,
                config_dir: str | None, tokenizer_source: str | None, force: bool, as_json: bool) -> None:
    """Insert embeddings into a model: the tokenizer learns the tokens, the text encoder
    the vectors. What is written is a diffusers pipeline folder, where the tokenizer
    travels with the model; a single-file MODEL is converted to one with --to diffusers.

    No single-file checkpoint is written: ComfyUI, A1111 and Forge build CLIP with its
    49408 token rows and their own tokenizer, so a grown one does not load. For them, put
    the embedding file in their embeddings folder and write its name in the prompt.

    Example: sdkit embed add model.safetensors style.pt:mystyle --to diffusers -o model-mystyle
    """
    paths = [_split_spec(spec)[0] for spec in embeddings]
    require_inputs(model, *paths, config_dir, tokenizer_source)
    require_output(output, (model, *paths, config_dir, tokenizer_source), force=force)
    from sdkit.ops.embed.add import CheckpointSources, add_embeddings

    requests = [_request(spec) for spec in embeddings]
    sources = CheckpointSources(*(Path(given) if given else None for given in (config_dir, tokenizer_source)))
    console = SafeConsole(stderr=True)
    quiet = bool((ctx.obj or {}).get("quiet")) or as_json
    with progress_bar(console, quiet, "writing") as advance:
        result = add_embeddings(model, requests, output, to=to, sources=sources, force=force, progress=advance)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
        return
    if quiet:
        return
    console.print(f"wrote {result.output}", markup=False, highlight=False)
    for token, per_encoder in result.ids.items():
        ids = "; ".join(f"{name} ids {', '.join(map(str, ids))}" for name, ids in per_encoder.items())
        console.print(f"• {token}: {ids}", markup=False, highlight=False)
