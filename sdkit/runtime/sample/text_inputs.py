"""A1111 conditioning handed to a diffusers SD/SDXL pipeline, switched as the steps go.

The pipeline gets the conditioning of step 0 as `prompt_embeds` (and SDXL's pooled
vectors); after each step its `callback_on_step_end` hands back the next step's tensors
when prompt editing or alternation changes them. Steps are counted as the pipeline's loop
counts them, one per UNet evaluation, which is how A1111 counts its denoiser calls (Heun:
2n-1), and schedules span A1111's `total_steps` (`scheduler.schedule_steps`), so an edit
switches at the call A1111 switches at.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from sdkit.runtime.sample.conditioning import (
    Conditioning,
    paired_conditioning,
    text_readers,
)


@dataclass
class ScheduledText:
    """Prompt and negative prompt conditioning of one pipeline call of `count` pictures."""

    positive: Conditioning
    negative: Conditioning
    count: int
    calls_per_iteration: int = 1  # A1111's model calls per pipeline loop iteration
    _current: tuple[int, int] = field(default=(0, 0), init=False)

    @property
    def sdxl(self) -> bool:
        return self.positive.pooled is not None

    def arguments(self) -> dict[str, Any]:
        """The pipeline's text arguments at step 0."""
        self._current = (self.positive.index_at(0), self.negative.index_at(0))
        hidden, pooled = self.positive.at(0)
        negative_hidden, negative_pooled = self.negative.at(0)
        arguments = {"prompt_embeds": hidden, "negative_prompt_embeds": negative_hidden}
        if self.sdxl:
            arguments.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=negative_pooled)
        return arguments

    @property
    def changes(self) -> bool:
        return len(self.positive.ends) > 1 or len(self.negative.ends) > 1

    @property
    def tensor_inputs(self) -> list[str]:
        """The loop tensors the step callback replaces."""
        if not self.changes:
            return []
        return ["prompt_embeds", "add_text_embeds"] if self.sdxl else ["prompt_embeds"]

    @property
    def filled(self) -> bool:
        """Whether one side was filled up to the other's length."""
        return self.positive.length != self.negative.length

    def attention_mask(self, rows: int, tokens: int, device: torch.device) -> torch.Tensor:
        """1 over each row's own prompt, 0 over its filling, rows as the loop lays them out."""
        if rows == 2 * self.count:
            lengths = [self.negative.length] * self.count + [self.positive.length] * self.count
        else:
            lengths = [self.positive.length] * rows
        positions = torch.arange(tokens, device=device)
        return positions.unsqueeze(0) < torch.tensor(lengths, device=device).unsqueeze(1)

    def _batch(self, negative: torch.Tensor, positive: torch.Tensor, guided: bool, like: torch.Tensor) -> torch.Tensor:
        """The loop's layout: `count` negatives then `count` prompts (prompts alone without CFG)."""
        repeat = (self.count,) + (1,) * (positive.dim() - 1)
        parts = [negative.repeat(repeat), positive.repeat(repeat)] if guided else [positive.repeat(repeat)]
        return torch.cat(parts).to(like.device, like.dtype)

    def after_step(self, pipe: Any, step: int, tensors: dict[str, Any]) -> dict[str, Any]:
        """The callback's replacement tensors for the step after `step`."""
        call = (step + 1) * self.calls_per_iteration  # A1111's denoiser call at the next iteration
        following = (self.positive.index_at(call), self.negative.index_at(call))
        if not self.changes or following == self._current:
            return tensors
        self._current = following
        hidden, pooled = self.positive.at(call)
        negative_hidden, negative_pooled = self.negative.at(call)
        guided = bool(pipe.do_classifier_free_guidance)
        tensors["prompt_embeds"] = self._batch(negative_hidden, hidden, guided, tensors["prompt_embeds"])
        if self.sdxl:
            tensors["add_text_embeds"] = self._batch(negative_pooled, pooled, guided, tensors["add_text_embeds"])
        return tensors


def scheduled_text(pipe: Any, family: str, prompt: str, negative: str, clip_skip: int, steps: int, count: int,
                   embeddings: Mapping[str, Mapping[int, tuple[int, ...]]] | None = None,
                   first_pass: int | None = None) -> ScheduledText:
    """The conditioning of `prompt` and `negative` over `steps` loop steps (of a hires pass
    after `first_pass` steps, when given). An empty SDXL negative prompt is zeros (A1111's
    rule, and the unconditional input SDXL was trained on)."""
    readers = text_readers(pipe, family, clip_skip, embeddings)
    positive, negative_conditioning = paired_conditioning(readers, prompt, negative, steps,
                                                          family == "sdxl-base", first_pass)
    return ScheduledText(positive, negative_conditioning, count)


@contextmanager
def own_lengths(pipe: Any, text: ScheduledText | None) -> Iterator[None]:
    """While it lasts, the UNet's cross-attention ignores the filling of the shorter side,
    so each side is attended over its own tokens only: the same as A1111 running the UNet
    on prompt and negative prompt separately when their lengths differ (its default)."""
    if text is None or not text.filled:
        yield
        return
    unet = pipe.unet
    own = unet.__dict__.get("forward")
    forward = unet.forward

    def masked(*args: Any, **kwargs: Any) -> Any:
        hidden = kwargs["encoder_hidden_states"]
        kwargs["encoder_attention_mask"] = text.attention_mask(hidden.shape[0], hidden.shape[1], hidden.device)
        return forward(*args, **kwargs)

    unet.forward = masked
    try:
        yield
    finally:
        if own is None:
            del unet.forward
        else:
            unet.forward = own
