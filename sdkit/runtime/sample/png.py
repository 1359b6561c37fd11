"""A1111's `parameters` PNG text: written with every sample, read back from any PNG.

The text is what A1111 (`modules/processing.py::create_infotext`) writes and what
A1111's "PNG Info", ComfyUI and civitai read:

    a red circle <lora:style:0.8>
    Negative prompt: blurry
    Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: 0123456789, Model: toy-sd1, Lora hashes: "style: 0123456789ab", Version: sdkit 0.1.0

Fields whose value holds a comma, a colon or a line break are JSON-quoted, others are
written as they are; fields without a value are left out; the negative-prompt line only
when there is one. Reading follows A1111's `parse_generation_parameters`: the last line
is the field line when it holds at least three `key: value` pairs.

Also where a run's PNGs go (`picture_paths`), without torch, so the command line can
refuse a bad output path before it loads anything.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from sdkit.errors import SdkitError
from sdkit.io.output_path import write_file_atomically

PARAMETERS_KEY = "parameters"
# `key: value` where value is a JSON string or runs to the next comma
_FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_NEGATIVE = "Negative prompt:"


def quote(value: Any) -> str:
    text = str(value)
    if any(mark in text for mark in ",\n:"):
        return json.dumps(text, ensure_ascii=False)
    return text


def unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            return str(json.loads(text))
        except ValueError:
            return text
    return text


def format_number(value: float) -> str:
    """7.0 -> "7", 7.5 -> "7.5", as people type them."""
    return f"{value:g}"


def format_parameters(prompt: str, negative: str, fields: Iterable[tuple[str, Any]]) -> str:
    """The `parameters` text for one image; fields with value None are left out."""
    line = ", ".join(f"{key}: {quote(value)}" for key, value in fields if value is not None)
    negative_line = f"\n{_NEGATIVE} {negative}" if negative else ""
    return f"{prompt}{negative_line}\n{line}".strip()


def format_hashes(hashes: dict[str, str]) -> str | None:
    """`name: hash, name: hash` with `:` and `,` taken out of names, as A1111 writes
    its `Lora hashes` and `TI hashes` fields; None when empty."""
    if not hashes:
        return None
    clean = {name.translate(str.maketrans("", "", ":,")): value for name, value in hashes.items()}
    return ", ".join(f"{name}: {value}" for name, value in clean.items())


def parse_parameters(text: str) -> dict[str, str]:
    """`{"Prompt", "Negative prompt", <field>: <value>, ...}` from a `parameters` text."""
    *lines, last = text.strip().split("\n")
    if len(_FIELD.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        line = line.strip()
        if line.startswith(_NEGATIVE):
            negative.append(line[len(_NEGATIVE):].strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    result = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _FIELD.findall(last):
        result[key.strip()] = unquote(value.strip())
    return result


def parse_hashes(value: str) -> dict[str, str]:
    """`"a: 0123, b: 4567"` (a `Lora hashes` / `TI hashes` value) -> {"a": "0123", ...}."""
    pairs = (item.split(":", 1) for item in value.split(",") if ":" in item)
    return {name.strip(): digest.strip() for name, digest in pairs}


# fields read as numbers in `generation_summary`, by the name A1111 writes
_INTEGER_FIELDS = {"Steps": "steps", "Seed": "seed", "Clip skip": "clip_skip", "Hires steps": "hires_steps"}
_FLOAT_FIELDS = {"CFG scale": "cfg_scale", "Denoising strength": "denoising_strength",
                 "Hires upscale": "hires_upscale"}
_TEXT_FIELDS = {"Sampler": "sampler", "Schedule type": "schedule_type", "Model": "model",
                "Model hash": "model_hash", "VAE": "vae", "VAE hash": "vae_hash", "Version": "version"}
_HASH_FIELDS = {"Lora hashes": "lora_hashes", "TI hashes": "ti_hashes"}
_SIZE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*$")


def _parsed(value: str, kind: type) -> Any:
    try:
        return kind(value)
    except ValueError:
        return None


def generation_summary(fields: dict[str, str]) -> dict[str, Any]:
    """The fields of `parse_parameters` as typed values (README: `inspect` of a PNG).

    Numbers become numbers (None where the text is not one), `Size` becomes width and
    height, `Lora hashes` / `TI hashes` maps of name -> hash, the prompt's LoRA and
    hypernetwork tags a list of {kind, name, te_strength, unet_strength}; every other field
    is kept as text under `other`.
    """
    from sdkit.runtime.sample.prompt import extract_networks

    summary: dict[str, Any] = {"prompt": fields.get("Prompt", ""),
                               "negative_prompt": fields.get("Negative prompt", "")}
    for names, kind in ((_INTEGER_FIELDS, int), (_FLOAT_FIELDS, float), (_TEXT_FIELDS, str)):
        for field, key in names.items():
            summary[key] = _parsed(fields[field], kind) if field in fields else None
    size = _SIZE.match(fields.get("Size", ""))
    summary["width"], summary["height"] = (int(size[1]), int(size[2])) if size else (None, None)
    for field, key in _HASH_FIELDS.items():
        summary[key] = parse_hashes(fields.get(field, ""))
    try:
        tags = extract_networks(summary["prompt"])[1]
    except SdkitError:  # a malformed tag: the prompt stays readable as text
        tags = []
    summary["networks"] = [{"kind": tag.kind, "name": tag.name, "te_strength": tag.te_strength,
                            "unet_strength": tag.unet_strength} for tag in tags]
    known = {"Prompt", "Negative prompt", "Size", *_INTEGER_FIELDS, *_FLOAT_FIELDS, *_TEXT_FIELDS,
             *_HASH_FIELDS}
    summary["other"] = {field: value for field, value in fields.items() if field not in known}
    return summary


def read_png_parameters(path: str | os.PathLike[str]) -> dict[str, str]:
    """The A1111 generation parameters stored in a PNG, parsed into fields.

    Keys: "Prompt", "Negative prompt", then every field in the order written ("Steps",
    "Sampler", "Seed", "Size", "Model hash", "Lora hashes", ...); values are strings.
    """
    text = png_texts(path).get(PARAMETERS_KEY)
    if not isinstance(text, str) or not text.strip():
        raise SdkitError(f"{path}: the PNG holds no generation parameters (no '{PARAMETERS_KEY}' text)")
    return parse_parameters(text)


def png_texts(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The text chunks (and other info) of a PNG; a file that is not one is refused."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                raise SdkitError(f"{path}: not a PNG image ({image.format})")
            return dict(image.info)
    except FileNotFoundError:
        raise SdkitError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise SdkitError(f"{path}: not a readable image ({exc.__class__.__name__})") from None


def picture_paths(output: str | os.PathLike[str], prompts: int, batch: int, *, one_picture: bool) -> list[Path]:
    """Where a run's pictures go: one PNG for a grid or an XY plot (`one_picture`), else one
    per prompt and seed."""
    return output_paths(Path(output), 1 if one_picture else prompts * batch)


def output_paths(output: Path, count: int) -> list[Path]:
    """`OUT` for one picture, `OUT-0`, `OUT-1`, ... (same suffix) for several."""
    if output.suffix.lower() != ".png":
        raise SdkitError(f"{output}: the output must be a .png file")
    return [output] if count == 1 else numbered_paths(output, count)


def numbered_paths(output: Path, count: int) -> list[Path]:
    """`OUT-0`, `OUT-1`, ... (same suffix), numbered even for one."""
    width = len(str(count - 1))
    return [output.with_name(f"{output.stem}-{index:0{width}d}{output.suffix}") for index in range(count)]


def check_output_paths(paths: Sequence[Path], overwrite: bool) -> None:
    """Refuse outputs that exist (unless `overwrite`) or whose folder is missing."""
    for path in paths:
        if path.exists() and not overwrite:
            raise SdkitError(f"{path}: already exists (overwriting needs --force)")
        if not path.parent.is_dir():
            raise SdkitError(f"{path.parent}: no such folder for the output")


def save_png(image: Any, path: Path, parameters: str, *, overwrite: bool = False) -> Path:
    """Write `image` with its `parameters` text atomically (temporary file, then rename)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(PARAMETERS_KEY, parameters)
    return write_file_atomically(path, lambda partial: image.save(partial, format="PNG", pnginfo=info),
                                 overwrite=overwrite)
