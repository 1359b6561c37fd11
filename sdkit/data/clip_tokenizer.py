"""The CLIP text tokenizer, built from the BPE merges sdkit ships.

SD 1.x (CLIP ViT-L/14), SD 2.x (OpenCLIP ViT-H/14) and SDXL (both, and OpenCLIP
ViT-bigG/14) all read one vocabulary: OpenAI CLIP's byte-level BPE. Its reference
tokenizer (openai/CLIP `simple_tokenizer.py`, open_clip `tokenizer.py`) derives the
vocabulary from the merges file alone, and so does this module:
- the 256 byte symbols of the GPT-2 byte-to-character table, then the same 256 with the
  word-end mark `</w>`;
- one token per merge, in merge order, for the first 49152 - 256 - 2 = 48894 merges of the
  file (its first line is a header);
- `<|startoftext|>` (49406) and `<|endoftext|>` (49407) last: 49408 tokens.
The encoders differ only in the padding token: CLIP-L pads with `<|endoftext|>`, the
OpenCLIP encoders with `!` (id 0, what open_clip's tokenizer pads with).

`write_clip_tokenizer` writes them as a Hugging Face tokenizer folder (`vocab.json`,
`merges.txt` with its `#version` header, `tokenizer_config.json`,
`special_tokens_map.json`), the files a diffusers pipeline's `tokenizer/` holds and
every transformers version reads.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

MERGES_FILE = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
VOCAB_SIZE = 49408
MAX_LENGTH = 77  # CLIP's context: every SD text encoder has 77 positions
START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
OPENCLIP_PAD = "!"
WORD_END = "</w>"
_BYTE_SYMBOLS = 256
_MERGES_USED = VOCAB_SIZE - 2 * _BYTE_SYMBOLS - 2


def byte_symbols() -> list[str]:
    """The printable character standing for each byte 0..255 (GPT-2's table, which CLIP
    reuses): printable Latin-1 bytes stand for themselves, the others take the
    characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = {byte: chr(byte) for byte in printable}
    others = [byte for byte in range(_BYTE_SYMBOLS) if byte not in symbols]
    symbols.update({byte: chr(_BYTE_SYMBOLS + i) for i, byte in enumerate(others)})
    return [symbols[byte] for byte in [*printable, *others]]


@lru_cache(maxsize=1)
def clip_merges() -> tuple[tuple[str, str], ...]:
    """The merges CLIP uses, in rank order (the file holds more than it reads)."""
    lines = gzip.decompress(MERGES_FILE.read_bytes()).decode("utf-8").split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1:1 + _MERGES_USED])
    if len(merges) != _MERGES_USED or any(len(pair) != 2 for pair in merges):
        raise ValueError(f"{MERGES_FILE}: not CLIP's merges file")
    return merges  # type: ignore[return-value]


@lru_cache(maxsize=1)
def clip_vocabulary() -> dict[str, int]:
    """token -> id, ordered as CLIP's reference tokenizer numbers them."""
    symbols = byte_symbols()
    tokens = [*symbols, *(symbol + WORD_END for symbol in symbols),
              *("".join(pair) for pair in clip_merges()), START_OF_TEXT, END_OF_TEXT]
    return {token: index for index, token in enumerate(tokens)}


def tokenizer_config(pad_token: str) -> dict[str, Any]:
    """tokenizer_config.json of a CLIP tokenizer that pads with `pad_token`."""
    return {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "do_lower_case": True,
            "errors": "replace", "add_prefix_space": False, **special_tokens(pad_token)}


def special_tokens(pad_token: str) -> dict[str, str]:
    return {"bos_token": START_OF_TEXT, "eos_token": END_OF_TEXT, "unk_token": END_OF_TEXT, "pad_token": pad_token}


def write_clip_tokenizer(folder: Path, pad_token: str = END_OF_TEXT) -> None:
    """A Hugging Face CLIP tokenizer folder (created if missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(clip_vocabulary(), ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in clip_merges()),
                                       encoding="utf-8")
    for name, value in (("tokenizer_config.json", tokenizer_config(pad_token)),
                        ("special_tokens_map.json", special_tokens(pad_token))):
        (folder / name).write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def clip_tokenizer(pad_token: str = END_OF_TEXT) -> Any:
    """A fresh transformers `CLIPTokenizer` of the shipped vocabulary (callers may add
    tokens to it, so none is shared)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="sdkit-clip-") as folder:
        write_clip_tokenizer(Path(folder), pad_token)
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
