"""What kohya sd-scripts users pass: N_concept folders, dataset TOML files, regularization
pictures, tag shuffling, flip_aug, networks.lora / LoCon / LyCORIS-preset targets, Prodigy /
Lion / Adafactor, per-part rates, per-epoch saves, TensorBoard logs, metadata, and one
method's options per `train METHOD --help` — on the tiny models, a few steps each."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import numpy
import pytest
import torch
from PIL import Image, ImageOps
from test_train_support import concept_pictures, run_trainer, tiny_config, unet_output

from sdkit.cli.main import main
from sdkit.errors import SdkitError
from sdkit.io import open_model
from sdkit.runtime.pipeline import load_model
from sdkit.runtime.train import datasets
from sdkit.runtime.train.methods.targets import PRESETS, layer_targets

CONTEXT = 32  # the tiny SD1 model's text width


@pytest.fixture(scope="module")
def kohya_data(tmp_path_factory):
    """kohya's DreamBooth layout: two concept folders (one captioned, one by its folder
    name), a regularization folder, and a stray folder kohya skips."""
    root = tmp_path_factory.mktemp("kohya")
    concept_pictures(root / "train" / "3_sks disc", count=3, caption="sks, purple disc, white background",
                     sidecar=".caption")
    concept_pictures(root / "train" / "2_plain disc", count=2, sidecar="")
    concept_pictures(root / "train" / "notes", count=1)
    concept_pictures(root / "reg" / "1_disc", count=2, colour=(20, 200, 20), sidecar="")
    return root


# ---- data ---------------------------------------------------------------------------------


def test_concept_folders_give_repeats_and_class_tokens_as_kohya_reads_them(kohya_data):
    subsets = datasets.folder_subsets(kohya_data / "train", is_reg=False)
    assert [(s.image_dir.name, s.num_repeats, s.class_tokens) for s in subsets] == \
        [("2_plain disc", 2, "plain disc"), ("3_sks disc", 3, "sks disc")]


def test_reg_repeats_follow_kohyas_balancing_loop():
    # kohya's DreamBoothDataset: each reg picture's own repeats first, then one more each in turn
    assert datasets.balanced_reg_repeats(13, [1, 1]) == [7, 6]
    assert datasets.balanced_reg_repeats(3, [2, 2, 2]) == [2, 2, 0]  # more reg pictures than needed: some unused
    assert datasets.balanced_reg_repeats(5, []) == []


def test_shuffled_tags_keep_the_first_n_and_depend_only_on_the_seed():
    caption = "sks, purple disc, white background, centered, soft light"
    tags = [t.strip() for t in caption.split(",")]
    shuffled = [datasets.split_tags(caption, 2, True, random.Random(seed)) for seed in range(20)]
    for text in shuffled:
        parts = text.split(", ")
        assert parts[:2] == tags[:2] and sorted(parts[2:]) == sorted(tags[2:])
    assert len(set(shuffled)) > 1
    assert shuffled == [datasets.split_tags(caption, 2, True, random.Random(seed)) for seed in range(20)]
    assert datasets.split_tags(caption, 2, False, random.Random(0)) == caption


def _toml(path, text):
    path.write_text(text)
    return path


def test_dataset_toml_subsets_inherit_general_and_dataset_keys(kohya_data, tmp_path):
    config = _toml(tmp_path / "dataset.toml", f"""
[general]
shuffle_caption = true
keep_tokens = 1
caption_extension = ".caption"

[[datasets]]
resolution = [32, 32]
batch_size = 2

  [[datasets.subsets]]
  image_dir = '{kohya_data / "train" / "3_sks disc"}'
  num_repeats = 4
  flip_aug = true

  [[datasets.subsets]]
  image_dir = '{kohya_data / "reg" / "1_disc"}'
  class_tokens = "disc"
  is_reg = true
  keep_tokens = 0
""")
    settings, subsets = datasets.read_dataset_config(config)
    assert (settings.resolution, settings.batch_size, settings.enable_bucket) == (32, 2, None)
    first, reg = subsets
    assert (first.num_repeats, first.flip_aug, first.shuffle_caption, first.keep_tokens, first.caption_extension,
            first.is_reg) == (4, True, True, 1, ".caption", False)
    assert (reg.class_tokens, reg.is_reg, reg.keep_tokens, reg.flip_aug) == ("disc", True, 0, False)


@pytest.mark.parametrize("text, message", [
    ("[general]\ncolor_aug = true\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\n",
     "[general]: unknown or unsupported keys color_aug"),
    ("[[datasets]]\nbatch_size = 1\n[[datasets.subsets]]\nimage_dir = 'x'\nnum_repeat = 2\nfoo = 1\n",
     "datasets[0].subsets[0]: unknown or unsupported keys num_repeat, foo"),
    ("[[datasets]]\nresolution = [64, 32]\n[[datasets.subsets]]\nimage_dir = 'x'\n", "sdkit trains square"),
    ("[[datasets]]\n[[datasets.subsets]]\nnum_repeats = 2\n", "image_dir is required"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\nshuffle_caption = 'yes'\n", "has the wrong type"),
])
def test_dataset_toml_mistakes_are_refused_in_one_line_naming_the_key(tmp_path, text, message):
    (tmp_path / "x").mkdir()
    with pytest.raises(SdkitError) as refused:
        datasets.read_dataset_config(_toml(tmp_path / "bad.toml", text))
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_concept_folders_and_reg_pictures_become_weighted_samples(sd1, kohya_data, tmp_path):
    config = tiny_config("lora", sd1.file, kohya_data / "train", tmp_path, steps=1,
                         data={"reg_folder": kohya_data / "reg"}, dreambooth={"prior_loss_weight": 0.25})
    trainer = run_trainer(config)
    train = [s for s in trainer.samples if s.weight == 1.0]
    reg = [s for s in trainer.samples if s.weight != 1.0]
    assert len(train) == 3 * 3 + 2 * 2 and len(reg) == len(train)  # kohya balances reg to the train count
    assert {s.weight for s in reg} == {0.25} and all(s.record.path.parent.name == "1_disc" for s in reg)
    captions = {s.record.path.parent.name: s.caption for s in trainer.samples}
    assert captions == {"3_sks disc": "sks, purple disc, white background", "2_plain disc": "plain disc",
                        "1_disc": "disc"}
    with open_model(config.output) as file:
        metadata = file.metadata
    assert json.loads(metadata["ss_dataset_dirs"]) == {"2_plain disc": {"n_repeats": 2, "img_count": 2},
                                                       "3_sks disc": {"n_repeats": 3, "img_count": 3}}
    assert json.loads(metadata["ss_reg_dataset_dirs"]) == {"1_disc": {"n_repeats": 1, "img_count": 2}}
    assert metadata["ss_prior_loss_weight"] == "0.25"


def test_reg_pictures_loss_is_scaled_by_the_prior_loss_weight(sd1, kohya_data, tmp_path):
    """The same noise, timesteps and batch: the loss of a reg sample is weight x its plain loss."""
    trainer = run_trainer(tiny_config("lora", sd1.file, kohya_data / "train", tmp_path, steps=1,
                                      data={"reg_folder": kohya_data / "reg"},
                                      dreambooth={"prior_loss_weight": 0.25}))
    reg_index = next(i for i, s in enumerate(trainer.samples) if s.weight != 1.0)
    batch = trainer.instance_latents.batch([reg_index], torch.Generator().manual_seed(0), random.Random(0))
    weighted = trainer._batch_loss(batch, torch.Generator().manual_seed(1), random.Random(1), 0.0)
    batch.samples[0] = replace(batch.samples[0], weight=1.0)
    unweighted = trainer._batch_loss(batch, torch.Generator().manual_seed(1), random.Random(1), 0.0)
    assert torch.allclose(weighted, 0.25 * unweighted)


def test_shuffled_captions_and_flips_are_the_same_for_the_same_seed(sd1, kohya_data, tmp_path, monkeypatch):
    seen: list[list[str]] = []

    from sdkit.runtime.train.denoiser import Denoiser

    tokenize = Denoiser.tokenize

    def recording(config):
        trainer_captions: list[str] = []
        monkeypatch.setattr(Denoiser, "tokenize", lambda self, c: (trainer_captions.extend(c), tokenize(self, c))[1])
        trainer = run_trainer(config)
        seen.append(trainer_captions)
        return trainer

    data = {"shuffle_caption": True, "keep_tokens": 1, "flip_aug": True}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = recording(tiny_config("lora", sd1.file, kohya_data / "train", tmp_path / "a", steps=8, data=data))
    again = recording(tiny_config("lora", sd1.file, kohya_data / "train", tmp_path / "b", steps=8, data=data))
    assert seen[0] == seen[1]
    shuffled = [c for c in seen[0] if c.startswith("sks, ")]
    assert shuffled and all(sorted(c.split(", ")) == sorted(["sks", "purple disc", "white background"])
                            for c in shuffled)
    with open_model(first.config.output) as a, open_model(again.config.output) as b:
        assert all(torch.equal(a.load(k), b.load(k)) for k in a.infos)
        assert a.metadata["ss_shuffle_caption"] == "True" and a.metadata["ss_flip_aug"] == "True"


def test_flip_aug_caches_the_mirrored_pictures_latents(sd1, kohya_data, tmp_path):
    trainer = run_trainer(tiny_config("lora", sd1.file, kohya_data / "train" / "3_sks disc", tmp_path, steps=1,
                                      data={"flip_aug": True, "reg_folder": kohya_data / "reg"}))
    source = trainer.instance_latents
    assert source.encoded == 2 * (3 + 2)  # every picture, plain and mirrored
    sample = next(s for s in trainer.samples if s.flip_aug and s.weight == 1.0)
    mirrored_key = next(k for k in source._memory if k[0] == sample.record.path and k[3])
    picture = ImageOps.mirror(Image.open(sample.record.path).convert("RGB").resize(sample.bucket, Image.LANCZOS))
    pixels = torch.from_numpy(numpy.asarray(picture, dtype="float32")).permute(2, 0, 1) / 127.5 - 1
    with torch.no_grad():
        expected = trainer.model.pipe.vae.encode(pixels[None]).latent_dist.parameters[0]
    assert torch.allclose(source._memory[mirrored_key], expected, atol=1e-5)


def test_dataset_config_sets_resolution_and_batch_size_and_conflicts_are_refused(sd1, kohya_data, tmp_path):
    toml = _toml(tmp_path / "d.toml", f"""
[[datasets]]
resolution = 32
batch_size = 2
  [[datasets.subsets]]
  image_dir = '{kohya_data / "train" / "3_sks disc"}'
  num_repeats = 2
  caption_extension = ".caption"
""")
    config = tiny_config("lora", sd1.file, tmp_path, tmp_path, steps=1, data={"dataset_config": toml})
    trainer = run_trainer(config)
    assert trainer.config.optim.batch_size == 2 and trainer.resolution == 32 and len(trainer.samples) == 6
    clash = tiny_config("lora", sd1.file, tmp_path, tmp_path / "x", steps=1, data={"dataset_config": toml},
                        optim={"batch_size": 3})
    (tmp_path / "x").mkdir()
    with pytest.raises(SdkitError, match="--batch-size and the dataset config's batch_size = 2 disagree"):
        run_trainer(clash)


# ---- network targets ----------------------------------------------------------------------


def _lycoris_names(module, preset, monkeypatch, part="unet"):
    """Layer names lycoris-lora's preset picks in `module` (its own walk, the oracle): the
    preset's UNet or text-encoder half, applied as lycoris/kohya.py applies it."""
    from lycoris.config import PRESET
    from lycoris.wrapper import LycorisNetwork, create_lycoris

    for attribute in ("ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "MODULE_ALGO_MAP",
                      "NAME_ALGO_MAP", "USE_FNMATCH", "TARGET_EXCLUDE_NAME"):
        monkeypatch.setattr(LycorisNetwork, attribute, getattr(LycorisNetwork, attribute))  # restored after
    chosen = PRESET[preset]
    LycorisNetwork.apply_preset({"enable_conv": chosen["enable_conv"],
                                 "target_module": chosen[f"{part}_target_module"],
                                 "target_name": chosen[f"{part}_target_name"]})
    network = create_lycoris(module, 1.0, linear_dim=2, linear_alpha=1, algo="lora", conv_dim=2, conv_alpha=1)
    return {lora.lora_name.removeprefix("lycoris_") for lora in network.loras}


@pytest.mark.parametrize("preset", ["full", "attn-mlp", "unet-transformer-only", "unet-convblock-only"])
def test_lycoris_presets_pick_the_layers_lycoris_picks(sd1, preset, monkeypatch):
    unet = load_model(sd1.file).pipe.unet
    linear, convs = layer_targets(unet, "unet", PRESETS[preset], conv=True)
    ours = {name.replace(".", "_") for name in linear + convs}
    assert ours and ours == _lycoris_names(unet, preset, monkeypatch)


def test_text_encoder_targets_are_kohyas_attention_and_mlp_layers(sd1, monkeypatch):
    encoder = load_model(sd1.file).pipe.text_encoder
    linear, convs = layer_targets(encoder, "text_encoder", PRESETS["attn-mlp"], conv=False)
    assert not convs and {n.rsplit(".", 1)[-1] for n in linear} == {"q_proj", "k_proj", "v_proj", "out_proj",
                                                                    "fc1", "fc2"}
    assert {n.replace(".", "_") for n in linear} == _lycoris_names(encoder, "attn-mlp", monkeypatch, "text_encoder")


def test_locon_trains_3x3_convolutions_at_conv_dim_and_peers_load_the_file(sd1, kohya_data, tmp_path, capsys,
                                                                           monkeypatch):
    from lycoris.wrapper import LycorisNetwork, create_lycoris_from_weights

    from sdkit.runtime.sample.lora import LoraRequest, RuntimeLoras

    config = tiny_config("lora", sd1.file, kohya_data / "train", tmp_path, steps=2,
                         network={"rank": 2, "alpha": 1.0, "conv_dim": 3, "conv_alpha": 2.0})
    trainer = run_trainer(config)
    trained_unet = trainer.model.pipe.unet.eval()
    trained = unet_output(trained_unet, CONTEXT)
    conv_layers = {name: m.base_layer for name, m in trained_unet.named_modules()
                   if isinstance(getattr(m, "base_layer", None), torch.nn.Conv2d)
                   and m.base_layer.kernel_size == (3, 3)}
    assert any(name.endswith(".conv1") for name in conv_layers)
    with open_model(config.output) as file:
        for path, layer in conv_layers.items():
            name = "lora_unet_" + path.replace(".", "_")
            assert file.infos[f"{name}.lora_down.weight"].shape == (3, layer.in_channels, 3, 3)
            # one alpha per file (lora_export folds each module's own into its up factor)
            assert float(file.load(f"{name}.alpha")) == 1.0
        assert json.loads(file.metadata["ss_network_args"]) == {"conv_dim": "3", "conv_alpha": "2.0"}
    plain = load_model(sd1.file)
    effect = (trained - unet_output(plain.pipe.unet, CONTEXT)).abs().max()
    assert effect > 1e-4
    ours = load_model(sd1.file)
    RuntimeLoras(ours.pipe, "sd1", ours.layout).apply([LoraRequest(config.output, "x")])
    assert torch.allclose(unet_output(ours.pipe.unet, CONTEXT), trained, atol=effect * 1e-3)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(sd1.folder, subfolder="unet")
    monkeypatch.setattr(LycorisNetwork, "LORA_PREFIX", "lora_unet")
    network, _ = create_lycoris_from_weights(1.0, str(config.output), unet)
    network.apply_to()
    assert torch.allclose(unet_output(unet, CONTEXT), trained, atol=effect * 1e-3)
    capsys.readouterr()  # lycoris-lora's own log lines
    main(["lora", "check", str(sd1.file), str(config.output), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["verdict"] == "all" and report["mapped"] == report["modules"] == len(network.loras)


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_locon_with_text_encoders_maps_fully_on_sd2_and_sdxl(request, kohya_data, tmp_path, capsys, family):
    model = request.getfixturevalue(family)
    config = tiny_config("lora", model.file, kohya_data / "train" / "3_sks disc", tmp_path, steps=1,
                         network={"conv_dim": 2, "train_text_encoder": True})
    run_trainer(config)
    capsys.readouterr()
    main(["lora", "check", str(model.file), str(config.output), "--json"])
    report = json.loads(capsys.readouterr().out)
    text_parts = {"sd2": {"text_encoder"}, "sdxl": {"text_encoder", "text_encoder_2"}}[family]
    assert report["verdict"] == "all" and report["mapped"] == report["modules"]
    assert set(report["by_component"]) == {"unet", *text_parts}
    with open_model(config.output) as file:
        assert any("resnets" in k or "_in_layers_" in k for k in file.infos)  # the ResNet convolutions


def test_loha_with_a_preset_writes_the_layers_lycoris_picks(sd1, kohya_data, tmp_path, monkeypatch):
    config = tiny_config("loha", sd1.file, kohya_data / "train", tmp_path, steps=1,
                         network={"rank": 2, "preset": "full", "conv_dim": 2})
    trainer = run_trainer(config)
    with open_model(config.output) as file:
        written = {key.split(".")[0].removeprefix("lora_unet_") for key in file.infos}
        assert json.loads(file.metadata["ss_network_args"])["preset"] == "full"
    plain = load_model(sd1.file).pipe.unet
    assert written == _lycoris_names(plain, "full", monkeypatch)
    assert trainer.result.steps == 1


# ---- optimizers, rates, saves, logs -------------------------------------------------------


@pytest.mark.parametrize("name, cls, lr", [("prodigy", "prodigyopt.prodigy.Prodigy", 1.0),
                                           ("lion", "lion_pytorch.lion_pytorch.Lion", 1e-3),
                                           ("adafactor", "transformers.optimization.Adafactor", 1e-3)])
def test_kohyas_optimizers_train_and_are_named_in_the_metadata(sd1, kohya_data, tmp_path, name, cls, lr):
    config = tiny_config("lora", sd1.file, kohya_data / "train", tmp_path, steps=2, lr=lr,
                         optim={"optimizer": name})
    trainer = run_trainer(config)
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert f"{type(optimizer).__module__}.{type(optimizer).__name__}" == cls
    if name == "adafactor":  # kohya's defaults
        assert {k: optimizer.defaults[k] for k in ("relative_step", "scale_parameter", "warmup_init", "lr")} == \
            {"relative_step": True, "scale_parameter": True, "warmup_init": False, "lr": None}
    with open_model(config.output) as file:
        assert file.metadata["ss_optimizer"].startswith(cls + "(")
        assert any(file.load(k).abs().max() > 0 for k in file.infos if "lora_up" in k)  # up starts at zero


def test_unet_and_text_encoder_rates_go_to_their_groups(sd1, kohya_data, tmp_path):
    config = tiny_config("lora", sd1.file, kohya_data / "train", tmp_path, steps=1, lr=1e-3,
                         optim={"unet_lr": 5e-3}, network={"train_text_encoder": True})
    trainer = run_trainer(config)
    assert [group["lr"] for group in trainer.optimizer.param_groups] == [5e-3, 1e-3]
    with open_model(config.output) as file:
        assert (file.metadata["ss_unet_lr"], file.metadata["ss_text_encoder_lr"]) == ("0.005", "0.001")


def test_epoch_saves_logs_and_metadata(sd1, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = concept_pictures(tmp_path / "pictures", count=4)  # 4 batches per epoch
    config = tiny_config("lora", sd1.file, data, tmp_path, steps=12,
                         run={"save_every_n_epochs": 2, "log_dir": tmp_path / "logs", "metadata_title": "Disc",
                              "metadata_author": "Ann", "metadata_description": "a purple disc"})
    trainer = run_trainer(config)
    written = sorted(p.name for p in tmp_path.glob("lora*.safetensors"))
    assert written == ["lora-000002.safetensors", "lora.safetensors"]  # the last epoch is the output itself
    assert [p.name for p in trainer.result.outputs] == written
    with open_model(tmp_path / "lora-000002.safetensors") as file:
        assert file.metadata["ss_steps"] == "8"
    with open_model(config.output) as file:
        metadata = file.metadata
    assert (metadata["modelspec.title"], metadata["modelspec.author"], metadata["modelspec.description"]) == \
        ("Disc", "Ann", "a purple disc")
    events = EventAccumulator(str(tmp_path / "logs"))
    events.Reload()
    losses = [event.value for event in events.Scalars("loss/current")]
    assert [event.step for event in events.Scalars("loss/current")] == list(range(1, 13))
    assert losses == pytest.approx(trainer.result.losses)
    assert [e.value for e in events.Scalars("lr/unet")] == pytest.approx([1e-2] * 12)
    rows = (tmp_path / "logs" / "scalars.csv").read_text().splitlines()
    assert rows[0] == "step,tag,value" and len(rows) == 1 + 12 * 3
    again = tiny_config("lora", sd1.file, data, tmp_path, steps=12, run={"save_every_n_epochs": 2})
    (tmp_path / "lora.safetensors").unlink()
    with pytest.raises(SdkitError, match="lora-000002.safetensors: already exists"):
        run_trainer(again)


# ---- options per method -------------------------------------------------------------------


def _options_in_help(method, capsys):
    try:
        main(["train", method, "--help"])
    except SystemExit as exit_info:
        assert exit_info.code in (0, None)
    return {word for word in capsys.readouterr().out.split() if word.startswith("--")}


def test_train_method_help_lists_that_methods_options_only(capsys):
    lora, ti, dreambooth = (_options_in_help(m, capsys) for m in ("lora", "ti", "dreambooth"))
    assert {"--rank", "--conv-dim", "--reg-data", "--unet-lr", "--shuffle-caption"} <= lora
    assert not {"--token", "--layer-structure", "--class-prompt", "--preset"} & lora
    assert {"--token", "--init-word", "--vectors"} <= ti and not {"--rank", "--alpha", "--class-prompt"} & ti
    assert {"--class-prompt", "--format"} <= dreambooth and "--rank" not in dreambooth
    assert "--preset" in _options_in_help("loha", capsys)


@pytest.mark.parametrize("method, extra, message", [
    ("ti", ["--rank", "8"], "--rank does not apply to ti (it is for lora, loha and lokr;"),
    ("lora", ["--token", "sks"], "--token does not apply to lora (it is for ti;"),
    ("hypernet", ["--conv-dim", "4"], "--conv-dim does not apply to hypernet"),
    ("lora", ["--preset", "full"], "--preset does not apply to lora"),
    ("lora", ["--keep-tokens", "2"], "--keep-tokens keeps tags in place"),
    ("lora", ["--conv-alpha", "2"], "--conv-alpha scales the 3x3 convolution layers"),
    ("loha", ["--preset", "nope"], "--preset must be one of full, attn-only"),
    ("lora", ["--optimizer", "adafactor", "--lr-scheduler", "cosine"], "--lr-scheduler sets step sizes"),
    ("lora", ["--prior-loss-weight", "0.5"], "--prior-loss-weight weights regularization pictures"),
    ("lora", ["--repeats", "3"], "--repeats is set per folder by the N_ prefix"),
])
def test_options_a_method_does_not_use_are_refused_in_one_line(sd1, kohya_data, tmp_path, capsys, method, extra,
                                                                message):
    suffix = ".pt" if method == "hypernet" else ".safetensors"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", method, "--base", str(sd1.file), "--data", str(kohya_data / "train"),
              "-o", str(tmp_path / f"out{suffix}"), *extra])
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and error.startswith(f"sdkit: error: {message}") and "\n" not in error
    assert not list(tmp_path.iterdir())


def test_cli_trains_from_a_dataset_config(sd1, kohya_data, tmp_path, capsys):
    toml = _toml(tmp_path / "d.toml", f"""
[general]
shuffle_caption = true
[[datasets]]
resolution = 32
  [[datasets.subsets]]
  image_dir = '{kohya_data / "train" / "3_sks disc"}'
  caption_extension = ".caption"
""")
    output = tmp_path / "sks.safetensors"
    main(["train", "lora", "--base", str(sd1.file), "--dataset-config", str(toml), "-o", str(output),
          "--steps", "2", "--optimizer", "prodigy", "--lr", "1", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["outputs"] == [str(output)] and report["steps"] == 2
    with pytest.raises(SystemExit):
        main(["train", "lora", "--base", str(sd1.file), "--dataset-config", str(toml), "--data",
              str(kohya_data), "-o", str(tmp_path / "b.safetensors")])
    assert "--data and --dataset-config both name the pictures" in capsys.readouterr().err
