"""Each method trains exactly its part, and its file gives back the trained model in sdkit
and in the peers (diffusers, lycoris-lora) — on the tiny random models, a few steps."""

from __future__ import annotations

import json

import pytest
import torch

from sdkit.adapters.embedding import read_embedding
from sdkit.adapters.hypernet import read_hypernetwork
from sdkit.adapters.lora_format import parse_lora
from sdkit.io import open_model
from sdkit.runtime.hypernet_attn import attach_hypernetwork
from sdkit.runtime.pipeline import load_model
from sdkit.runtime.sample.lora import LoraRequest, RuntimeLoras
from test_train_support import base_weights, concept_pictures, run_trainer, tiny_config, unet_output

CONTEXT = 32  # the tiny SD1 model's text width


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return concept_pictures(tmp_path_factory.mktemp("concept"))


@pytest.fixture(scope="module")
def base(sd1):
    """The untouched base, for comparing weights."""
    return load_model(sd1.file)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _trainable(pipe) -> dict[str, list[str]]:
    return {name: [n for n, p in getattr(pipe, name).named_parameters() if p.requires_grad]
            for name in ("unet", "vae", "text_encoder")}


def _applied_with_sdkit(model_file, adapter, family="sd1"):
    model = load_model(model_file)
    RuntimeLoras(model.pipe, family, model.layout).apply([LoraRequest(adapter, adapter.stem)])
    return model.pipe.unet


@pytest.mark.parametrize("method, role", [("lora", "lora_"), ("loha", "hada_"), ("lokr", "lokr_")])
def test_network_trains_only_its_layers_and_its_file_is_the_trained_network(sd1, base, data, tmp_path,
                                                                           method, role, monkeypatch):
    trainer = run_trainer(tiny_config(method, sd1.file, data, tmp_path, network={"rank": 2, "alpha": 1.0}))
    pipe = trainer.model.pipe
    trainable = _trainable(pipe)
    assert trainable["unet"] and all(role in name for name in trainable["unet"])
    assert trainable["vae"] == [] and trainable["text_encoder"] == []
    assert _same(base_weights(pipe.unet), base.pipe.unet.state_dict())
    assert _same(pipe.text_encoder.state_dict(), base.pipe.text_encoder.state_dict())
    assert _same(pipe.vae.state_dict(), base.pipe.vae.state_dict())

    pipe.unet.eval()
    trained = unet_output(pipe.unet, CONTEXT)
    effect = (trained - unet_output(base.pipe.unet, CONTEXT)).abs().max()
    assert effect > 1e-4
    output = trainer.config.output
    with open_model(output) as file:
        lora = parse_lora(file, file.metadata)
        assert file.metadata["ss_network_module"] == ("networks.lora" if method == "lora" else "lycoris.kohya")
        assert file.metadata["ss_network_dim"] == "2" and file.metadata["ss_network_alpha"] == "1.0"
    assert all(name.startswith("lora_unet_") for name in lora.modules)
    assert {m.alpha for m in lora.modules.values()} == {1.0}
    ours = unet_output(_applied_with_sdkit(sd1.file, output), CONTEXT)
    assert torch.allclose(ours, trained, atol=effect * 1e-3)
    peer = _peer_output(method, sd1, output, len(lora.modules), monkeypatch)
    assert torch.allclose(peer, trained, atol=effect * 1e-3)


def _peer_output(method, sd1, output, modules, monkeypatch):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    if method == "lora":
        pipe = StableDiffusionPipeline.from_pretrained(sd1.folder, safety_checker=None)
        pipe.load_lora_weights(str(output))
        return unet_output(pipe.unet, CONTEXT)
    from lycoris.wrapper import LycorisNetwork, create_lycoris_from_weights

    unet = UNet2DConditionModel.from_pretrained(sd1.folder, subfolder="unet")
    monkeypatch.setattr(LycorisNetwork, "LORA_PREFIX", "lora_unet")
    network, _ = create_lycoris_from_weights(1.0, str(output), unet)
    # kohya's networks.lora set on the tiny UNet: 8 attention projections, proj_in / proj_out and
    # ff.net.0.proj / ff.net.2 in each of its 4 transformer blocks
    assert len(network.loras) == modules == 48
    network.apply_to()
    return unet_output(unet, CONTEXT)


def test_lora_with_text_encoder_trains_both_and_diffusers_loads_both(sd1, base, data, tmp_path):
    from diffusers import StableDiffusionPipeline

    config = tiny_config("lora", sd1.file, data, tmp_path, network={"train_text_encoder": True})
    pipe = run_trainer(config).model.pipe
    trainable = _trainable(pipe)
    assert trainable["text_encoder"] and all("lora_" in n for n in trainable["text_encoder"])
    with open_model(config.output) as file:
        assert any(name.startswith("lora_te_text_model_encoder_layers_") for name in file.infos)
    ids = pipe.tokenizer(["a photo of sks"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    pipe.text_encoder.eval()
    with torch.no_grad():
        trained = pipe.text_encoder(ids)[0]
        peer = StableDiffusionPipeline.from_pretrained(sd1.folder, safety_checker=None)
        peer.load_lora_weights(str(config.output))
        loaded = peer.text_encoder(ids)[0]
        plain = base.pipe.text_encoder(ids)[0]
    effect = (trained - plain).abs().max()
    assert effect > 1e-4 and torch.allclose(loaded, trained, atol=effect * 1e-3)


def test_lokr_with_two_full_factors_folds_peft_scale_into_w2(sd1, data, tmp_path):
    config = tiny_config("lokr", sd1.file, data, tmp_path, network={"rank": 64, "alpha": 8.0})
    trainer = run_trainer(config)
    from peft.utils import get_peft_model_state_dict

    peft_state = get_peft_model_state_dict(trainer.model.pipe.unet)
    with open_model(config.output) as file:
        name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
        stored = file.load(f"{name}.lokr_w2")
        assert f"{name}.lokr_w1" in file.infos and float(file.load(f"{name}.alpha")) == 8.0
    raw = peft_state["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lokr_w2"]
    assert torch.allclose(stored, raw * (8.0 / 64))


def test_textual_inversion_trains_only_the_new_rows_and_loads_in_diffusers(sd1, base, data, tmp_path):
    from diffusers import StableDiffusionPipeline

    config = tiny_config("ti", sd1.file, data, tmp_path, output=tmp_path / "sks.safetensors",
                         embedding={"init_word": "cat", "vectors": 2})
    trainer = run_trainer(config)
    pipe, method = trainer.model.pipe, trainer.method
    assert _trainable(pipe)["unet"] == [] and _trainable(pipe)["vae"] == []
    assert _same(pipe.unet.state_dict(), base.pipe.unet.state_dict())
    table, original = pipe.text_encoder.get_input_embeddings().weight, base.pipe.text_encoder.get_input_embeddings().weight
    ids = method.tables["text_encoder"].ids
    rest = [row for row in range(original.shape[0]) if row not in ids]
    assert torch.equal(table[rest], original[rest])
    cat = base.pipe.tokenizer("cat", add_special_tokens=False).input_ids[0]
    assert not torch.equal(table[ids[0]], original[cat])  # moved away from its initialiser
    embedding = read_embedding(config.output)
    assert embedding.token == "sks" and embedding.vector_count == 2
    with open_model(config.output) as file:  # what sd-scripts writes for every embedding
        assert file.metadata["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert torch.equal(embedding.vectors["text_encoder"], table[ids].detach())
    peer = StableDiffusionPipeline.from_pretrained(sd1.folder, safety_checker=None)
    peer.load_textual_inversion(str(config.output), token="sks")
    peer_ids = peer.tokenizer(peer.maybe_convert_prompt("a photo of sks", peer.tokenizer), padding="max_length",
                              max_length=77, return_tensors="pt").input_ids
    ours_ids = pipe.tokenizer(method.prompt("a photo of sks"), padding="max_length", max_length=77,
                              return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(peer.text_encoder(peer_ids)[0], pipe.text_encoder(ours_ids)[0], atol=1e-5)


def test_textual_inversion_pt_is_the_dict_a1111_writes(sd1, data, tmp_path):
    config = tiny_config("ti", sd1.file, data, tmp_path, output=tmp_path / "sks.pt")
    run_trainer(config)
    saved = torch.load(config.output, weights_only=True)
    assert set(saved["string_to_param"]) == {"*"} and saved["string_to_param"]["*"].shape == (1, CONTEXT)
    assert "modelspec.hash_sha256" not in saved  # a pickle has no data section to hash
    assert saved["name"] == "sks" and saved["step"] == 2 and saved["string_to_token"] == {"*": 265}
    assert torch.equal(read_embedding(config.output).vectors["text_encoder"], saved["string_to_param"]["*"])


def test_hypernetwork_trains_only_its_mlps_and_its_file_reproduces_them(sd1, base, data, tmp_path):
    config = tiny_config("hypernet", sd1.file, data, tmp_path, hypernet={"layer_structure": (1, 2, 1),
                                                                        "activation": "relu", "layer_norm": True})
    trainer = run_trainer(config)
    pipe = trainer.model.pipe
    assert all(names == [] for names in _trainable(pipe).values())
    for name in ("unet", "text_encoder", "vae"):
        assert _same(getattr(pipe, name).state_dict(), getattr(base.pipe, name).state_dict())
    trained_net = trainer.method.hypernetwork.eval()
    trained = unet_output(pipe.unet, CONTEXT)
    loaded = read_hypernetwork(config.output)
    assert loaded.sizes == [32, 64] and loaded.step == 2 and loaded.settings.add_layer_norm
    assert loaded.settings.activation_func == "relu"
    fresh = load_model(sd1.file).pipe.unet
    plain = unet_output(fresh, CONTEXT)
    attach_hypernetwork(fresh, loaded)
    effect = (trained - plain).abs().max()
    assert effect > 1e-5 and torch.allclose(unet_output(fresh, CONTEXT), trained, atol=effect * 1e-3)
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), trained_net.parameters()))


def test_dreambooth_trains_the_unet_only_and_writes_a_loadable_checkpoint(sd1, base, data, tmp_path):
    config = tiny_config("dreambooth", sd1.file, data, tmp_path, lr=1e-3, run={"save_precision": "fp32"},
                         dreambooth={"class_prompt": "a photo", "num_class_images": 2})
    trainer = run_trainer(config)
    pipe = trainer.model.pipe
    assert _trainable(pipe)["text_encoder"] == [] and _trainable(pipe)["vae"] == []
    assert _same(pipe.text_encoder.state_dict(), base.pipe.text_encoder.state_dict())
    assert not _same(pipe.unet.state_dict(), base.pipe.unet.state_dict())
    assert len(list((tmp_path / "dreambooth.class-images").glob("*.png"))) == 2
    reloaded = load_model(config.output, config=sd1.folder).pipe.unet.state_dict()
    assert _same(reloaded, pipe.unet.state_dict())
    with open_model(config.output) as file:
        assert file.metadata["ss_num_reg_images"] == "2" and file.metadata["ss_prior_loss_weight"] == "1.0"
        # sd-scripts' implementation for a fine-tuned single file, SD1 included
        assert file.metadata["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
        assert json.loads(file.metadata["ss_reg_dataset_dirs"]) == {"dreambooth.class-images": {"n_repeats": 1,
                                                                                                "img_count": 2}}
        regularisation = json.loads(file.metadata["ss_datasets"])[0]["subsets"][1]
        assert regularisation["is_reg"] and regularisation["class_tokens"] == "a photo"


def test_dreambooth_diffusers_folder_loads_in_diffusers(sd1, data, tmp_path):
    from diffusers import StableDiffusionPipeline

    config = tiny_config("dreambooth", sd1.file, data, tmp_path, steps=1, output=tmp_path / "tuned",
                         run={"save_precision": "fp32"}, dreambooth={"format": "diffusers"})
    trained = run_trainer(config).model.pipe.unet.state_dict()
    peer = StableDiffusionPipeline.from_pretrained(config.output, safety_checker=None)
    assert all(torch.equal(peer.unet.state_dict()[k], trained[k]) for k in trained)
    assert (tmp_path / "tuned.train.json").is_file() and not list(tmp_path.glob(".*partial*"))


@pytest.mark.parametrize("output_format, save_precision", [("single-file", None), ("diffusers", "fp32")])
def test_dreambooth_in_bf16_writes_the_untouched_parts_from_the_base_file(sd1, base, data, tmp_path, output_format,
                                                                         save_precision):
    """Frozen parts are rounded to bf16 while training; the checkpoint carries the base's own
    weights, cast only by --save-precision (fp16 by default)."""
    output = tmp_path / ("tuned" if output_format == "diffusers" else "tuned.safetensors")
    config = tiny_config("dreambooth", sd1.file, data, tmp_path, steps=1, output=output,
                         run={"precision": "bf16", "save_precision": save_precision},
                         dreambooth={"format": output_format})
    trainer = run_trainer(config)
    assert trainer.plan.name == "bf16"
    if output_format == "single-file":
        from safetensors.torch import load_file

        assert trainer.model.pipe.text_encoder.get_input_embeddings().weight.dtype == torch.bfloat16

        written, original = load_file(str(output)), load_file(str(sd1.file))
        untouched = [k for k in original if k.startswith(("cond_stage_model.", "first_stage_model."))]
        assert untouched and all(torch.equal(written[k], original[k].to(torch.float16)) for k in untouched)
        unet = [k for k in original if k.startswith("model.diffusion_model.")]
        assert any(not torch.equal(written[k], original[k].to(torch.float16)) for k in unet)
        return
    from diffusers import StableDiffusionPipeline

    peer = StableDiffusionPipeline.from_pretrained(output, safety_checker=None)
    for name in ("text_encoder", "vae"):
        assert _same(getattr(peer, name).state_dict(), getattr(base.pipe, name).state_dict()), name
    assert not _same(peer.unet.state_dict(), base.pipe.unet.state_dict())
