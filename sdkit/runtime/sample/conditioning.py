"""Prompt conditioning as A1111 computes it, for SD 1.x, SD 2.x and SDXL pipelines.

A prompt becomes a schedule of texts (`prompt_syntax.prompt_schedule`); all texts of one
schedule are encoded as one batch, chunk by chunk (`chunks.py`), a shorter text's missing
chunks standing in as empty ones. Each chunk's hidden states are multiplied by their
token weights and then rescaled so that the batch's mean is what it was before (A1111's
"Original" emphasis: the mean is over the whole batch of that chunk), and the chunks are
joined along the token axis.

Layers: SD1/SD2 read the last layer, or with CLIP skip n the hidden state n layers from
the end through the final norm; SDXL reads both encoders' penultimate hidden states (CLIP
skip n > 2 goes further back), joined along the features, and its pooled vector is the
second encoder's projected end-of-text state of the first chunk. An SDXL negative prompt
that is empty at every step is all zeros, pooled vector included.

The pipelines take one length for prompt and negative prompt: the shorter one is filled up
with the encoding of the empty prompt, 77 tokens at a time (what A1111's "Pad
prompt/negative prompt" setting does). `Conditioning.length` keeps the prompt's own
length, so the UNet can be kept from seeing the filling (`text_inputs.py`), which is what
A1111 does by default: it runs the UNet on each with its own length.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sdkit.runtime.sample.chunks import Chunk, empty_chunk, prompt_chunks
from sdkit.runtime.sample.prompt_syntax import prompt_schedule, text_at_step

_TOKENIZER_OF = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}


@dataclass(frozen=True)
class TextReader:
    """One CLIP text encoder with its tokenizer and the layer A1111 reads."""

    tokenizer: Any
    encoder: Any
    layer: Callable[[Any], torch.Tensor]  # encoder output -> hidden states
    pooled: bool = False  # whether this encoder gives the pooled vector
    embeddings: Mapping[int, tuple[int, ...]] | None = None  # placeholder id runs

    def chunks(self, text: str) -> list[Chunk]:
        return prompt_chunks(self.tokenizer, text, self.embeddings)

    def token_ids(self, chunks: Sequence[Chunk]) -> torch.Tensor:
        """The chunks' ids; past the first end token the tokenizer's padding id (0 for
        OpenCLIP's tokenizers, the end token for CLIP-L's), as A1111 pads."""
        ids = torch.tensor([chunk.tokens for chunk in chunks], device=self.encoder.device)
        end = self.tokenizer.eos_token_id
        for row in ids:
            first_end = int((row == end).nonzero()[0])
            row[first_end + 1:] = self.tokenizer.pad_token_id
        return ids

    def encode(self, chunks: Sequence[Chunk]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weighted hidden states, pooled vectors or None) of one chunk per batch row."""
        ids = self.token_ids(chunks)
        output = self.encoder(ids, output_hidden_states=True)
        hidden = self.layer(output)
        weighted = emphasized(hidden, [chunk.weights for chunk in chunks])
        if not self.pooled:
            return weighted, None
        ends = (ids == self.tokenizer.eos_token_id).int().argmax(dim=1)
        pooled = self.encoder.text_projection(output.last_hidden_state[torch.arange(len(ids)), ends])
        return weighted, pooled

    def encode_texts(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One batch: every text's chunks, joined along the tokens; pooled from chunk 0."""
        per_text = [self.chunks(text) for text in texts]
        count = max(len(chunks) for chunks in per_text)
        parts, pooled = [], None
        for index in range(count):
            column = [chunks[index] if index < len(chunks) else empty_chunk(self.tokenizer) for chunks in per_text]
            hidden, vectors = self.encode(column)
            parts.append(hidden)
            pooled = vectors if index == 0 else pooled
        return torch.cat(parts, dim=1), pooled


def emphasized(hidden: torch.Tensor, weights: Sequence[Sequence[float]]) -> torch.Tensor:
    """Hidden states times their token weights, rescaled to the batch's former mean.
    Weights of 1 leave the states as they are (A1111's rescale by mean/mean = 1 there; a
    mean of exactly 0, as tiny test encoders give, would make it 0/0)."""
    factors = torch.tensor(weights, device=hidden.device, dtype=hidden.dtype)
    if bool((factors == 1).all()):
        return hidden
    weighted = hidden * factors.unsqueeze(-1)
    new_mean = weighted.mean()
    return weighted if new_mean == 0 else weighted * (hidden.mean() / new_mean)


def sd_layer(encoder: Any, clip_skip: int) -> Callable[[Any], torch.Tensor]:
    if clip_skip == 1:
        return lambda output: output.last_hidden_state
    norm = getattr(encoder, "text_model", encoder).final_layer_norm
    return lambda output: norm(output.hidden_states[-clip_skip])


def sdxl_clip_skip(clip_skip: int) -> int | None:
    """A1111's CLIP skip as diffusers' SDXL `clip_skip`: SDXL always reads the penultimate
    layer (A1111's default there), so 1 and 2 both mean that; larger values go further back."""
    return clip_skip - 2 if clip_skip > 2 else None


def sdxl_layer(clip_skip: int) -> Callable[[Any], torch.Tensor]:
    back = (sdxl_clip_skip(clip_skip) or 0) + 2  # diffusers' SDXL rule: the hidden state clip_skip + 2 from the end
    return lambda output: output.hidden_states[-back]


def text_readers(pipe: Any, family: str, clip_skip: int,
                 embeddings: Mapping[str, Mapping[int, tuple[int, ...]]] | None = None) -> list[TextReader]:
    """The pipeline's text encoders as A1111 reads them; `embeddings` by component."""
    components = ["text_encoder", "text_encoder_2"] if family == "sdxl-base" else ["text_encoder"]
    readers = []
    for component in components:
        encoder = getattr(pipe, component)
        layer = sdxl_layer(clip_skip) if family == "sdxl-base" else sd_layer(encoder, clip_skip)
        readers.append(TextReader(getattr(pipe, _TOKENIZER_OF[component]), encoder, layer,
                                  pooled=component == "text_encoder_2",
                                  embeddings=(embeddings or {}).get(component)))
    return readers


@dataclass
class Conditioning:
    """A prompt's schedule: per entry, the last step it is used at, its hidden states (1, T, C)
    and pooled vector (1, P) (SDXL) or None."""

    ends: list[int]
    hidden: torch.Tensor  # (entries, T, C)
    pooled: torch.Tensor | None  # (entries, P)
    length: int = 0  # the tokens of the prompt itself, before any filling

    def __post_init__(self) -> None:
        self.length = self.length or self.hidden.shape[1]

    def index_at(self, step: int) -> int:
        return text_at_step([(end, None) for end in self.ends], step)

    def at(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        index = self.index_at(step)
        pooled = None if self.pooled is None else self.pooled[index:index + 1]
        return self.hidden[index:index + 1], pooled

    def padded(self, tokens: int, empty: torch.Tensor) -> Conditioning:
        """Filled up to `tokens` with repeats of the empty prompt's hidden states."""
        repeats = (tokens - self.hidden.shape[1]) // empty.shape[1]
        if repeats <= 0:
            return self
        filler = empty.expand(self.hidden.shape[0], -1, -1).repeat(1, repeats, 1)
        return Conditioning(self.ends, torch.cat([self.hidden, filler], dim=1), self.pooled, self.length)


def encode_texts(readers: Sequence[TextReader], texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every reader's hidden states of the batch, joined along the features."""
    encoded = [reader.encode_texts(texts) for reader in readers]
    pooled = next((vectors for _, vectors in encoded if vectors is not None), None)
    return torch.cat([hidden for hidden, _ in encoded], dim=-1), pooled


def prompt_conditioning(readers: Sequence[TextReader], prompt: str, steps: int,
                        zero_if_empty: bool = False, first_pass: int | None = None) -> Conditioning:
    """The conditioning schedule of one prompt over `steps` denoising steps (of a second
    pass after `first_pass` steps, when given)."""
    schedule = prompt_schedule(prompt, steps, first_pass)
    texts = [text for _, text in schedule]
    hidden, pooled = encode_texts(readers, texts)
    if zero_if_empty and all(text == "" for text in texts):
        hidden = torch.zeros_like(hidden)
        pooled = None if pooled is None else torch.zeros_like(pooled)
    return Conditioning([end for end, _ in schedule], hidden, pooled)


def paired_conditioning(readers: Sequence[TextReader], prompt: str, negative: str, steps: int,
                        zero_empty_negative: bool, first_pass: int | None = None) -> tuple[Conditioning, Conditioning]:
    """(prompt, negative prompt) conditioning of the same length."""
    positive = prompt_conditioning(readers, prompt, steps, first_pass=first_pass)
    negative_conditioning = prompt_conditioning(readers, negative, steps, zero_empty_negative, first_pass)
    tokens = max(positive.hidden.shape[1], negative_conditioning.hidden.shape[1])
    if positive.hidden.shape[1] == negative_conditioning.hidden.shape[1]:
        return positive, negative_conditioning
    empty, _ = encode_texts(readers, [""])
    return positive.padded(tokens, empty), negative_conditioning.padded(tokens, empty)
