"""diffusers / transformers folders: pipelines, lone components, sharded weights and
`.bin` fallbacks, built with the peers' own `save_pretrained`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sdkit.errors import SdkitError
from sdkit.io import lazy_tensors, open_model, write_safetensors


def tiny_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
        norm_num_groups=4, attention_head_dim=2)


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), latent_channels=4,
                         norm_num_groups=4, layers_per_block=1)


def tiny_text_encoder() -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=8, intermediate_size=16,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        max_position_embeddings=16, bos_token_id=0,
                                        eos_token_id=1, pad_token_id=1))


def tiny_tokenizer(folder: Path) -> CLIPTokenizer:
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "b</w>": 3}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("diffusers")
    torch.manual_seed(0)
    unet, vae, text_encoder = tiny_unet(), tiny_vae(), tiny_text_encoder()
    pipeline = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tiny_tokenizer(root),
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(root / "pipeline")
    unet.save_pretrained(root / "unet-sharded", max_shard_size="20KB")
    text_encoder.save_pretrained(root / "te-sharded", max_shard_size="2KB")
    unet.save_pretrained(root / "unet-bin", safe_serialization=False)
    return {"root": root, "pipeline": root / "pipeline", "unet-sharded": root / "unet-sharded",
            "te-sharded": root / "te-sharded", "unet-bin": root / "unet-bin"}


def file_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a component folder, read by the peer loaders."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(safetensors.torch.load_file(path))
    for path in sorted(folder.glob("*.bin")):
        tensors.update(torch.load(path, weights_only=True))
    return tensors


def assert_same_tensors(model, expected: dict[str, torch.Tensor], prefix: str = "") -> None:
    assert sorted(model.keys()) == sorted(prefix + key for key in expected)
    for key, tensor in expected.items():
        assert torch.equal(model.load(prefix + key), tensor), key


def test_pipeline_folder(folders: dict[str, Path]) -> None:
    folder = folders["pipeline"]
    with open_model(folder) as model:
        assert model.format == "diffusers"
        assert sorted(model.components) == ["text_encoder", "unet", "vae"]
        everything = {}
        for name, component in model.components.items():
            expected = file_tensors(folder / name)
            assert_same_tensors(component, expected)
            everything.update({f"{name}/{key}": tensor for key, tensor in expected.items()})
        assert_same_tensors(model, everything)
        assert model.extra["model_index"] == json.loads((folder / "model_index.json").read_text())
        configs = model.extra["configs"]
        assert sorted(configs) == ["scheduler", "text_encoder", "tokenizer", "unet", "vae"]
        assert configs["scheduler"]["_class_name"] == "DDIMScheduler"
        assert configs["unet"] == json.loads((folder / "unet" / "config.json").read_text())
        assert model.metadata["_class_name"] == "StableDiffusionPipeline"
        key = next(k for k in model.keys() if k.startswith("unet/"))
        assert torch.equal(model.load(key), model.components["unet"].load(key[len("unet/"):]))


@pytest.mark.parametrize("name", ["unet-sharded", "te-sharded", "unet-bin"])
def test_component_folders(folders: dict[str, Path], name: str) -> None:
    folder = folders[name]
    if name.endswith("sharded"):
        assert len(list(folder.glob("*.safetensors"))) > 1
    with open_model(folder) as model:
        assert model.format == "diffusers" and list(model.components) == [name]
        assert_same_tensors(model, file_tensors(folder), prefix=f"{name}/")
        assert model.extra["model_index"] is None
        assert model.extra["configs"][name] == json.loads((folder / "config.json").read_text())
        component = model.components[name]
        assert component.format == ("pickle" if name.endswith("bin") else "safetensors")


def test_component_inside_pipeline_opens_alone(folders: dict[str, Path]) -> None:
    with open_model(folders["pipeline"] / "vae") as model:
        assert list(model.components) == ["vae"]
        assert model.metadata == {"_class_name": "AutoencoderKL"}


def test_lone_variant_weights_are_found(folders: dict[str, Path], tmp_path: Path) -> None:
    folder = Path(shutil.copytree(folders["pipeline"] / "vae", tmp_path / "vae"))
    (folder / "diffusion_pytorch_model.safetensors").rename(
        folder / "diffusion_pytorch_model.fp16.safetensors")
    with open_model(folder) as model:
        assert model.components["vae"].path.name == "diffusion_pytorch_model.fp16.safetensors"
        assert_same_tensors(model, file_tensors(folder), prefix="vae/")


def test_writer_output_loads_in_diffusers(folders: dict[str, Path], tmp_path: Path) -> None:
    source = folders["pipeline"] / "vae"
    target = tmp_path / "vae"
    target.mkdir()
    shutil.copy(source / "config.json", target / "config.json")
    with open_model(source) as model:
        write_safetensors(target / "diffusion_pytorch_model.safetensors",
                          lazy_tensors(model.components["vae"]), {"format": "pt"})
    original = AutoencoderKL.from_pretrained(source)
    copy = AutoencoderKL.from_pretrained(target)
    for (name, mine), (_, theirs) in zip(copy.state_dict().items(), original.state_dict().items()):
        assert torch.equal(mine, theirs), name


def copy_folder(folders: dict[str, Path], name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folders[name], tmp_path / name))


def test_missing_component_folder(folders: dict[str, Path], tmp_path: Path) -> None:
    folder = copy_folder(folders, "pipeline", tmp_path)
    shutil.rmtree(folder / "vae")
    with pytest.raises(SdkitError, match="component 'vae' of model_index.json has no folder"):
        open_model(folder)


def test_broken_model_index(folders: dict[str, Path], tmp_path: Path) -> None:
    folder = copy_folder(folders, "pipeline", tmp_path)
    (folder / "model_index.json").write_text("{broken")
    with pytest.raises(SdkitError, match="model_index.json: not a readable JSON file"):
        open_model(folder)


@pytest.mark.parametrize("edit,message", [
    (lambda m: {**m, "conv_in.weight": "../../etc/passwd"}, "points outside the folder"),
    (lambda m: {**m, "no.such.key": next(iter(m.values()))}, "'no.such.key' is not in shard"),
    (lambda m: {**m, "conv_in.weight": "missing.safetensors"}, "shard missing.safetensors is missing"),
])
def test_broken_shard_index(folders: dict[str, Path], tmp_path: Path, edit, message) -> None:
    folder = copy_folder(folders, "unet-sharded", tmp_path)
    index_path = folder / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = edit(index["weight_map"])
    index_path.write_text(json.dumps(index))
    with pytest.raises(SdkitError, match=message):
        open_model(folder)


def test_folders_that_are_not_models(tmp_path: Path) -> None:
    with pytest.raises(SdkitError, match="unrecognised model folder"):
        open_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SdkitError, match="unrecognised model folder"):
        open_model(tmp_path)
