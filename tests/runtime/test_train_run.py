"""The training run: reproducible by seed, resumable to the same weights, precision choices
with clear messages, options that reach the loss, metadata and the side files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

import sdkit.cli.train_cmd  # noqa: F401  (attaches `train` and `verify` to the cli group)
from sdkit.cli.main import main
from sdkit.errors import SdkitError
from sdkit.runtime.train.denoiser import Denoiser
from sdkit.runtime.train.objective import Objective
from sdkit.runtime.train.config import LossOptions
from sdkit.runtime.train.precision import resolve_precision
from test_train_support import concept_pictures, run_trainer, tiny_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return concept_pictures(tmp_path_factory.mktemp("concept"))


def _tensors(path):
    with safe_open(str(path), "pt") as file:
        return {key: file.get_tensor(key) for key in file.keys()}


def _same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- reproducibility and resume --------------------------------------------------------

def test_the_same_seed_gives_the_same_weights_and_another_seed_others(sd1, data, tmp_path):
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        config = tiny_config("lora", sd1.file, data, tmp_path / name, run={"seed": seed})
        config.output.parent.mkdir()
        runs[name] = _tensors(run_trainer(config).config.output)
    assert _same_tensors(runs["a"], runs["b"])
    assert not _same_tensors(runs["a"], runs["c"])


def test_a_resumed_run_ends_with_the_uninterrupted_runs_weights(sd1, data, tmp_path):
    options = {"network": {"dropout": 0.1}, "data": {"caption_dropout": 0.3},
               "optim": {"grad_accum": 2, "lr_scheduler": "cosine", "warmup_steps": 1}}
    straight = tiny_config("lora", sd1.file, data, tmp_path / "straight", steps=4, **options)
    straight.output.parent.mkdir()
    whole = run_trainer(straight)

    first = tiny_config("lora", sd1.file, data, tmp_path / "first", steps=2, run={"save_every": 2}, **options)
    first.output.parent.mkdir()
    run_trainer(first)
    assert (first.state_dir / "state.pt").is_file()
    second = tiny_config("lora", sd1.file, data, tmp_path / "second", steps=4, run={"resume": first.state_dir},
                         **options)
    second.output.parent.mkdir()
    resumed = run_trainer(second)
    assert resumed.result.resumed_from == 2 and resumed.result.losses == whole.result.losses
    assert _same_tensors(_tensors(second.output), _tensors(straight.output))
    record = json.loads(resumed.result.record.read_text())
    assert record["steps"] == {"done": 4, "resumed_from": 2, "batches_per_epoch": 4}


def test_a_state_of_another_run_is_refused_naming_what_differs(sd1, data, tmp_path):
    first = tiny_config("lora", sd1.file, data, tmp_path, steps=1, run={"save_every": 1})
    run_trainer(first)
    other_data = shutil.copytree(data, tmp_path / "other-data")
    (other_data / "0.txt").write_text("a photo of something else")
    other_base = tmp_path / "other-base.safetensors"
    other_base.write_bytes(sd1.file.read_bytes()[:-1] + b"\1")  # refused before it would load
    changed = {"optim": {"batch_size": 2, "grad_accum": 2}, "network": {"rank": 8},
               "data": {"trigger": "ohwx", "repeats": 2, "min_width": 8, "caption_dropout": 0.1}}
    with pytest.raises(SdkitError) as refused:
        run_trainer(tiny_config("lora", other_base, other_data, tmp_path, steps=2,
                                output=tmp_path / "other.safetensors", run={"seed": 5, "resume": first.state_dir},
                                **changed))
    message = str(refused.value)
    assert message.startswith(f"{first.state_dir}: this state is from another run (base model: sha256 ")
    assert message.endswith("; only --steps and the learning rates may change when resuming") and "\n" not in message
    for difference in ("training pictures: sha256 ", "--seed: 0 then, 5 now", "--batch-size: 1 then, 2 now",
                       "--grad-accum: 1 then, 2 now", "--trigger: null then, \"ohwx\" now", "--repeats: 1 then, 2 now",
                       "--min-width: 0 then, 8 now", "--caption-dropout: 0.0 then, 0.1 now", "--rank: 4 then, 8 now"):
        assert difference in message
    assert not (tmp_path / "other.train.json").exists()
    with pytest.raises(SdkitError, match="leaves nothing to train"):
        run_trainer(tiny_config("lora", sd1.file, data, tmp_path, steps=1, output=tmp_path / "again.safetensors",
                                run={"resume": first.state_dir}))
    resumed = run_trainer(tiny_config("lora", sd1.file, data, tmp_path, steps=2, lr=5e-3,
                                      optim={"text_encoder_lr": 1e-3}, output=tmp_path / "longer.safetensors",
                                      run={"resume": first.state_dir}))
    assert resumed.result.resumed_from == 1 and len(resumed.result.losses) == 2


def test_gradient_checkpointing_does_not_change_the_result(sd1, data, tmp_path):
    results = []
    for name, flag in (("plain", False), ("checkpointed", True)):
        config = tiny_config("lora", sd1.file, data, tmp_path / name, optim={"gradient_checkpointing": flag})
        config.output.parent.mkdir()
        results.append(_tensors(run_trainer(config).config.output))
    assert all(torch.allclose(results[0][k], results[1][k], atol=1e-6) for k in results[0])


# ---- precision ---------------------------------------------------------------------------

def test_auto_precision_on_cpu_trains_in_fp32_and_says_so(sd1, data, tmp_path):
    trainer = run_trainer(tiny_config("lora", sd1.file, data, tmp_path, steps=1))
    assert trainer.result.precision == "fp32"
    assert any("training in fp32 on cpu" in note for note in trainer.result.notes)


def _fake_gpu(monkeypatch, bf16: bool) -> torch.device:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    return torch.device("cuda")


def test_precision_choices_on_gpus_with_and_without_bf16(monkeypatch):
    gpu = _fake_gpu(monkeypatch, bf16=False)
    plan = resolve_precision("auto", gpu)
    assert plan.name == "fp16" and plan.frozen_dtype == torch.float16 and "loss scaling" in plan.note
    with pytest.raises(SdkitError, match=r"^--precision bf16: Tesla T4 does not support bfloat16; use --precision fp16"):
        resolve_precision("bf16", gpu)
    gpu = _fake_gpu(monkeypatch, bf16=True)
    assert resolve_precision("auto", gpu).mixed_precision == "bf16"
    assert resolve_precision("fp16", gpu).mixed_precision == "fp16"


def test_fp16_on_cpu_is_refused_in_one_clear_line(sd1, data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "lora", "--base", str(sd1.file), "--data", str(data), "-o", str(tmp_path / "x.safetensors"),
              "--precision", "fp16", "--steps", "1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert err.strip() == "sdkit: error: --precision fp16 needs a CUDA GPU; on cpu train with --precision fp32 (or auto)"
    assert not (tmp_path / "x.safetensors").exists()


def test_train_silences_transformers_notices_unless_debugging(sd1, data, tmp_path, capsys):
    """transformers prints notices about torchvision when pipelines load; the command turns
    its log level to errors (the subprocess test in test_verify.py reads real stderr)."""
    from transformers.utils import logging

    args = ["train", "lora", "--base", str(sd1.file), "--data", str(data), "-o", str(tmp_path / "x.safetensors"),
            "--precision", "fp16", "--steps", "1"]  # refused on this CPU: the check comes first
    before = logging.get_verbosity()
    try:
        logging.set_verbosity_warning()
        with pytest.raises(SdkitError):
            main(["--debug", *args])
        assert logging.get_verbosity() == logging.WARNING
        with pytest.raises(SystemExit):
            main(args)
        assert logging.get_verbosity() == logging.ERROR
    finally:
        logging.set_verbosity(before)


# ---- what reaches the loss -------------------------------------------------------------

def test_captions_get_the_trigger_repeats_count_and_dropout_empties_them(sd1, data, tmp_path, monkeypatch):
    seen = []
    original = Denoiser.tokenize
    monkeypatch.setattr(Denoiser, "tokenize", lambda self, captions: seen.append(list(captions)) or
                        original(self, captions))
    trainer = run_trainer(tiny_config("lora", sd1.file, data, tmp_path / "t", steps=3,
                                      data={"trigger": "ohwx", "repeats": 3}, output=tmp_path / "t.safetensors"))
    assert seen == [["ohwx, a photo of sks"]] * 3
    record = json.loads(trainer.result.record.read_text())["data"]
    assert record["samples_per_epoch"] == 12 and record["latents_encoded"] == 4  # once per picture, not per repeat
    seen.clear()
    run_trainer(tiny_config("lora", sd1.file, data, tmp_path, steps=3, data={"caption_dropout": 0.999}))
    assert seen == [[""]] * 3


def test_v_prediction_targets_velocity_and_min_snr_weights_follow_diffusers():
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    config = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
              "num_train_timesteps": 1000, "prediction_type": "epsilon"}
    objective = Objective(config, LossOptions(prediction_type="v_prediction", min_snr_gamma=5.0))
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    batch = objective.noisy_batch(latents, torch.Generator().manual_seed(1))
    replay = torch.Generator().manual_seed(1)
    noise = torch.randn(latents.shape, generator=replay)
    timesteps = torch.randint(0, 1000, (3,), generator=replay)
    reference = DDPMScheduler(**config)
    assert torch.equal(batch.timesteps, timesteps)
    assert torch.allclose(batch.target, reference.get_velocity(latents, noise, timesteps))
    prediction = torch.zeros_like(latents)
    snr = compute_snr(reference, timesteps)
    expected = (batch.target ** 2).mean(dim=(1, 2, 3)) * torch.clamp(snr, max=5.0) / (snr + 1)
    assert torch.allclose(objective.loss(prediction, batch), expected)


def test_noise_offset_shifts_each_channel_by_one_constant():
    config = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
    plain = Objective(config, LossOptions()).noisy_batch(torch.zeros(2, 4, 8, 8), torch.Generator().manual_seed(2))
    offset = Objective(config, LossOptions(noise_offset=0.1)).noisy_batch(torch.zeros(2, 4, 8, 8),
                                                                         torch.Generator().manual_seed(2))
    shift = offset.target - plain.target
    assert shift.abs().max() > 0 and torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift))


# ---- outputs ---------------------------------------------------------------------------

def test_metadata_record_loss_curve_and_previews(sd1, data, tmp_path):
    config = tiny_config("lora", sd1.file, data, tmp_path, steps=2, lr=5e-3, data={"trigger": "ohwx"},
                         run={"seed": 7, "preview_every": 1, "preview_prompts": ("a photo of sks",),
                              "preview_seeds": 2})
    result = run_trainer(config).result
    with safe_open(str(config.output), "pt") as file:
        metadata = file.metadata()
    # the family's native 64x64 is not what this LoRA was trained at
    assert (metadata["modelspec.resolution"], metadata["modelspec.trigger_phrase"]) == ("32x32", "ohwx")
    assert {key: metadata[key] for key in ("ss_random_crop", "ss_clip_skip", "ss_flip_aug", "ss_shuffle_caption",
                                           "ss_keep_tokens", "ss_reg_dataset_dirs")} == {
        "ss_random_crop": "False", "ss_clip_skip": "None", "ss_flip_aug": "False", "ss_shuffle_caption": "False",
        "ss_keep_tokens": "0", "ss_reg_dataset_dirs": "{}"}
    assert 0 <= int(metadata["ss_session_id"]) <= 2 ** 32
    dataset, = json.loads(metadata["ss_datasets"])
    assert dataset["is_dreambooth"] and dataset["num_train_images"] == 4 and dataset["resolution"] == [32, 32]
    assert dataset["subsets"] == [{"img_count": 4, "num_repeats": 1, "color_aug": False, "flip_aug": False,
                                   "random_crop": False, "shuffle_caption": False, "keep_tokens": 0,
                                   "image_dir": data.name, "class_tokens": "ohwx", "is_reg": False}]
    for key in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_learning_rate", "ss_steps",
                "ss_base_model_version", "ss_sd_model_hash", "ss_new_sd_model_hash", "ss_resolution", "ss_seed",
                "ss_num_train_images", "ss_tag_frequency", "ss_mixed_precision", "ss_training_started_at",
                "ss_training_finished_at", "sshs_model_hash", "modelspec.architecture", "sdkit.recipe"):
        assert key in metadata, key
    assert (metadata["ss_learning_rate"], metadata["ss_steps"], metadata["ss_seed"]) == ("0.005", "2", "7")
    assert metadata["ss_resolution"] == "(32, 32)" and metadata["ss_num_train_images"] == "4"
    assert json.loads(metadata["ss_tag_frequency"]) == {data.name: {"a photo of sks": 4}}
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_mixed_precision"] == "no"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    import hashlib

    assert metadata["ss_new_sd_model_hash"] == hashlib.sha256(sd1.file.read_bytes()).hexdigest()
    record = json.loads(result.record.read_text())
    assert record["loss"]["per_step"] == result.losses and len(result.losses) == 2
    assert record["config"]["optim"]["lr"] == 5e-3 and record["outputs"] == [config.output.name]
    # where the user keeps the base, the pictures and the output stays on this machine
    assert str(tmp_path) not in result.record.read_text() and record["base"]["path"] == sd1.file.name
    assert not [key for key, value in metadata.items() if str(tmp_path) in value or str(sd1.file.parent) in value]
    assert json.loads(metadata["sdkit.recipe"])["parameters"]["data"]["folder"] == data.name
    assert record["data"]["buckets"] == {"32x32": 4} and record["timings"]["train_s"] > 0
    with Image.open(result.loss_curve) as curve:
        assert curve.format == "PNG" and curve.size == (640, 360)
    names = sorted(path.name for path in result.previews)
    assert names == [f"step-00000{s}-p0-s{seed}.png" for s in (1, 2) for seed in (0, 1)]
    with Image.open(result.previews[0]) as preview:
        assert preview.size == (32, 32) and "a photo of sks" in preview.text["parameters"]


def test_an_existing_output_is_refused_before_any_work(sd1, data, tmp_path):
    output = tmp_path / "lora.safetensors"
    output.write_bytes(b"keep")
    with pytest.raises(SdkitError, match="already exists"):
        run_trainer(tiny_config("lora", sd1.file, data, tmp_path))
    assert output.read_bytes() == b"keep" and not (tmp_path / "lora.train.json").exists()


@pytest.mark.parametrize("change, message", [
    ({"data": {"crop": "random"}}, "cannot be cached"),
    ({"output": "x.pt"}, "a lora output is .safetensors"),
    ({"run": {"preview_every": 2}}, "needs at least one --preview-prompt"),
    ({"data": {"min_aspect": 2.0, "max_aspect": 1.0}}, "the smaller first"),
])
def test_contradictory_options_are_refused_in_one_line(sd1, data, tmp_path, change, message):
    if "output" in change:
        change = {"output": tmp_path / change["output"]}
    with pytest.raises(SdkitError, match=message):
        run_trainer(tiny_config("lora", sd1.file, data, tmp_path, **change))


@pytest.mark.parametrize("method, changes, message", [
    ("dreambooth", {"dreambooth": {"class_dir": Path("class")}},
     "--class-dir is for prior preservation, which needs --class-prompt"),
    ("dreambooth", {"dreambooth": {"num_class_images": 10}}, "--num-class-images is for prior preservation"),
    ("dreambooth", {"dreambooth": {"prior_loss_weight": 0.5}}, "--prior-loss-weight is for prior preservation"),
    ("lora", {"dreambooth": {"class_prompt": "a photo"}}, "--class-prompt applies to dreambooth, not lora"),
    ("lora", {"data": {"cache_dir": Path("cache")}},
     "--cache-dir is where --cache-latents disk keeps latents, and the cache is memory, so it would be ignored"),
    ("lora", {"data": {"bucket_step": 64, "buckets": False}}, "--bucket-step sets the sides of aspect-ratio buckets"),
    ("ti", {"network": {"train_text_encoder": True}},
     "--train-text-encoder applies to lora, loha, lokr and dreambooth, not ti"),
    ("hypernet", {"network": {"train_text_encoder": True}}, "--train-text-encoder applies to"),
    ("hypernet", {"run": {"save_precision": "fp16"}}, "--save-precision does not apply to hypernetworks"),
    ("ti", {"embedding": {"vectors": 76}}, "--vectors must be at most 75"),
    ("lora", {"network": {"alpha": -1.0}}, "--alpha must be positive, not -1"),
    ("hypernet", {"hypernet": {"activation": "nope"}}, "--activation 'nope' is unknown"),
    ("hypernet", {"hypernet": {"activation": "threshold"}}, "--activation 'threshold' cannot be built without"),
    ("hypernet", {"hypernet": {"weight_init": "Zeros"}}, "--weight-init must be one of Normal, XavierUniform"),
    ("hypernet", {"hypernet": {"layer_structure": (1, 2)}}, "--layer-structure 1,2: must start and end with 1"),
])
def test_ignored_or_invalid_options_are_refused_up_front_naming_the_option(sd1, data, tmp_path, method, changes,
                                                                           message):
    from sdkit.runtime.train.config import check_config

    with pytest.raises(SdkitError) as refused:
        check_config(tiny_config(method, sd1.file, data, tmp_path, **changes))
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)


def test_8bit_adam_without_bitsandbytes_is_refused_before_loading(sd1, data, tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes"
                        else find_spec(name, *a))
    with pytest.raises(SdkitError, match="adamw8bit needs the bitsandbytes package"):
        run_trainer(tiny_config("lora", sd1.file, data, tmp_path, optim={"optimizer": "adamw8bit"}))


def test_sdxl_lora_uses_ldm_unet_names_and_both_text_encoders(sdxl, data, tmp_path):
    from sdkit.adapters.lora_format import parse_lora
    from sdkit.io import open_model

    config = tiny_config("lora", sdxl.file, data, tmp_path, network={"train_text_encoder": True})
    trainer = run_trainer(config)
    with open_model(config.output) as file:
        names = set(parse_lora(file, file.metadata).modules)
        assert file.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert {name.split("_")[1] for name in names} == {"unet", "te1", "te2"}
    unet_names = [n for n in names if n.startswith("lora_unet_")]
    assert unet_names and all(n.startswith(("lora_unet_input_blocks_", "lora_unet_output_blocks_",
                                            "lora_unet_middle_block_")) for n in unet_names)
    # applied by name onto a fresh base, the file reproduces the trained UNet
    from sdkit.runtime.pipeline import load_model
    from sdkit.runtime.sample.lora import LoraRequest, RuntimeLoras

    trained_unet = trainer.model.pipe.unet.eval()
    fresh = load_model(sdxl.file)
    plain = _sdxl_output(fresh.pipe.unet)
    RuntimeLoras(fresh.pipe, fresh.family, fresh.layout).apply([LoraRequest(config.output, "x")])
    trained = _sdxl_output(trained_unet)
    effect = (trained - plain).abs().max()
    assert effect > 1e-4 and torch.allclose(_sdxl_output(fresh.pipe.unet), trained, atol=effect * 1e-3)


def _sdxl_output(unet):
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    pooled = torch.randn(1, unet.config.projection_class_embeddings_input_dim - 6 * 8, generator=generator)
    added = {"text_embeds": pooled, "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}
    with torch.no_grad():
        return unet(latent, torch.tensor([500]), context, added_cond_kwargs=added).sample


def test_cli_trains_reports_json_and_refuses_to_overwrite(sd1, data, tmp_path, capsys):
    output = tmp_path / "sks.safetensors"
    args = ["train", "ti", "--base", str(sd1.file), "--data", str(data), "-o", str(output), "--steps", "2",
            "--resolution", "32", "--init-word", "cat", "--vectors", "2", "--lr", "0.01"]
    main(args + ["--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["outputs"] == [str(output)] and report["steps"] == 2 and report["precision"] == "fp32"
    from sdkit.adapters.embedding import read_embedding

    assert read_embedding(output).vector_count == 2
    assert json.loads((tmp_path / "sks.train.json").read_text())["config"]["embedding"]["vectors"] == 2
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 1 and "already exists (overwriting needs --force)" in capsys.readouterr().err



def test_cli_progress_is_lines_when_not_on_a_terminal(sd1, data, tmp_path, capsys):
    output = tmp_path / "sks.safetensors"
    main(["train", "ti", "--base", str(sd1.file), "--data", str(data), "-o", str(output), "--steps", "3",
          "--resolution", "32", "--init-word", "cat", "--lr", "0.01"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train: step")]
    assert [line.split(" · ")[0] for line in lines] == ["train: step 1/3", "train: step 2/3", "train: step 3/3"]
    assert all(" · loss " in line and " · lr 1.00e-02" in line for line in lines)
    assert " it/s · ETA 0:00" in lines[-1]


def test_progress_lines_come_every_twentieth_of_training_with_rate_and_time_left():
    from sdkit.cli.train_cmd import ProgressLines
    from sdkit.runtime.train.loop import TrainEvent

    printed, now = [], [0.0]
    lines = ProgressLines(printed.append, clock=lambda: now[0])
    lines(TrainEvent("latents", 4, 4))
    for step in range(1, 101):
        now[0] = step * 0.5  # two steps a second
        lines(TrainEvent("train", step, 100, loss=0.25, lr=1e-4))
    assert printed[0] == "latents: 4/4 done in 0.0 s"
    steps = [line for line in printed if line.startswith("train:")]
    assert len(steps) == 20 and steps[0].startswith("train: step 5/100 · loss 0.2500 · lr 1.00e-04")
    assert "2.00 it/s · ETA 0:47" in steps[0] and steps[-1].endswith("ETA 0:00")


@pytest.mark.slow
def test_two_processes_train_data_parallel_through_accelerate(sd1, data, tmp_path):
    """torchrun sets what `accelerate launch` sets; accelerate then runs DDP (gloo on CPU)."""
    import os
    import subprocess
    import sys

    driver = tmp_path / "driver.py"
    driver.write_text("import sdkit.cli.train_cmd\nfrom sdkit.cli.main import main\nmain()\n")
    output = tmp_path / "ddp.safetensors"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
               str(driver), "train", "lora", "--base", str(sd1.file), "--data", str(data), "-o", str(output),
               "--steps", "2", "--resolution", "32", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    reports = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1 and reports[0]["outputs"] == [str(output)]  # only the main process reports
    record = json.loads((tmp_path / "ddp.train.json").read_text())
    assert record["processes"] == 2 and record["steps"]["done"] == 2
    assert json.loads(_tensors_metadata(output)["ss_total_batch_size"]) == 2


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _tensors_metadata(path):
    with safe_open(str(path), "pt") as file:
        return file.metadata()


def test_v_prediction_follows_the_bases_scheduler_config(sd2, data, tmp_path):
    import shutil

    base = tmp_path / "sd2-v"
    shutil.copytree(sd2.folder, base)
    scheduler = base / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "prediction_type": "v_prediction"}))
    trainer = run_trainer(tiny_config("lora", base, data, tmp_path, steps=1))
    assert trainer.objective.prediction == "v_prediction"
    metadata = _tensors_metadata(trainer.config.output)
    assert metadata["ss_base_model_version"] == "sd_v2_v" and metadata["modelspec.prediction_type"] == "v"
    assert metadata["ss_v2"] == "True"


def test_pictures_the_run_writes_inside_the_data_folder_are_not_trained_on(sd1, tmp_path):
    data = concept_pictures(tmp_path / "data", count=2)
    config = tiny_config("lora", sd1.file, data, data, steps=1,
                         run={"preview_every": 1, "preview_prompts": ("a photo",)})
    run_trainer(config)
    assert (data / "lora.loss.png").is_file() and list((data / "lora.previews").glob("*.png"))
    again = run_trainer(tiny_config("lora", sd1.file, data, data, steps=1, run={"overwrite": True}))
    assert json.loads(again.result.record.read_text())["data"]["images"] == 2
