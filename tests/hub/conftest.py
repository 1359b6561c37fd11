"""Fixtures for the hub tests: local fake servers, a clean hub environment, tiny models.

No test here reaches the network: every URL points at a server the test started on
127.0.0.1, and the environment is scrubbed of real tokens first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest
import torch
from safetensors.torch import save_file

from hub_fakes import FakeCivitai, FakeHub, FileHost
from sdkit.hub import RetryPolicy, TransferOptions

FAST_TIMEOUT_S = 5.0


@pytest.fixture(autouse=True)
def hub_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No real token, no proxy, no Xet, a private HF home; set before any hub call."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "CIVITAI_TOKEN", "SDKIT_LIBRARY",
                 "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "5")
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "5")
    import huggingface_hub.constants as hf_constants

    # the stored-login path was fixed when huggingface_hub was imported: point it at nothing
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))


@pytest.fixture
def waits() -> list[float]:
    """The waits the retry policy asked for (recorded, not slept)."""
    return []


@pytest.fixture
def options(waits: list[float]) -> TransferOptions:
    """Fast, bounded transfers: small chunks so drops land mid-stream, no real sleeping."""
    policy = RetryPolicy(attempts=4, backoff=0.01, timeout=FAST_TIMEOUT_S, sleep=waits.append)
    return TransferOptions(policy=policy, chunk_bytes=16 << 10, state_every_bytes=32 << 10)


@pytest.fixture
def file_host() -> Iterator[FileHost]:
    host = FileHost()
    yield host
    host.server.stop()


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    hub = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    yield hub
    hub.server.stop()
    hub.storage.server.stop()


@pytest.fixture
def fake_civitai(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeCivitai]:
    civitai = FakeCivitai()
    monkeypatch.setenv("CIVITAI_ENDPOINT", civitai.endpoint)
    yield civitai
    civitai.server.stop()
    civitai.storage.server.stop()


def payload(size: int, seed: int = 0) -> bytes:
    """Deterministic incompressible bytes."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (size,), generator=generator, dtype=torch.uint8).numpy().tobytes()


# --- tiny real model files, built with the peers' classes ------------------------------------

def kohya_lora(path: Path, width: int = 768, seed: int = 0) -> Path:
    """A kohya-named SD UNet LoRA (two attention projections, rank 4)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in ("to_k", "to_v"):
        name = f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_{layer}"
        tensors[f"{name}.lora_down.weight"] = torch.randn(4, width, generator=generator)
        tensors[f"{name}.lora_up.weight"] = torch.randn(320, 4, generator=generator)
        tensors[f"{name}.alpha"] = torch.tensor(4.0)
    save_file(tensors, path, metadata={"ss_network_module": "networks.lora"})
    return path


def a1111_embedding(path: Path, width: int = 768) -> Path:
    """A textual-inversion embedding as A1111 saves it (`string_to_param` in a .pt)."""
    torch.save({"string_to_param": {"*": torch.randn(2, width)}, "name": path.stem, "step": 100,
                "string_to_token": {"*": 265}}, path)
    return path


def _tiny_sd1_modules() -> dict[str, torch.nn.Module]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        attention_head_dim=4, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                        latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2,
                                        pad_token_id=1))
    return {"unet": unet, "vae": vae, "text_encoder": text}


def _config(module: torch.nn.Module) -> dict:
    config = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
    return json.loads(json.dumps(config, default=str))


@pytest.fixture(scope="session")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small real file per kind: LDM-keyed SD1 checkpoint, VAE, kohya LoRA, embedding."""
    from sdkit.arch.keymaps import checkpoint_to_ldm, convert_state_dict

    folder = tmp_path_factory.mktemp("models")
    modules = _tiny_sd1_modules()
    tensors = {f"{c}/{k}": t for c, m in modules.items() for k, t in m.state_dict().items()}
    plan = checkpoint_to_ldm(tensors, {name: _config(m) for name, m in modules.items()})
    ldm = {k: v.contiguous() for k, v in convert_state_dict(plan.plan, tensors).items()}
    save_file(ldm, folder / "tiny-checkpoint.safetensors")
    vae = {k.removeprefix("first_stage_model."): v for k, v in ldm.items() if k.startswith("first_stage_model.")}
    save_file(vae, folder / "tiny-vae.safetensors")
    return {
        "checkpoint": folder / "tiny-checkpoint.safetensors",
        "vae": folder / "tiny-vae.safetensors",
        "lora": kohya_lora(folder / "tiny-lora.safetensors"),
        "embedding": a1111_embedding(folder / "tiny-embedding.pt"),
    }
