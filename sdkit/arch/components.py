"""Find and measure text encoders and VAEs, in single files and diffusers folders alike.

VAEs are found by their decoder's first conv (LDM `decoder.up.*` or diffusers
`decoder.up_blocks.*`), which reads the latent channels; FLUX.2's also carries the latent
BatchNorm statistics (`bn.running_mean`), recorded as `latent_norm_channels`.

Text encoders are found by their token-embedding table:
- HF CLIP (`embeddings.token_embedding.weight`), with or without the `text_model.` level
  (transformers 5 saves `CLIPTextModel` without it; LDM and kohya files have it);
- OpenCLIP (`token_embedding.weight` beside `transformer.resblocks.*`), as in SD2
  `cond_stage_model.model.*` and SDXL `conditioner.embedders.{0,1}.model.*`;
- T5 encoders (`shared.weight` / `encoder.embed_tokens.weight`, SD3 / Flux), and UMT5
  (Wan), told from T5 by a relative-position bias in every layer;
- decoder-only language models (`embed_tokens.weight` beside `layers.N.self_attn.q_proj`):
  Qwen3, Qwen2.5-VL, Gemma 2, Llama, Mistral, under the roots their files use: HF
  `model.` (and ComfyUI's `models/text_encoders` files, the same names), the bare base
  model (`Gemma2Model` in Lumina 2's diffusers folder), transformers 5's
  `model.language_model.` and older transformers' `language_model.model.` for the
  vision-language classes, and ComfyUI all-in-one `text_encoders.<slot>.transformer.model.`.
Their place in the file says which diffusers component they are (formats.md (b)).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sdkit.arch.keyview import KeyView

_HF_TOKEN_TABLE = "embeddings.token_embedding.weight"
_OPENCLIP_TOKEN_TABLE = "token_embedding.weight"
_T5_TABLES = ("encoder.embed_tokens.weight", "shared.weight")
_TOKEN_TABLES = (_OPENCLIP_TOKEN_TABLE, *_T5_TABLES)
_UMT5_SECOND_BIAS = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"  # every HF CLIP table ends like OpenCLIP's
# subtrees that never hold a text encoder (checkpoint denoiser, VAE, EMA copies)
_DECODER_TOKEN_TABLE = "embed_tokens.weight"
# levels between a decoder's file root and its layers, longest first (HF CausalLM `model.`,
# transformers 5 vision-language `model.language_model.`, older `language_model.model.`)
_DECODER_LEVELS = ("model.language_model.", "language_model.model.", "model.")
_VISION_TOWERS = ("visual.", "model.visual.", "vision_tower.", "model.vision_tower.")
_NOT_TEXT = ("model.diffusion_model.", "first_stage_model.", "model_ema.")
_SD3_SLOTS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5xxl": "text_encoder_3"}


@dataclass
class TextEncoderFacts:
    component: str  # diffusers component name: text_encoder … text_encoder_4
    prefix: str  # key prefix of this encoder in the file
    architecture: str  # "clip" (HF layout) | "openclip" | "t5" | "umt5" | a decoder design ("qwen3", …)
    width: int
    layers: int
    projection: bool
    text_model_level: bool | None = None  # HF CLIP keys carry `text_model.`
    # decoder language models: what tells one released model from another of its design
    vocab: int | None = None
    query_width: int | None = None  # q_proj outputs: query heads x head width
    kv_width: int | None = None  # k_proj outputs: key/value heads x head width
    head_dim: int | None = None  # from the per-head q norm where the design has one
    vision: bool | None = None  # a vision tower beside it (Qwen2.5-VL `visual.*`, Pixtral)

    def to_facts(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class VaeFacts:
    convention: str  # "ldm" | "diffusers"
    latent_channels: int
    channels: int  # first encoder / last decoder conv width (128 in every released VAE)
    levels: int
    has_encoder: bool
    video: bool = False  # a 3-D causal video VAE (Wan's): 5-D convolutions, a time axis
    # channels of the latent BatchNorm statistics (`bn.running_mean`): FLUX.2's VAE
    # normalizes its 2x2-patchified latents by them (4 x 32 = 128); None where absent
    latent_norm_channels: int | None = None

    def to_facts(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def find_text_encoders(view: KeyView, component: str | None = None) -> list[TextEncoderFacts]:
    """Every text encoder in `view`; `component` names it when the caller already knows it."""
    found: dict[str, TextEncoderFacts] = {}
    for name in view.names:
        if name.startswith(_NOT_TEXT):
            continue
        facts = _measure_encoder(view, name)
        if facts is not None and facts.prefix not in found:
            facts.component = component or _component_for(facts)
            found[facts.prefix] = facts
    return list(found.values())


def _measure_encoder(view: KeyView, name: str) -> TextEncoderFacts | None:
    if name.endswith(_DECODER_TOKEN_TABLE) and len(view.shape(name)) == 2:
        decoder = _measure_decoder(view, name[: -len(_DECODER_TOKEN_TABLE)])
        if decoder is not None:
            return decoder
    if not name.endswith(_TOKEN_TABLES) or len(view.shape(name)) != 2:
        return None  # not a (vocabulary, width) token table
    if name.endswith(_HF_TOKEN_TABLE):
        root = name[: -len(_HF_TOKEN_TABLE)]
        nested = root.endswith("text_model.")
        prefix = root[: -len("text_model.")] if nested else root
        return TextEncoderFacts(
            component="", prefix=prefix, architecture="clip", width=view.shape(name)[1],
            layers=len(view.indices(_layer_pattern(root + "encoder.layers."))),
            projection=view.has(prefix + "text_projection.weight"), text_model_level=nested,
        )
    if name.endswith(_OPENCLIP_TOKEN_TABLE):
        prefix = name[: -len(_OPENCLIP_TOKEN_TABLE)]
        return TextEncoderFacts(
            component="", prefix=prefix, architecture="openclip", width=view.shape(name)[1],
            layers=len(view.indices(_layer_pattern(prefix + "transformer.resblocks."))),
            projection=view.has(prefix + "text_projection"),
        )
    for table in _T5_TABLES:
        if name.endswith(table):
            prefix = name[: -len(table)]
            layers = view.indices(_layer_pattern(prefix + "encoder.block."))
            if layers:
                return TextEncoderFacts(component="", prefix=prefix, architecture=_t5_kind(view, prefix),
                                        width=view.shape(name)[1], layers=len(layers),
                                        projection=False)
    return None


def _measure_decoder(view: KeyView, root: str) -> TextEncoderFacts | None:
    """A decoder-only language model whose token table, layers and final norm sit at `root`."""
    query = view.shape(root + "layers.0.self_attn.q_proj.weight")
    key = view.shape(root + "layers.0.self_attn.k_proj.weight")
    if query is None or key is None or len(query) != 2 or len(key) != 2:
        return None
    vocab, width = view.shape(root + _DECODER_TOKEN_TABLE)
    head_norm = view.shape(root + "layers.0.self_attn.q_norm.weight")
    prefix = _decoder_prefix(root)
    return TextEncoderFacts(
        component="", prefix=prefix, architecture=_decoder_design(view, root), width=width,
        layers=len(view.indices(_layer_pattern(root + "layers."))), projection=False, vocab=vocab,
        query_width=query[0], kv_width=key[0], head_dim=head_norm[0] if head_norm else None,
        vision=any(view.has_prefix(prefix + tower) for tower in _VISION_TOWERS),
    )


def _decoder_prefix(root: str) -> str:
    """Where the whole model starts: the root less the language model's own levels, so the
    vision tower and output head beside it count as the same encoder."""
    for level in _DECODER_LEVELS:
        if root.endswith(level):
            return root[: -len(level)]
    return root


def _decoder_design(view: KeyView, root: str) -> str:
    """Gemma keeps norms after attention and feed-forward (Gemma 3 adds per-head q/k norms);
    Qwen3 has per-head q/k norms; Qwen2 (the language half of Qwen2.5-VL) biased q/k/v;
    Llama 3 and Mistral none of these (ComfyUI `comfy/sd.py` `detect_te_model`)."""
    layer = root + "layers.0."
    head_norm = view.has(layer + "self_attn.q_norm.weight")
    if view.has(layer + "post_feedforward_layernorm.weight"):
        return "gemma3" if head_norm else "gemma2"
    if head_norm:
        return "qwen3"
    if view.has(layer + "self_attn.k_proj.bias"):
        return "qwen2.5-vl"
    return "llama"


def _t5_kind(view: KeyView, prefix: str) -> str:
    """UMT5 (Wan's encoder) gives every layer its own relative-position bias; T5 only the first."""
    return "umt5" if view.has(prefix + _UMT5_SECOND_BIAS) else "t5"


def _layer_pattern(prefix: str) -> str:
    escaped = prefix.replace(".", r"\.")
    return escaped + r"(\d+)\."


def _component_for(facts: TextEncoderFacts) -> str:
    """Diffusers component name of an encoder found at `facts.prefix` in a single file."""
    prefix = facts.prefix
    if prefix.startswith("text_encoders."):
        slot = prefix.split(".")[1]
        return _SD3_SLOTS.get(slot, "text_encoder")
    if prefix.startswith("conditioner.embedders."):
        # SDXL: CLIP-L is text_encoder, OpenCLIP bigG is text_encoder_2 (refiner: bigG only)
        return "text_encoder_2" if facts.architecture == "openclip" else "text_encoder"
    if not prefix and facts.architecture == "clip" and facts.projection:
        return "text_encoder_2"  # CLIPTextModelWithProjection: SDXL's second encoder
    return "text_encoder"


def probe_vae(view: KeyView) -> VaeFacts | None:
    """Facts of the autoencoder in `view` (LDM or diffusers names), or None."""
    video = probe_video_vae(view)
    if video is not None:
        return video
    decoder_in = view.shape("decoder.conv_in.weight")
    if decoder_in is None or len(decoder_in) != 4:
        return None
    if view.has_prefix("decoder.up_blocks."):
        convention, levels = "diffusers", view.indices(r"decoder\.up_blocks\.(\d+)\.")
    elif view.has_prefix("decoder.up."):
        convention, levels = "ldm", view.indices(r"decoder\.up\.(\d+)\.")
    else:
        return None
    encoder_in = view.shape("encoder.conv_in.weight") or ()
    decoder_out = view.shape("decoder.conv_out.weight") or ()
    if len(encoder_in) == 4:
        channels = encoder_in[0]
    else:  # decoder-only file: the last decoder conv reads the same width
        channels = decoder_out[1] if len(decoder_out) == 4 else 0
    norm = view.shape("bn.running_mean")
    return VaeFacts(convention=convention, latent_channels=decoder_in[1], channels=channels,
                    levels=len(levels), has_encoder=bool(encoder_in),
                    latent_norm_channels=norm[0] if norm and len(norm) == 1 else None)


# Wan's 3-D VAEs: (first decoder conv, first encoder conv, last decoder conv) per convention
_VIDEO_VAE_CONVS = {
    "ldm": ("decoder.conv1.weight", "encoder.conv1.weight", "decoder.head.2.weight"),
    "diffusers": ("decoder.conv_in.weight", "encoder.conv_in.weight", "decoder.conv_out.weight"),
}


def probe_video_vae(view: KeyView) -> VaeFacts | None:
    """Facts of a 3-D causal video VAE (Wan 2.1 / 2.2, original or diffusers
    AutoencoderKLWan names), told from image VAEs by its 5-D convolutions."""
    for convention, (decoder_key, encoder_key, out_key) in _VIDEO_VAE_CONVS.items():
        decoder_in = view.shape(decoder_key)
        if decoder_in is None or len(decoder_in) != 5:
            continue
        encoder_in = view.shape(encoder_key) or ()
        decoder_out = view.shape(out_key) or ()
        if len(encoder_in) == 5:
            channels = encoder_in[0]
        else:  # decoder-only file: the last decoder conv reads the decoder's width
            channels = decoder_out[1] if len(decoder_out) == 5 else 0
        return VaeFacts(convention=convention, latent_channels=decoder_in[1], channels=channels,
                        levels=_video_vae_levels(view, convention), has_encoder=bool(encoder_in),
                        video=True)
    return None


def _video_vae_levels(view: KeyView, convention: str) -> int:
    if convention == "diffusers":
        return len(view.indices(r"decoder\.up_blocks\.(\d+)\."))
    nested = view.indices(r"decoder\.upsamples\.(\d+)\.upsamples\.")  # Wan 2.2: one entry a level
    if nested:
        return len(nested)
    return len(view.indices(r"decoder\.upsamples\.(\d+)\.resample\.")) + 1  # 2.1: flat, resamplers between
