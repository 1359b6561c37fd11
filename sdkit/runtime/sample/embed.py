"""Textual-inversion embeddings loaded into a pipeline's tokenizers and text encoders.

Each embedding gets placeholder tokens of its own (`<sdkit-ti-3-0>`, `<sdkit-ti-3-1>`, ...,
one per vector) added to every tokenizer, and its vectors written into the matching rows
of each text encoder's token table (grown when the new ids do not fit). Prompts are then
rewritten: every word-mention of the embedding's name becomes its placeholders. So a
name that is also an ordinary word never overwrites that word's vector, and prompts that
do not mention an embedding encode exactly as before. The placeholders carry no `_1`
suffixes, so diffusers' own multi-vector prompt expansion leaves them alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdkit.adapters.embedding import Embedding
from sdkit.errors import SdkitError
from sdkit.io import hash_file
from sdkit.runtime.sample.prompt import mentions, replace_name

_TOKENIZER_OF = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}


@dataclass
class LoadedEmbedding:
    embedding: Embedding
    placeholders: str  # what a mention of the name becomes
    short_hash: str | None  # the 12-hex sha256 prefix A1111 writes as a "TI hash"


def embedding_short_hash(path: Path) -> str | None:
    sha256 = hash_file(path).sha256
    return sha256[:12] if sha256 else None


class PromptEmbeddings:
    """The embeddings of one pipeline, by name."""

    def __init__(self, pipe: Any, components: list[str]) -> None:
        self.pipe = pipe
        self.components = components
        self.loaded: dict[str, LoadedEmbedding] = {}

    def add(self, embedding: Embedding) -> None:
        """Load `embedding` (refused when its vectors do not fit the text encoders)."""
        if embedding.token.lower() in self.loaded:
            return
        self._check_fits(embedding)
        index = len(self.loaded)
        tokens = [f"<sdkit-ti-{index}-{n}>" for n in range(embedding.vector_count)]
        for component in self.components:
            self._write_rows(component, tokens, embedding.vectors[component])
        self.loaded[embedding.token.lower()] = LoadedEmbedding(
            embedding, " ".join(tokens), embedding_short_hash(embedding.path))

    def _check_fits(self, embedding: Embedding) -> None:
        wanted = {c: getattr(self.pipe, c).get_input_embeddings().weight.shape[1] for c in self.components}
        if embedding.widths != wanted:
            have = ", ".join(f"{c} {w}" for c, w in embedding.widths.items())
            need = ", ".join(f"{c} {w}" for c, w in wanted.items())
            raise SdkitError(f"{embedding.path}: its vectors ({have}) do not fit this model's text encoders "
                             f"({need}); it was made for another model family")

    def _write_rows(self, component: str, tokens: list[str], vectors: torch.Tensor) -> None:
        tokenizer = getattr(self.pipe, _TOKENIZER_OF[component])
        encoder = getattr(self.pipe, component)
        tokenizer.add_tokens(tokens)
        ids = tokenizer.convert_tokens_to_ids(tokens)
        table = encoder.get_input_embeddings()
        if max(ids) >= table.weight.shape[0]:
            # grow, never shrink: toy tokenizers are smaller than their tables
            encoder.resize_token_embeddings(max(ids) + 1)
            table = encoder.get_input_embeddings()
        with torch.no_grad():
            table.weight[ids] = vectors.to(table.weight.device, table.weight.dtype)

    def rewrite(self, text: str) -> str:
        """`text` with every loaded embedding's name replaced by its placeholders."""
        for name, loaded in self.loaded.items():
            text = replace_name(text, name, loaded.placeholders)
        return text

    def placeholder_runs(self) -> dict[str, dict[int, tuple[int, ...]]]:
        """Per text encoder: the first placeholder id of each embedding -> all its ids,
        so prompts can keep an embedding's vectors together."""
        runs: dict[str, dict[int, tuple[int, ...]]] = {}
        for component in self.components:
            tokenizer = getattr(self.pipe, _TOKENIZER_OF[component])
            ids = [tuple(tokenizer.convert_tokens_to_ids(loaded.placeholders.split()))
                   for loaded in self.loaded.values()]
            runs[component] = {run[0]: run for run in ids}
        return runs

    def used_in(self, *texts: str) -> list[LoadedEmbedding]:
        """The loaded embeddings some text mentions (for the PNG's TI hashes)."""
        return [loaded for name, loaded in self.loaded.items() if any(mentions(t, name) for t in texts)]
