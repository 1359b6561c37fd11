"""Textual-inversion embeddings between their file layouts (formats.md (c)).

Outputs, by `--to` and the output suffix:
- `.pt` — A1111: `{"string_to_token": {"*": 265}, "string_to_param": {"*": (n, dim)},
  "name", "step", "sd_checkpoint_name", ...}` plus the metadata keys as plain strings
  (every A1111 / ComfyUI / diffusers loader ignores keys it does not know);
- `.safetensors` with `--to safetensors` or `single-file` — A1111 / kohya: `emb_params`
  (n, dim), or for SDXL `clip_l` (n, 768) + `clip_g` (n, 1280);
- `--to diffusers` — `learned_embeds.safetensors` layout: `{token: (n, dim)}`. SDXL has no
  diffusers layout of its own (diffusers loads `clip_l` / `clip_g` one encoder at a time),
  so SDXL embeddings are written as `clip_l` + `clip_g` and the result says so.
The vectors are read by `sdkit.adapters.embedding` and written in the file's own dtype
unless `--dtype` says otherwise.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from sdkit.adapters.embedding import Embedding, embedding_from_model
from sdkit.arch import Identity
from sdkit.errors import SdkitError
from sdkit.io import LazyTensor, ModelFile, write_safetensors
from sdkit.io.dtypes import CODE_TO_TORCH, NAME_TO_CODE
from sdkit.io.output_path import write_file_atomically
from sdkit.io.writer import DATA_SHA256
from sdkit.ops.convert.model import ConvertOptions, ConvertResult
from sdkit.ops.recipe_meta import EMBEDDING_IMPLEMENTATION, SpecFacts, build_metadata

if TYPE_CHECKING:
    import torch

_SDXL_NAMES = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
_A1111_TOKEN_ID = 265  # the id A1111 stores for "*"; loaders ignore it


def _vectors(rows: "torch.Tensor", dtype: str) -> "torch.Tensor":
    return rows.to(CODE_TO_TORCH[dtype]).contiguous()


def _lazy(rows: "torch.Tensor", dtype: str) -> LazyTensor:
    return LazyTensor(dtype, tuple(rows.shape), partial(_vectors, rows, dtype))


def embedding_tensors(embedding: Embedding, layout: str, dtype: str) -> dict[str, LazyTensor]:
    """The tensors of `embedding` in `layout`: "kohya" (emb_params / clip_l+clip_g) or "diffusers"."""
    if set(embedding.vectors) == set(_SDXL_NAMES):
        return {_SDXL_NAMES[c]: _lazy(rows, dtype) for c, rows in embedding.vectors.items()}
    rows = embedding.vectors["text_encoder"]
    return {"emb_params" if layout == "kohya" else embedding.token: _lazy(rows, dtype)}


def write_a1111_pt(path: str | os.PathLike[str], embedding: Embedding, dtype: str, metadata: Mapping[str, str],
                   *, overwrite: bool = False) -> Path:
    """Write `embedding` as an A1111 textual-inversion `.pt` file; returns the path written.

    The file is the pickle A1111 saves: `string_to_token` (`{"*": 265}`), `string_to_param`
    (`{"*": tensor (vectors, width)}` in `dtype`, a safetensors dtype code), `name` (the
    token), `step`, `sd_checkpoint`, `sd_checkpoint_name`, then `metadata` as plain string
    entries, `sd_checkpoint` among them when given (A1111, ComfyUI and diffusers ignore keys
    they do not know). It is written to a hidden file beside `path`, fsynced and renamed
    into place, so `path` never holds part of a file; an existing `path` is replaced only
    with `overwrite`. SD1 / SD2 embeddings only: SDXL ones (clip_l + clip_g) have no `.pt`
    layout and are refused.
    """
    import torch

    path = Path(path)
    if set(embedding.vectors) != {"text_encoder"}:
        raise SdkitError(f"{path}: SDXL embeddings have no A1111 .pt layout; write a .safetensors file")
    if path.exists() and not overwrite:
        raise SdkitError(f"{path}: already exists (overwriting needs --force)")
    data: dict[str, Any] = {
        "string_to_token": {"*": _A1111_TOKEN_ID},
        "string_to_param": {"*": _vectors(embedding.vectors["text_encoder"], dtype)},
        "name": embedding.token, "step": embedding.step or 0,
        "sd_checkpoint": None, "sd_checkpoint_name": embedding.checkpoint_name,
        # a pickle has no safetensors data section to hash
        **{key: value for key, value in metadata.items() if value != DATA_SHA256},
    }
    return write_file_atomically(path, lambda temporary: torch.save(data, temporary), overwrite=overwrite)


def _check_options(options: ConvertOptions, output: Path) -> None:
    for flag, given in (("--only", options.only), ("--ema", options.ema), ("--fix-clip", options.fix_clip),
                        ("--prune", options.prune), ("--keep-fp32", options.keep_fp32)):
        if given:
            raise SdkitError(f"{flag} applies to checkpoints, not to embeddings")
    if output.suffix.lower() not in (".pt", ".safetensors"):
        raise SdkitError(f"{output}: an embedding is written as .safetensors or A1111 .pt")
    if output.suffix.lower() == ".pt" and options.to == "diffusers":
        raise SdkitError(f"{output}: the diffusers layout is a .safetensors file")


def _refuse_a_copy(model: ModelFile, tensors: Mapping[str, LazyTensor], options: ConvertOptions) -> None:
    """A --dtype that casts nothing of a safetensors embedding kept in its layout is a copy."""
    same = {name: (lazy.dtype, lazy.shape) for name, lazy in tensors.items()} == \
        {name: (info.dtype, info.shape) for name, info in model.infos.items()}
    if options.dtype and model.format == "safetensors" and same:
        raise SdkitError(f"{model.path}: nothing would change (its vectors are already {options.dtype}); "
                         "the output would be a copy of the input")


def convert_embedding_file(model: ModelFile, identity: Identity, output: Path, options: ConvertOptions,
                           progress: Callable[[int], None] | None) -> ConvertResult:
    """Write the embedding in `model` in the layout `options.to` and the suffix ask for."""
    _check_options(options, output)
    embedding = embedding_from_model(model)
    dtype = NAME_TO_CODE[options.dtype] if options.dtype else embedding.dtype
    sdxl = set(embedding.vectors) == set(_SDXL_NAMES)
    layout = "a1111" if output.suffix.lower() == ".pt" else (
        "diffusers" if options.to == "diffusers" and not sdxl else "kohya")
    facts = SpecFacts.from_identity(identity, adapter="textual-inversion",
                                    implementation=EMBEDDING_IMPLEMENTATION)
    metadata = build_metadata("convert", [model.path], options.to_json(), facts, title=output.stem,
                              carried=model.metadata if model.format == "safetensors" else {},
                              progress=progress)
    result = ConvertResult(output, "file", identity.kind, identity.family, layout)
    if layout == "a1111":
        write_a1111_pt(output, embedding, dtype, metadata, overwrite=options.force)
        result.tensors = 1
    else:
        tensors = embedding_tensors(embedding, layout, dtype)
        _refuse_a_copy(model, tensors, options)
        write_safetensors(output, tensors, metadata, overwrite=options.force, progress=progress)
        result.tensors = len(tensors)
    if sdxl and options.to == "diffusers":
        result.notes.append("SDXL embeddings are written as clip_l + clip_g, the layout diffusers' "
                            "load_textual_inversion reads per text encoder")
    result.bytes = output.stat().st_size
    return result
