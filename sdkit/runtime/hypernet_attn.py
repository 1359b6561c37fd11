"""Run A1111 hypernetworks inside a diffusers UNet.

`attach_hypernetwork(unet, hn, strength)` gives every attention module of the UNet a
processor that computes exactly what diffusers' default `AttnProcessor2_0` computes,
except that the context fed to `to_k` and `to_v` first passes through the hypernetwork's
key and value MLPs: `k = to_k(h_k(context))`, `v = to_v(h_v(context))` with
`h(x) = x + mlp(x) * strength`, as A1111 applies them in every CrossAttention. The
context is the hidden states for self-attention (attn1) and the text for cross-attention
(attn2); the MLP pair is chosen by the context's last dimension, and a width the
hypernetwork has no pair for passes through unchanged. Attaching several hypernetworks
chains them in order. `detach_hypernetwork` puts the original processors back.

A hypernetwork cannot be baked into weights (its MLP is non-linear in the context), so
this runtime hook is the only way to apply one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sdkit.adapters.hypernet import Hypernetwork
from sdkit.errors import SdkitError

_REPLACEABLE = "AttnProcessor2_0"  # the processor whose math HypernetAttnProcessor reproduces


class HypernetAttnProcessor:
    """diffusers' AttnProcessor2_0 with hypernetwork-transformed key/value contexts."""

    def __init__(self, original: object) -> None:
        self.original = original
        self.stack: list[tuple[Hypernetwork, float]] = []

    def contexts(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(context for to_k, context for to_v) after every attached hypernetwork."""
        key_context = value_context = context
        for hypernetwork, strength in self.stack:
            pair = hypernetwork.layers.get(context.shape[-1])
            if pair is not None:
                key_context = pair[0](key_context, strength)
                value_context = pair[1](value_context, strength)
        return key_context, value_context

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: object, **kwargs: object) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key_context, value_context = self.contexts(encoder_hidden_states)
        key = attn.to_k(key_context)
        value = attn.to_v(value_context)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _attention_modules(unet: nn.Module) -> list[nn.Module]:
    from diffusers.models.attention_processor import Attention

    return [module for module in unet.modules() if isinstance(module, Attention)]


def attach_hypernetwork(unet: nn.Module, hn: Hypernetwork, strength: float = 1.0) -> None:
    """Apply `hn` at `strength` in every attention of `unet` (after any already attached).

    `hn` keeps its mode: hypernetworks are read in eval mode; in train mode its dropout is
    active and the strength is 1, as in A1111.
    """
    modules = _attention_modules(unet)
    if not modules:
        raise SdkitError(f"{type(unet).__name__} has no attention modules to attach a hypernetwork to")
    for module in modules:
        name = type(module.processor).__name__
        if not isinstance(module.processor, HypernetAttnProcessor) and name != _REPLACEABLE:
            raise SdkitError(f"hypernetworks need the default attention processor; this UNet "
                             f"uses {name} (attach them before other attention changes)")
    parameter = next(unet.parameters(), None)
    if parameter is not None:
        hn.to(parameter.device)
    for module in modules:
        processor = module.processor
        if not isinstance(processor, HypernetAttnProcessor):
            processor = HypernetAttnProcessor(processor)
            module.set_processor(processor)
        processor.stack.append((hn, float(strength)))


def detach_hypernetwork(unet: nn.Module, hn: Hypernetwork | None = None) -> None:
    """Remove `hn` (or every hypernetwork when None); modules left with none get their
    original processor back."""
    for module in _attention_modules(unet):
        processor = module.processor
        if not isinstance(processor, HypernetAttnProcessor):
            continue
        processor.stack = [] if hn is None else [item for item in processor.stack if item[0] is not hn]
        if not processor.stack:
            module.set_processor(processor.original)
