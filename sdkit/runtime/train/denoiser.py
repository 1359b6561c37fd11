"""The model under training as one module: captions in, noise prediction out.

`Denoiser` holds the UNet, the text encoders and any extra trainable module (a
hypernetwork's MLPs), so that accelerate sees every trained parameter in one place: it
places it, wraps it for multi-GPU data parallelism and runs its forward under autocast.
Text is encoded as the pipelines encode it: SD 1.x / 2.x use the last hidden state
(their diffusers configs already end at the layer SD reads); SDXL concatenates both
encoders' penultimate hidden states and adds the second one's pooled projection with the
size / crop "time ids" (original size, crop top-left, target size).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from sdkit.runtime.train.buckets import Crop, Size

_TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}


class Denoiser(nn.Module):
    def __init__(self, pipe: Any, family: str, text_grad: bool, extra: nn.Module | None = None) -> None:
        super().__init__()
        self.unet = pipe.unet
        self.sdxl = family == "sdxl-base"
        names = [name for name in ("text_encoder", "text_encoder_2") if getattr(pipe, name, None) is not None]
        self.encoders = nn.ModuleList(getattr(pipe, name) for name in names)
        self.tokenizers = [getattr(pipe, _TOKENIZERS[name]) for name in names]
        self.text_grad = text_grad
        self.extra = extra

    def tokenize(self, captions: Sequence[str]) -> list[torch.Tensor]:
        return [tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids for tokenizer in self.tokenizers]

    def encode(self, ids: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(context for cross-attention, pooled text embedding for SDXL)."""
        if not self.sdxl:
            return self.encoders[0](ids[0])[0], None
        states, pooled = [], None
        for encoder, token_ids in zip(self.encoders, ids):
            out = encoder(token_ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = getattr(out, "text_embeds", None)
        return torch.cat(states, dim=-1), pooled

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, ids: Sequence[torch.Tensor],
                time_ids: torch.Tensor | None = None) -> torch.Tensor:
        device = noisy.device
        with torch.set_grad_enabled(self.text_grad and torch.is_grad_enabled()):
            context, pooled = self.encode([token_ids.to(device) for token_ids in ids])
        added = None
        if self.sdxl:
            added = {"text_embeds": pooled, "time_ids": time_ids.to(device, context.dtype)}
        return self.unet(noisy, timesteps, context, added_cond_kwargs=added).sample


def sdxl_time_ids(sizes: Sequence[Size], crops: Sequence[Crop], bucket: Size) -> torch.Tensor:
    """SDXL micro-conditioning per sample, as diffusers' SDXL trainers compute it:
    (original height, width, crop top, crop left, target height, width)."""
    rows = [[height, width, crop.top, crop.left, bucket[1], bucket[0]]
            for (width, height), crop in zip(sizes, crops)]
    return torch.tensor(rows, dtype=torch.float32)
