"""`sdkit vae swap` / `extract`: every VAE file layout in, the exact VAE out again.

The models are tiny SD1-layout diffusers / transformers modules with random weights; the
single-file checkpoint is written by diffusers' own layout names through the LDM key maps,
and diffusers (`AutoencoderKL.from_single_file`, `from_pretrained`) reads the outputs back.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
from click.testing import CliRunner
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from sdkit.arch.keymaps import checkpoint_to_ldm, convert_state_dict, plan_for
from sdkit.cli import vae_cmd  # noqa: F401  (attaches `vae` to the group)
from sdkit.cli.main import cli
from sdkit.errors import SdkitError
from sdkit.ops.vae.swap import extract_vae, swap_vae

VAE_PREFIX = "first_stage_model."


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """These models are tiny: torch's thread pool only costs here, and much more so on a
    machine shared with other test processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_vae(seed: int, latent_channels: int = 4, channels: tuple[int, ...] = (16, 32)) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=channels, layers_per_block=1, norm_num_groups=8,
                         latent_channels=latent_channels, down_block_types=("DownEncoderBlock2D",) * len(channels),
                         up_block_types=("UpDecoderBlock2D",) * len(channels))


def config_of(module: Any) -> dict[str, Any]:
    config = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
    return json.loads(json.dumps(config, default=str))


def ldm_vae(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    state = vae.state_dict()
    return convert_state_dict(plan_for("vae", config_of(vae), state, "diffusers_to_ldm"), state)


def same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return got.keys() == want.keys() and all(
        got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny SD1 model as a diffusers folder and as an LDM single file."""
    torch.manual_seed(0)
    modules = {
        "unet": UNet2DConditionModel(sample_size=8, block_out_channels=(16, 32), layers_per_block=1,
                                     norm_num_groups=8, attention_head_dim=2, cross_attention_dim=16,
                                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
        "vae": tiny_vae(1),
        "text_encoder": CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=16, intermediate_size=32,
                                                     num_hidden_layers=1, num_attention_heads=2)),
    }
    folder = tmp_path_factory.mktemp("base") / "pipeline"
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1"}
    for name, module in modules.items():
        module.save_pretrained(folder / name)
        index[name] = ["diffusers" if name != "text_encoder" else "transformers", type(module).__name__]
    (folder / "model_index.json").write_text(json.dumps(index))
    tensors = {f"{c}/{k}": t for c, m in modules.items() for k, t in m.state_dict().items()}
    plan = checkpoint_to_ldm(tensors, {name: config_of(m) for name, m in modules.items()})
    single = folder.parent / "model.safetensors"
    save_file(convert_state_dict(plan.plan, tensors), single)
    return {"folder": folder, "single": single, "vae": modules["vae"]}


@pytest.fixture(scope="module")
def candidate(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Another VAE of the same architecture in every layout people download."""
    vae = tiny_vae(2)
    folder = tmp_path_factory.mktemp("candidate")
    ldm = ldm_vae(vae)
    vae.save_pretrained(folder / "vae")
    save_file(ldm, folder / "plain.vae.safetensors")
    save_file({VAE_PREFIX + k: v for k, v in ldm.items()}, folder / "prefixed.vae.safetensors")
    leftovers = {"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.ones(4, 3, 4, 4),
                 "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(840000)}
    torch.save({"state_dict": {**ldm, **leftovers}, "global_step": 840000}, folder / "wrapped.ckpt")
    torch.save(dict(ldm), folder / "bare.vae.pt")
    return {"module": vae, "ldm": ldm, "folder": folder}


LAYOUTS: dict[str, Callable[[Path], Path]] = {
    "a1111 .vae.safetensors": lambda f: f / "plain.vae.safetensors",
    "first_stage_model. prefix": lambda f: f / "prefixed.vae.safetensors",
    ".ckpt with state_dict and training leftovers": lambda f: f / "wrapped.ckpt",
    ".vae.pt": lambda f: f / "bare.vae.pt",
    "diffusers vae folder": lambda f: f / "vae",
    "diffusers weights file": lambda f: f / "vae" / "diffusion_pytorch_model.safetensors",
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_swap_then_extract_gives_the_vae_back(base: dict[str, Any], candidate: dict[str, Any], layout: str,
                                              tmp_path: Path) -> None:
    swapped = tmp_path / "swapped.safetensors"
    result = swap_vae(base["single"], LAYOUTS[layout](candidate["folder"]), swapped)
    assert result.written == "file" and result.vae_tensors == len(candidate["ldm"])
    out, original = load_file(swapped), load_file(base["single"])
    assert same_tensors({k: v for k, v in out.items() if not k.startswith(VAE_PREFIX)},
                        {k: v for k, v in original.items() if not k.startswith(VAE_PREFIX)})
    assert same_tensors({k[len(VAE_PREFIX):]: v for k, v in out.items() if k.startswith(VAE_PREFIX)},
                        candidate["ldm"])

    extract_vae(swapped, tmp_path / "back.vae.safetensors")
    assert same_tensors(load_file(tmp_path / "back.vae.safetensors"), candidate["ldm"])
    extract_vae(swapped, tmp_path / "back.safetensors", to="diffusers")
    assert same_tensors(load_file(tmp_path / "back.safetensors"), candidate["module"].state_dict())


def test_extracted_ldm_vae_loads_in_diffusers(base: dict[str, Any], candidate: dict[str, Any],
                                              tmp_path: Path) -> None:
    swapped = swap_vae(base["single"], candidate["folder"] / "plain.vae.safetensors",
                       tmp_path / "swapped.safetensors").output
    extract_vae(swapped, tmp_path / "out.vae.safetensors")
    loaded = AutoencoderKL.from_single_file(str(tmp_path / "out.vae.safetensors"),
                                            config=str(candidate["folder"] / "vae"), local_files_only=True)
    assert same_tensors(loaded.state_dict(), candidate["module"].state_dict())


def test_extract_to_a_diffusers_folder(base: dict[str, Any], tmp_path: Path) -> None:
    result = extract_vae(base["folder"], tmp_path / "vae", to="diffusers")
    assert result.written == "folder"
    loaded = AutoencoderKL.from_pretrained(tmp_path / "vae", local_files_only=True)
    assert same_tensors(loaded.state_dict(), base["vae"].state_dict())
    with safe_open(tmp_path / "vae" / "diffusion_pytorch_model.safetensors", "pt") as file:
        assert json.loads(file.metadata()["sdkit.recipe"])["operation"] == "vae extract"


def test_swap_into_a_diffusers_folder(base: dict[str, Any], candidate: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "swapped"
    result = swap_vae(base["folder"], candidate["folder"] / "wrapped.ckpt", out)
    assert result.written == "folder" and result.convention == "diffusers"
    loaded = AutoencoderKL.from_pretrained(out / "vae", local_files_only=True)
    assert same_tensors(loaded.state_dict(), candidate["module"].state_dict())
    for name in ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert (out / name).read_bytes() == (base["folder"] / name).read_bytes()
    assert UNet2DConditionModel.from_pretrained(out / "unet", local_files_only=True) is not None


def test_swap_records_what_made_it(base: dict[str, Any], candidate: dict[str, Any], tmp_path: Path) -> None:
    vae_file = candidate["folder"] / "wrapped.ckpt"
    result = swap_vae(base["single"], vae_file, tmp_path / "swapped.safetensors")
    assert any("4 VAE-training leftovers" in note for note in result.notes)
    with safe_open(tmp_path / "swapped.safetensors", "pt") as file:
        metadata = file.metadata()
    recipe = json.loads(metadata["sdkit.recipe"])
    assert recipe["operation"] == "vae swap"
    assert [entry["sha256"] for entry in recipe["inputs"]] == [
        hashlib.sha256(path.read_bytes()).hexdigest() for path in (base["single"], vae_file)]
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1"


@pytest.mark.parametrize("vae, message", [
    (lambda: tiny_vae(3, latent_channels=8), "a VAE with 8 latent channels cannot replace"),
    (lambda: tiny_vae(3, channels=(16, 48)), r"decoder\.conv_in\.bias has shape \[48\], the model's \[32\]"),
])
def test_swap_refuses_a_vae_that_does_not_fit(base: dict[str, Any], tmp_path: Path, vae: Callable[[], Any],
                                              message: str) -> None:
    save_file(ldm_vae(vae()), tmp_path / "other.vae.safetensors")
    out = tmp_path / "out.safetensors"
    with pytest.raises(SdkitError, match=message):
        swap_vae(base["single"], tmp_path / "other.vae.safetensors", out)
    assert list(tmp_path.iterdir()) == [tmp_path / "other.vae.safetensors"]  # nothing written, no partial


def test_swap_refuses_what_is_not_a_vae_or_not_a_checkpoint(base: dict[str, Any], candidate: dict[str, Any],
                                                           tmp_path: Path) -> None:
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.ones(4, 16)},
              tmp_path / "lora.safetensors")
    with pytest.raises(SdkitError, match="holds no VAE"):
        swap_vae(base["single"], tmp_path / "lora.safetensors", tmp_path / "out.safetensors")
    with pytest.raises(SdkitError, match="not a checkpoint with a VAE"):
        swap_vae(candidate["folder"] / "plain.vae.safetensors", candidate["folder"] / "bare.vae.pt",
                 tmp_path / "out.safetensors")


def test_extract_refuses_a_model_without_vae(base: dict[str, Any], tmp_path: Path) -> None:
    unet_only = {k: v for k, v in load_file(base["single"]).items() if k.startswith("model.diffusion_model.")}
    save_file(unet_only, tmp_path / "unet.safetensors")
    with pytest.raises(SdkitError, match="holds no VAE"):
        extract_vae(tmp_path / "unet.safetensors", tmp_path / "out.vae.safetensors")


def test_cli_json_and_overwrite_rules(base: dict[str, Any], candidate: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "swapped.safetensors"
    args = ["vae", "swap", str(base["single"]), str(candidate["folder"] / "vae"), "-o", str(out), "--json"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0
    report = json.loads(result.output)
    assert report["written"] == "file" and report["vae_convention"] == "diffusers"
    assert report["checkpoint_sha256"] == hashlib.sha256(base["single"].read_bytes()).hexdigest()
    with pytest.raises(SdkitError, match="already exists"):
        CliRunner().invoke(cli, args, catch_exceptions=False)
    assert CliRunner().invoke(cli, [*args, "--force"], catch_exceptions=False).exit_code == 0

    result = CliRunner().invoke(cli, ["vae", "extract", str(out), "-o", str(tmp_path / "x.vae.safetensors"),
                                      "--json"], catch_exceptions=False)
    assert json.loads(result.output)["tensors"] == len(candidate["ldm"])



def test_swap_refuses_an_output_of_the_wrong_kind(base: dict[str, Any], candidate: dict[str, Any],
                                                  tmp_path: Path) -> None:
    vae = candidate["folder"] / "vae"
    with pytest.raises(SdkitError, match="written as a folder"):
        swap_vae(base["folder"], vae, tmp_path / "out.safetensors")
    with pytest.raises(SdkitError, match="must be a .safetensors file"):
        swap_vae(base["single"], vae, tmp_path / "out")
    with pytest.raises(SdkitError, match=r"is one of the inputs \(use --force to replace it\)"):
        swap_vae(base["single"], vae, base["single"])
    assert list(tmp_path.iterdir()) == []


def test_extract_changes_a_vae_files_convention(candidate: dict[str, Any], tmp_path: Path) -> None:
    extract_vae(candidate["folder"] / "wrapped.ckpt", tmp_path / "vae.safetensors", to="diffusers")
    assert same_tensors(load_file(tmp_path / "vae.safetensors"), candidate["module"].state_dict())
    extract_vae(candidate["folder"] / "vae", tmp_path / "vae.vae.safetensors")
    assert same_tensors(load_file(tmp_path / "vae.vae.safetensors"), candidate["ldm"])
