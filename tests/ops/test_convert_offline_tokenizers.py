"""`convert --to diffusers` of a single file writes a complete pipeline folder offline:
with no tokenizer in --config, none in the (empty) Hugging Face cache and the hub off, the
tokenizers are the CLIP ones sdkit ships and the scheduler is the family's released one;
diffusers' own `from_pretrained(..., local_files_only=True)` is the oracle that loads it.

The models are the convert tests' tiny ones with CLIP's 49408-token vocabulary, and a
config folder that holds only the component configs (sizes that are not the released
ones need them).
"""

from __future__ import annotations

import json

import pytest
import test_convert_support as S
import torch
from cli_run import run_sdkit
from offline_hub import use_empty_hub_cache
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sdkit.arch.keymaps import checkpoint_to_ldm, convert_state_dict

CAT = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat" (Bumblebee's CLIP tokenizer test)
SCHEDULERS = {"sd1": "PNDMScheduler", "sdxl": "EulerDiscreteScheduler"}  # the released repositories'


def _clip(width: int, act: str, projection: bool = False) -> torch.nn.Module:
    config = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, hidden_act=act, projection_dim=width)
    config.architectures = ["CLIPTextModelWithProjection" if projection else "CLIPTextModel"]
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _modules(family: str) -> dict[str, torch.nn.Module]:
    """The tiny UNet and VAE of the convert tests, text encoders of CLIP's vocabulary."""
    torch.manual_seed(0)
    parts = {name: part for name, part in S._modules(family).items() if name in ("unet", "vae")}
    parts["text_encoder"] = _clip(16, "quick_gelu")
    if family == "sdxl":
        parts["text_encoder_2"] = _clip(24, "gelu", projection=True)
    return parts


def _write_model(family: str, root) -> tuple:
    parts = _modules(family)
    state = {f"{name}/{key}": value for name, part in parts.items() for key, value in part.state_dict().items()}
    configs = {name: json.loads(json.dumps(dict(part.config) if name in ("unet", "vae") else part.config.to_dict(),
                                           default=str)) for name, part in parts.items()}
    ldm = convert_state_dict(checkpoint_to_ldm(state, configs).plan, state)
    source = S.write_ldm(root / f"{family}.safetensors", {key: value.contiguous() for key, value in ldm.items()})
    config_dir = root / f"{family}-configs"
    for name, config in configs.items():
        (config_dir / name).mkdir(parents=True)
        (config_dir / name / "config.json").write_text(json.dumps(config))
    return source, config_dir


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_convert_writes_shipped_tokenizers_and_scheduler_that_diffusers_loads(family, tmp_path, monkeypatch, capsys):
    use_empty_hub_cache(monkeypatch, tmp_path / "hf-cache")
    source, config_dir = _write_model(family, tmp_path)
    out = tmp_path / "pipeline"
    code, stdout, stderr = run_sdkit(capsys, "convert", str(source), "--to", "diffusers", "-o", str(out),
                                     "--config", str(config_dir), "--json")
    assert code == 0, stderr
    notes = json.loads(stdout)["notes"]
    assert not any("without tokenizer" in note for note in notes), notes
    assert any(note.startswith("tokenizer/") and "sdkit ships" in note for note in notes), notes
    tokenizers = ["tokenizer", "tokenizer_2"] if family == "sdxl" else ["tokenizer"]
    index = json.loads((out / "model_index.json").read_text())
    assert all(index[name] == ["transformers", "CLIPTokenizer"] for name in tokenizers)
    assert index["scheduler"] == ["diffusers", SCHEDULERS[family]]

    loaded = S.PIPELINES[family].from_pretrained(out, local_files_only=True)
    assert type(loaded.scheduler).__name__ == SCHEDULERS[family]
    assert (loaded.scheduler.config.beta_start, loaded.scheduler.config.beta_end) == (0.00085, 0.012)
    assert loaded.scheduler.config.prediction_type == "epsilon"
    padded = loaded.tokenizer("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert padded == CAT + [49407] * 70
    if family == "sdxl":  # OpenCLIP's tokenizer pads with `!`, id 0
        assert loaded.tokenizer_2("a photo of a cat", padding="max_length", max_length=77).input_ids == CAT + [0] * 70
    with torch.no_grad():  # the folder is a working pipeline
        latents = loaded("a photo of a cat", num_inference_steps=1, height=64, width=64, output_type="latent").images
    assert torch.isfinite(latents).all()
