"""A prompt text as A1111 feeds it to CLIP: 75-token chunks with a weight per token.

Each attention piece (`prompt_syntax.attention_pieces`) is tokenized on its own, and the
tokens fill chunks of 75 in order. A chunk is closed early by a BREAK, and when it is full
while a comma stands among its last `COMMA_BACKTRACK` tokens, the tokens after that comma
move on to the next chunk (A1111's `comma_padding_backtrack`, 20 by default). A
textual-inversion embedding's vectors never straddle two chunks: when they do not fit, the
chunk is closed first. Every chunk is then wrapped in the tokenizer's start and end tokens
and filled to 77 with end tokens, weight 1 outside the text (A1111's `tokenize_line`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sdkit.runtime.sample.prompt_syntax import attention_pieces, is_break

CHUNK = 75  # prompt tokens per chunk, between the start and end tokens
COMMA_BACKTRACK = 20


@dataclass
class Chunk:
    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


def _embedding_at(ids: Sequence[int], position: int, runs: Mapping[int, tuple[int, ...]]) -> tuple[int, ...] | None:
    """The placeholder ids of the embedding that starts at `position`, if one does."""
    run = runs.get(ids[position])
    if run is None or tuple(ids[position:position + len(run)]) != run:
        return None
    return run


class _Filler:
    """Fills chunks token by token, as A1111's `tokenize_line` does."""

    def __init__(self, tokenizer: Any, backtrack: int) -> None:
        self.start, self.end = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.comma = tokenizer.get_vocab().get(",</w>")
        self.backtrack = backtrack
        self.chunks: list[Chunk] = []
        self.current = Chunk()
        self.last_comma = -1

    def close(self) -> None:
        missing = CHUNK - len(self.current.tokens)
        tokens = [self.start, *self.current.tokens, *[self.end] * missing, self.end]
        weights = [1.0, *self.current.weights, *[1.0] * missing, 1.0]
        self.chunks.append(Chunk(tokens, weights))
        self.current = Chunk()
        self.last_comma = -1

    def before_token(self, token: int) -> None:
        """Note a comma, or close a full chunk (carrying the words after a near comma on)."""
        current = self.current
        if token == self.comma:
            self.last_comma = len(current.tokens)
        elif (self.backtrack and len(current.tokens) == CHUNK and self.last_comma != -1
              and len(current.tokens) - self.last_comma <= self.backtrack):
            cut = self.last_comma + 1
            moved = Chunk(current.tokens[cut:], current.weights[cut:])
            del current.tokens[cut:], current.weights[cut:]
            self.close()
            self.current = moved
        if len(self.current.tokens) == CHUNK:
            self.close()

    def add(self, tokens: Sequence[int], weight: float) -> None:
        self.current.tokens += tokens
        self.current.weights += [weight] * len(tokens)

    def piece(self, ids: Sequence[int], weight: float, runs: Mapping[int, tuple[int, ...]]) -> None:
        position = 0
        while position < len(ids):
            self.before_token(ids[position])
            run = _embedding_at(ids, position, runs)
            if run is None:
                self.add([ids[position]], weight)
                position += 1
                continue
            if len(self.current.tokens) + len(run) > CHUNK:
                self.close()
            self.add(run, weight)
            position += len(run)


def prompt_chunks(tokenizer: Any, text: str, embeddings: Mapping[int, tuple[int, ...]] | None = None,
                  backtrack: int = COMMA_BACKTRACK) -> list[Chunk]:
    """The 77-token chunks of `text` (one empty chunk for an empty text). `embeddings` maps
    the first placeholder id of each loaded embedding to all of its ids."""
    pieces = attention_pieces(text)
    ids = tokenizer([piece for piece, _ in pieces], add_special_tokens=False, truncation=False,
                    verbose=False)["input_ids"]
    filler = _Filler(tokenizer, backtrack)
    for piece, piece_ids in zip(pieces, ids):
        if is_break(piece):
            filler.close()
        else:
            filler.piece(piece_ids, piece[1], embeddings or {})
    if filler.current.tokens or not filler.chunks:
        filler.close()
    return filler.chunks


def empty_chunk(tokenizer: Any) -> Chunk:
    """The chunk that stands in for a missing one (a shorter text of the same batch)."""
    return Chunk([tokenizer.bos_token_id] + [tokenizer.eos_token_id] * (CHUNK + 1), [1.0] * (CHUNK + 2))
