"""Insert textual-inversion embeddings into a model, so the token works without a loader.

Each embedding's token enters the tokenizer as diffusers' `load_textual_inversion` adds
it (a multi-vector embedding as `tok`, `tok_1`, ...; diffusers pipelines expand `tok` in
prompts to all of them), and its vectors become the token embedding rows of the ids the
tokenizer gave them. Rows the tokenizer does not use are kept. SDXL gets the `clip_l`
vectors in `text_encoder` and the `clip_g` vectors in `text_encoder_2`.

The output is always a diffusers pipeline folder, the one form in which a tokenizer
travels with its text encoder: the text encoder folders get the grown weights
(`model.safetensors`, or the name of the safetensors variant they had) and `vocab_size`,
the tokenizer folders the new tokens. From a pipeline folder everything else is copied;
a single-file (LDM) checkpoint is converted on the way (`to="diffusers"`) with the
configs, scheduler and tokenizers of `sources.config_dir` where given (else the configs
are read off the tensors, as `sdkit convert` does), its base tokenizer taken from
`sources.tokenizer` (a pipeline folder, or for single-encoder models a tokenizer
folder), else the config folder's, else the family's reference repository in the local
Hugging Face cache (never downloaded). The folder is built beside the output and
installed in one step.

A grown single-file checkpoint is refused: the single-file loaders build CLIP from their
own fixed config and tokenizer and read no tokenizer from beside the file. ComfyUI
(`comfy/sd1_clip.py`: `sd1_clip_config.json`, vocab_size 49408, and its bundled
`sd1_tokenizer`) stops on the size mismatch of `token_embedding` when it loads the
state dict; A1111 and Forge likewise build a 49408-row CLIP from their own config, with
their own tokenizer (`openai/clip-vit-large-patch14`'s). What they all load instead is
the embedding file itself, from their embeddings folder, by its name in the prompt.

Tokenizer folders keep `vocab.json`/`merges.txt` and list the new tokens in
`added_tokens.json` beside the `tokenizer.json` that transformers writes, so both the
tokenizers-backed and the older pure-Python CLIP tokenizers load them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from sdkit.adapters.embedding import Embedding, vector_tokens
from sdkit.errors import SdkitError
from sdkit.io import LazyTensor, ModelFile, lazy_tensors, open_model, write_safetensors
from sdkit.io.diffusers_folder import find_weights, read_json
from sdkit.io.output_path import build_in_partial, check_output_path
from sdkit.ops.recipe_meta import RECIPE_KEY, recipe_json

if TYPE_CHECKING:
    import torch

Progress = Callable[[int], None]
_TOKEN_EMBEDDING = "embeddings.token_embedding.weight"
_BASE_TOKENIZER_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".onnx")
# LDM token embedding tensor -> (text encoder component, family)
_LDM_TOKEN_EMBEDDINGS = {
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": ("text_encoder", "sd1"),
    "cond_stage_model.transformer.embeddings.token_embedding.weight": ("text_encoder", "sd1"),
    "cond_stage_model.model.token_embedding.weight": ("text_encoder", "sd2"),
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight":
        ("text_encoder", "sdxl-base"),
    "conditioner.embedders.1.model.token_embedding.weight": ("text_encoder_2", "sdxl-base"),
}
# where each family's tokenizers live on the Hugging Face hub (read from the local cache only)
_REFERENCE_TOKENIZERS = {
    "sd1": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd2": "stabilityai/stable-diffusion-2-1",
    "sdxl-base": "stabilityai/stable-diffusion-xl-base-1.0",
}


@dataclass(frozen=True)
class EmbeddingRequest:
    """One embedding to insert, with the token prompts will use for it."""

    embedding: Embedding
    token: str


@dataclass(frozen=True)
class TextEncoderSlot:
    """A token embedding table of the target model."""

    component: str  # "text_encoder" | "text_encoder_2"
    tensor: str  # its name in the model (pipelines: within the component)
    rows: int
    width: int


@dataclass
class EmbedResult:
    output: Path  # a diffusers pipeline folder
    rows: dict[str, tuple[int, int]]  # component -> (rows before, rows after)
    ids: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # token -> component -> ids

    def to_json(self) -> dict[str, Any]:
        return {"output": str(self.output), "rows": {k: list(v) for k, v in self.rows.items()}, "ids": self.ids}


@dataclass(frozen=True)
class CheckpointSources:
    """Where a single-file model's conversion takes what the file lacks."""

    config_dir: Path | None = None  # a diffusers folder of the same model: configs, scheduler, tokenizers
    tokenizer: Path | None = None  # a pipeline folder, or a tokenizer folder for single-encoder models


def add_embeddings(model_path: str | os.PathLike[str], requests: Sequence[EmbeddingRequest],
                   output: str | os.PathLike[str], *, to: str | None = None,
                   sources: CheckpointSources = CheckpointSources(),
                   force: bool = False, progress: Progress | None = None) -> EmbedResult:
    """Write a diffusers pipeline folder of the model whose tokenizer(s) and text
    encoder(s) know the tokens. A single-file model needs `to="diffusers"`: no
    single-file loader could use the grown checkpoint (see the module docstring).

    `force` overwrites the output and lets a token that is already in the vocabulary take
    the embedding's vectors in place of its own.
    """
    output, source = Path(output), Path(model_path)
    if to not in (None, "diffusers"):
        raise SdkitError(f"--to must be diffusers, not {to!r}")
    _check_requests(requests)
    inputs = (source, sources.config_dir, sources.tokenizer, *(request.embedding.path for request in requests))
    check_output_path(output, inputs, force=force)
    if source.resolve() in output.resolve().parents:  # the copy would be built inside what it copies
        raise SdkitError(f"{output}: is inside the model folder {source}; write the copy elsewhere")
    with open_model(source) as model:
        if model.format == "diffusers":
            if model.extra.get("model_index") is None:
                raise SdkitError(f"{source}: a lone component folder; give the pipeline folder")
            if sources != CheckpointSources():
                raise SdkitError(f"{source}: --config and --tokenizer are for a single-file model; "
                                 "a pipeline folder brings its own")
            return _add_to_pipeline(model, requests, output, force, progress)
        return _add_to_checkpoint(model, requests, output, to, sources, force, progress)


def _single_file_refusal(source: Path, requests: Sequence[EmbeddingRequest]) -> SdkitError:
    """What works instead; the clients call an embedding by its file name."""
    files = ", ".join(request.embedding.path.name for request in requests)
    names = ", ".join(request.embedding.path.stem for request in requests)
    return SdkitError(
        f"{source}: new tokens cannot go into a single-file checkpoint: ComfyUI, A1111 and Forge build "
        f"CLIP with its 49408 token rows and their own tokenizer, so a grown table does not load; "
        f"put {files} in the client's embeddings folder and write {names} in the prompt "
        f"(ComfyUI: embedding:{requests[0].embedding.path.stem}), or write a diffusers folder: "
        "--to diffusers -o FOLDER")


def _check_requests(requests: Sequence[EmbeddingRequest]) -> None:
    if not requests:
        raise SdkitError("no embeddings to add")
    seen: dict[str, Path] = {}
    for request in requests:
        for token in vector_tokens(request.token, request.embedding.vector_count):
            if token in seen:
                raise SdkitError(f"{request.embedding.path}: token {token!r} is also used by "
                                 f"{seen[token]}; give each embedding its own (EMB:TOKEN)")
            seen[token] = request.embedding.path


def _check_fit(model: ModelFile, slots: list[TextEncoderSlot], requests: Sequence[EmbeddingRequest]) -> None:
    """Refuse embeddings whose vectors do not fit the model's text encoders."""
    model_widths = {slot.component: slot.width for slot in slots}
    described = ", ".join(f"{name} {width}" for name, width in model_widths.items())
    for request in requests:
        embedding = request.embedding
        if set(embedding.widths) != set(model_widths):
            theirs = ", ".join(f"{name} {width}" for name, width in embedding.widths.items())
            raise SdkitError(f"{embedding.path}: has vectors for {theirs} but {model.path} has "
                             f"text encoders {described}; it was made for another model family")
        for component, width in embedding.widths.items():
            if width != model_widths[component]:
                raise SdkitError(f"{embedding.path}: vectors of dimension {width} do not fit "
                                 f"{component} of {model.path} (dimension {model_widths[component]})")


# --------------------------------------------------------------------------- tokenizers


@dataclass
class _TokenizerEdit:
    """A tokenizer with the new tokens added, and the ids they got."""

    source: Path
    tokenizer: Any
    base_length: int
    ids: dict[str, list[int]]  # request token -> ids of its vector tokens


def _extend_tokenizer(source: Path, requests: Sequence[EmbeddingRequest], force: bool) -> _TokenizerEdit:
    from transformers import CLIPTokenizer

    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(source))
    except Exception as exc:  # transformers raises OSError, ValueError, ... for unusable folders
        raise SdkitError(f"{source}: cannot load a CLIP tokenizer ({exc.__class__.__name__})") from None
    base_length, vocabulary = len(tokenizer), tokenizer.get_vocab()
    for request in requests:
        count = request.embedding.vector_count
        taken = [token for token in vector_tokens(request.token, count) if token in vocabulary]
        if taken and not force:
            raise SdkitError(f"{request.embedding.path}: token {taken[0]!r} is already in the "
                             f"vocabulary of {source} (choose another with EMB:TOKEN, or --force "
                             "to give it these vectors)")
        if f"{request.token}_{count}" in tokenizer.get_added_vocab():
            raise SdkitError(f"{request.embedding.path}: {request.token!r} was added to {source} "
                             f"earlier with more than {count} vectors; add it to the original model")
    ids = {}
    for request in requests:
        tokens = vector_tokens(request.token, request.embedding.vector_count)
        tokenizer.add_tokens(tokens)
        ids[request.token] = [tokenizer.convert_tokens_to_ids(token) for token in tokens]
    return _TokenizerEdit(source, tokenizer, base_length, ids)


def _save_tokenizer(edit: _TokenizerEdit, destination: Path) -> None:
    edit.tokenizer.save_pretrained(str(destination))
    for name in _BASE_TOKENIZER_FILES:  # the tokenizers-backed writer leaves them out
        if (edit.source / name).is_file() and not (destination / name).exists():
            shutil.copy2(edit.source / name, destination / name)
    added = {token: index for token, index in edit.tokenizer.get_added_vocab().items()
             if index >= edit.tokenizer.vocab_size}
    (destination / "added_tokens.json").write_text(
        json.dumps(added, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def _rows_after(slot: TextEncoderSlot, edit: _TokenizerEdit) -> int:
    if edit.base_length > slot.rows:
        raise SdkitError(f"{edit.source}: the tokenizer has {edit.base_length} tokens but "
                         f"{slot.component} has {slot.rows} embedding rows; they do not belong together")
    return max([slot.rows] + [index + 1 for ids in edit.ids.values() for index in ids])


def _grown(model: ModelFile, slot: TextEncoderSlot, rows: int, edit: _TokenizerEdit,
           requests: Sequence[EmbeddingRequest]) -> LazyTensor:
    """The token embedding with the embeddings' vectors at their ids."""
    info = model.info(slot.tensor)

    def load() -> "torch.Tensor":
        import torch

        original = model.load(slot.tensor)
        table = torch.empty((rows, slot.width), dtype=original.dtype)
        table[: slot.rows] = original
        for request in requests:
            vectors = request.embedding.vectors[slot.component]
            table[edit.ids[request.token]] = vectors.to(original.dtype)
        return table

    return LazyTensor(info.dtype, (rows, slot.width), load)


def _collect_ids(result: EmbedResult, component: str, edit: _TokenizerEdit) -> None:
    for token, ids in edit.ids.items():
        result.ids.setdefault(token, {})[component] = ids


# --------------------------------------------------------------------------- metadata


def _recipe(model: ModelFile, requests: Sequence[EmbeddingRequest]) -> str:
    files = [model.path] + [request.embedding.path for request in requests]
    return recipe_json("embed add", files, {"tokens": [request.token for request in requests]})


# --------------------------------------------------------------------------- outputs


def _copying(progress: Progress | None) -> Callable[[str, str], Any]:
    def copy(source: str, destination: str) -> Any:
        result = shutil.copy2(source, destination)
        if progress is not None:
            progress(os.path.getsize(destination))
        return result

    return copy


# --------------------------------------------------------------------------- pipelines


def _pipeline_slots(model: ModelFile) -> list[TextEncoderSlot]:
    slots = []
    for component in sorted(model.components):
        tokenizer = model.path / component.replace("text_encoder", "tokenizer", 1)
        keys = [key for key in model.components[component].infos if key.endswith(_TOKEN_EMBEDDING)]
        if component.startswith("text_encoder") and len(keys) == 1 and tokenizer.is_dir():
            rows, width = model.components[component].info(keys[0]).shape
            slots.append(TextEncoderSlot(component, keys[0], rows, width))
    if not slots:
        raise SdkitError(f"{model.path}: no CLIP text encoder with a tokenizer folder")
    return slots


def _add_to_pipeline(model: ModelFile, requests: Sequence[EmbeddingRequest], output: Path,
                     force: bool, progress: Progress | None) -> EmbedResult:
    slots = _pipeline_slots(model)
    _check_fit(model, slots, requests)
    edits = {slot.component: _extend_tokenizer(model.path / _tokenizer_name(slot), requests, force)
             for slot in slots}
    result = EmbedResult(output, {})
    metadata = {"format": "pt", RECIPE_KEY: _recipe(model, requests)}

    def fill(built: Path) -> None:
        changed = {slot.component for slot in slots} | {_tokenizer_name(slot) for slot in slots}
        for entry in sorted(model.path.iterdir()):
            if entry.name not in changed:
                _copy_entry(entry, built / entry.name, progress)
        for slot in slots:
            edit = edits[slot.component]
            rows = _rows_after(slot, edit)
            _write_text_encoder(model, slot, rows, _grown(model.components[slot.component], slot, rows,
                                                          edit, requests), built, metadata, progress)
            (built / _tokenizer_name(slot)).mkdir()
            _save_tokenizer(edit, built / _tokenizer_name(slot))
            result.rows[slot.component] = (slot.rows, rows)
            _collect_ids(result, slot.component, edit)

    build_in_partial(output, force, fill)
    return result


def _tokenizer_name(slot: TextEncoderSlot) -> str:
    return slot.component.replace("text_encoder", "tokenizer", 1)


def _copy_entry(entry: Path, destination: Path, progress: Progress | None) -> None:
    if entry.is_dir():
        shutil.copytree(entry, destination, copy_function=_copying(progress))
    else:
        _copying(progress)(str(entry), str(destination))


def _write_text_encoder(model: ModelFile, slot: TextEncoderSlot, rows: int, grown: LazyTensor,
                        built: Path, metadata: dict[str, str], progress: Progress | None) -> None:
    source, destination = model.path / slot.component, built / slot.component
    destination.mkdir()
    for file in source.iterdir():  # configs and notes; every weight file is replaced below
        if file.is_file() and not file.name.endswith((*_WEIGHT_SUFFIXES, ".index.json")):
            shutil.copy2(file, destination / file.name)
    config = read_json(source / "config.json")
    if isinstance(config, dict):
        config["vocab_size"] = rows
        (destination / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    weights = find_weights(source)
    name = weights.name if weights is not None and weights.suffix == ".safetensors" else "model.safetensors"
    tensors = lazy_tensors(model.components[slot.component])
    tensors[slot.tensor] = grown
    # in the layout every client reads, whichever the input folder had
    from sdkit.ops.folders import stored_tensors  # (imports torch)

    write_safetensors(destination / name, stored_tensors(slot.component, tensors), metadata, progress=progress)


# --------------------------------------------------------------------------- single files


def _checkpoint_slots(model: ModelFile) -> tuple[list[TextEncoderSlot], str]:
    found = [(key, *_LDM_TOKEN_EMBEDDINGS[key]) for key in model.infos if key in _LDM_TOKEN_EMBEDDINGS]
    families = {family for _key, _component, family in found}
    components = [component for _key, component, _family in found]
    if not found or len(families) != 1 or len(set(components)) != len(components):
        raise SdkitError(f"{model.path}: no SD1, SD2 or SDXL text encoder token embedding found "
                         "(is this a full checkpoint?)")
    slots = [TextEncoderSlot(component, key, *model.info(key).shape) for key, component, _f in found]
    return sorted(slots, key=lambda slot: slot.component), families.pop()


def _base_tokenizers(model: ModelFile, slots: list[TextEncoderSlot], family: str,
                     given: Path | None) -> dict[str, Path]:
    """component -> folder of the tokenizer the checkpoint's text encoder was made with."""
    names = {slot.component: _tokenizer_name(slot) for slot in slots}
    if given is None:
        return _cached_tokenizers(model, family, names)
    if all((given / name).is_dir() for name in names.values()):
        return {component: given / name for component, name in names.items()}
    if list(names) == ["text_encoder"] and any((given / file).is_file() for file in (
            "tokenizer_config.json", "tokenizer.json", "vocab.json")):
        return {"text_encoder": given}
    alternative = " or to be a tokenizer folder" if len(names) == 1 else ""
    raise SdkitError(f"{given}: needs {' and '.join(f'{n}/' for n in names.values())} "
                     f"(a diffusers pipeline folder){alternative}")


def _cached_tokenizers(model: ModelFile, family: str, names: dict[str, str]) -> dict[str, Path]:
    from huggingface_hub import snapshot_download

    repo = _REFERENCE_TOKENIZERS[family]
    try:
        folder = Path(snapshot_download(repo, allow_patterns=[f"{n}/*" for n in names.values()],
                                        local_files_only=True))
    except Exception:  # huggingface_hub raises several types for "not in the cache"
        folder = None
    if folder is None or not all((folder / name).is_dir() for name in names.values()):
        raise SdkitError(f"{model.path}: a single-file checkpoint has no tokenizer and {repo} is "
                         "not in the local Hugging Face cache; give one with --tokenizer")
    return {component: folder / name for component, name in names.items()}


def _add_to_checkpoint(model: ModelFile, requests: Sequence[EmbeddingRequest], output: Path, to: str | None,
                       sources: CheckpointSources, force: bool, progress: Progress | None) -> EmbedResult:
    """A pipeline folder converted from the checkpoint, its token tables grown on the way."""
    from sdkit.arch import identify
    from sdkit.ops.folders import read_config_dir
    from sdkit.ops.folders import write_pipeline_folder
    from sdkit.ops.layout import convert_view, model_view

    slots, family = _checkpoint_slots(model)
    _check_fit(model, slots, requests)
    if to != "diffusers":
        raise _single_file_refusal(model.path, requests)
    if output.suffix.lower() in _WEIGHT_SUFFIXES:
        raise SdkitError(f"{output}: a diffusers pipeline is a folder; give a folder path")
    configs = read_config_dir(sources.config_dir)
    bases = _base_tokenizers(model, slots, family, _tokenizer_source(sources, slots))
    edits = {slot.component: _extend_tokenizer(bases[slot.component], requests, force) for slot in slots}
    identity = identify(model)
    view = model_view(model, identity)
    result = EmbedResult(output, {})
    for slot in slots:  # grown in the checkpoint's names: the conversion reads the new shape
        rows = _rows_after(slot, edits[slot.component])
        view.tensors[slot.tensor] = _grown(model, slot, rows, edits[slot.component], requests)
        if slot.component in configs:
            configs[slot.component] = {**configs[slot.component], "vocab_size": rows}
        result.rows[slot.component] = (slot.rows, rows)
        _collect_ids(result, slot.component, edits[slot.component])
    converted = convert_view(view, "diffusers", configs)
    metadata = {"format": "pt", RECIPE_KEY: _recipe(model, requests)}
    with tempfile.TemporaryDirectory(prefix="sdkit-embed-") as scratch:
        config_dir = _config_folder(Path(scratch), sources.config_dir, slots, edits)
        write_pipeline_folder(output, converted.tensors, converted.configs, converted.layout,
                              prediction=identity.prediction, zero_snr="zero_terminal_snr" in identity.facts,
                              metadata_for=lambda _component: metadata,
                              config_dir=config_dir, overwrite=force, progress=progress)
    return result


def _tokenizer_source(sources: CheckpointSources, slots: list[TextEncoderSlot]) -> Path | None:
    """--tokenizer, else the config folder when it has every tokenizer (else the HF cache)."""
    given = sources.config_dir
    if sources.tokenizer is not None or given is None:
        return sources.tokenizer
    return given if all((given / _tokenizer_name(slot)).is_dir() for slot in slots) else None


def _config_folder(scratch: Path, given: Path | None, slots: list[TextEncoderSlot],
                   edits: dict[str, _TokenizerEdit]) -> Path:
    """What the pipeline writer takes from its config folder (scheduler, feature extractor,
    model_index.json, tokenizers): the given folder's, with the tokenizers extended."""
    for name in ("scheduler", "feature_extractor"):
        if given is not None and (given / name).is_dir():
            shutil.copytree(given / name, scratch / name)
    if given is not None and (given / "model_index.json").is_file():
        shutil.copy2(given / "model_index.json", scratch / "model_index.json")
    for slot in slots:
        (scratch / _tokenizer_name(slot)).mkdir()
        _save_tokenizer(edits[slot.component], scratch / _tokenizer_name(slot))
    return scratch
