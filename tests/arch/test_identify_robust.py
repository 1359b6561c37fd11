"""identify() answers for any mix of decisive key names and shapes: never an exception,
always a JSON-serialisable identity with values from the documented vocabularies."""

from __future__ import annotations

import json

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdkit.arch import FAMILIES, identify
from sdkit.arch.identity import KINDS, PREDICTIONS, VARIANTS
from sdkit.io.model_file import model_from_tensors

DECISIVE_KEYS = [
    "model.diffusion_model.input_blocks.0.0.weight", "input_blocks.0.0.weight", "conv_in.weight",
    "down_blocks.0.resnets.0.conv1.weight", "time_embedding.linear_1.weight",
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
    "model.diffusion_model.label_emb.0.0.weight", "add_embedding.linear_1.weight",
    "model.diffusion_model.input_blocks.3.0.op.weight", "model.diffusion_model.input_blocks.1.1.proj_in.weight",
    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias",
    "joint_blocks.0.x_block.attn.qkv.weight", "x_embedder.proj.weight", "double_blocks.0.img_attn.qkv.weight",
    "img_in.weight", "single_transformer_blocks.0.attn.to_q.weight", "pos_embed.proj.weight",
    "transformer_blocks.0.attn.to_q.weight",
    "first_stage_model.decoder.conv_in.weight", "decoder.conv_in.weight", "decoder.up.0.block.0.conv1.weight",
    "decoder.up_blocks.0.resnets.0.conv1.weight", "encoder.conv_in.weight", "decoder.conv_out.weight",
    "first_stage_model.encoder.conv_in.weight", "first_stage_model.decoder.up.1.block.0.conv1.weight",
    "text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.weight",
    "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight", "y_embedder.mlp.0.weight",
    "context_embedder.weight", "txt_in.weight", "vector_in.in_layer.weight", "encoder_hid_proj.weight",
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    "cond_stage_model.transformer.text_model.embeddings.position_ids",
    "cond_stage_model.model.token_embedding.weight", "conditioner.embedders.1.model.token_embedding.weight",
    "embeddings.token_embedding.weight", "shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight",
    "control_model.input_hint_block.0.weight", "controlnet_cond_embedding.conv_in.weight",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.alpha",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj.hada_w1_b",
    "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lokr_w1",
    "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lokr_w2",
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight",
    "lora_unet_x.on_input", "lora_unet_x.weight", "lora_unet_x.a1.weight", "lora_unet_x.a2.weight",
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight",
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight",
    "lora_unet_x.oft_blocks", "lora_unet_x.dora_scale",
    "transformer.transformer_blocks.0.attn.to_k.lora_A.weight", "lora_unet_double_blocks_0_x.diff",
    "string_to_param.*", "emb_params", "clip_l", "clip_g", "<token>",
    "768.0.linear.0.weight", "1024.1.linear.1.bias", "model_ema.decay", "v_pred", "edm_mean", "edm_std",
]
KEY_SETS = st.lists(st.sampled_from(DECISIVE_KEYS), min_size=1, max_size=6, unique=True)
SHAPES = st.lists(st.integers(min_value=1, max_value=6), min_size=0, max_size=4).map(tuple)
DTYPES = st.sampled_from([torch.float32, torch.float16, torch.int64])
METADATA = st.fixed_dictionaries({}, optional={
    "ss_base_model_version": st.sampled_from(["sd_v1", "sdxl_", "sd_v2_v", "flux1", "nonsense"]),
    "modelspec.architecture": st.sampled_from(["stable-diffusion-v1/lora", "flux-1-dev", "??"]),
    "ss_tag_frequency": st.sampled_from(['{"a": {"x": 2}}', "not json", "[]"]),
    "ss_network_args": st.sampled_from(['{"algo": "dylora"}', "{", "3"]),
})


@settings(max_examples=300, deadline=None)
@given(keys=KEY_SETS, shapes=st.data(), metadata=METADATA, deep=st.booleans())
def test_identify_never_fails(keys, shapes, metadata, deep):
    tensors = {key: torch.zeros(shapes.draw(SHAPES), dtype=shapes.draw(DTYPES)) for key in keys}
    identity = identify(model_from_tensors(tensors, metadata=metadata), deep=deep)
    assert identity.kind in KINDS
    assert identity.family == "unknown" or identity.family in FAMILIES
    assert identity.variant in VARIANTS and identity.prediction in PREDICTIONS
    json.dumps(identity.to_json())
