"""`sdkit join` and `sdkit split`: ComfyUI's all-in-one layout and its separate parts.

Tiny random parts of a FLUX.1 (the diffusers test config's transformer, a small CLIP and
T5 from transformers, a 16-channel LDM VAE): joined, every tensor lands under the prefix
ComfyUI's loader reads (`model.diffusion_model.`, `text_encoders.clip_l.transformer.`,
`text_encoders.t5xxl.transformer.`, `vae.`) with its bytes unchanged; split again, the
parts come back.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fixtures" / "families"))

from cli_run import run_sdkit  # noqa: E402
from released import ldm_vae_shapes, tiny_tensors  # noqa: E402

TOY_SD1 = Path(__file__).resolve().parents[2] / "fixtures" / "toy" / "sd1" / "toy-sd1.safetensors"


def _random(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}


def _clip() -> dict[str, torch.Tensor]:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(1)
    config = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                            vocab_size=1000, max_position_embeddings=77)
    return {k: v for k, v in CLIPTextModel(config).state_dict().items() if not k.endswith("position_ids")}


def _t5() -> dict[str, torch.Tensor]:
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(2)
    config = T5Config(d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=2, vocab_size=1000,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    return dict(T5EncoderModel(config).state_dict())


@pytest.fixture()
def parts(tmp_path) -> dict[str, Path]:
    tensors = {"flux": tiny_tensors("flux", "ldm"), "clip": _clip(), "t5": _t5(),
               "vae": _random(ldm_vae_shapes(16, quant_convs=False, widths=(32, 32), layers=1), 3),
               "sdxl_vae": _random(ldm_vae_shapes(4, quant_convs=True, widths=(32, 32), layers=1), 4)}
    paths = {}
    for name, state in tensors.items():
        paths[name] = tmp_path / f"{name}.safetensors"
        save_file({k: v.clone().contiguous() for k, v in state.items()}, paths[name])  # T5 ties two
    return paths


def _ok(capsys, *args: str) -> dict:
    code, out, err = run_sdkit(capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out)


def _refused(capsys, *args: str) -> str:
    code, _out, err = run_sdkit(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("sdkit: error: "), err
    return lines[0]


def test_join_writes_comfyui_prefixes_with_the_parts_bytes(tmp_path, capsys, parts):
    out = tmp_path / "aio.safetensors"
    result = _ok(capsys, "join", str(parts["flux"]), str(parts["clip"]), str(parts["t5"]), str(parts["vae"]),
                 "-o", str(out))
    assert result["family"] == "flux"
    joined = load_file(out)
    expected = {
        **{"model.diffusion_model." + k: v for k, v in load_file(parts["flux"]).items()},
        **{"text_encoders.clip_l.transformer.text_model." + k: v for k, v in load_file(parts["clip"]).items()},
        **{"text_encoders.t5xxl.transformer." + k: v for k, v in load_file(parts["t5"]).items()},
        **{"vae." + k: v for k, v in load_file(parts["vae"]).items()},
    }
    assert sorted(joined) == sorted(expected)
    assert all(torch.equal(joined[k], expected[k]) for k in expected)
    info = _ok(capsys, "inspect", str(out))
    assert info["family"] == "flux" and info["kind"] == "checkpoint"
    components = set(info["components"])  # a tiny T5 is not told FLUX's text_encoder_2 from SD3's _3
    assert {"transformer", "vae", "text_encoder"} <= components and len(components) == 4


def test_split_gives_the_parts_back(tmp_path, capsys, parts):
    out = tmp_path / "aio.safetensors"
    _ok(capsys, "join", str(parts["flux"]), str(parts["clip"]), str(parts["t5"]), str(parts["vae"]), "-o", str(out))
    result = _ok(capsys, "split", str(out), "-o", str(tmp_path / "parts"))
    written = {part["kind"] + ":" + Path(part["path"]).name: tmp_path / "parts" / part["path"]
               for part in result["parts"]}
    assert sorted(written) == ["VAE:aio_vae.safetensors", "diffusion model:aio.safetensors",
                               "text encoder:aio_clip_l.safetensors", "text encoder:aio_t5xxl.safetensors"]
    assert written["diffusion model:aio.safetensors"].parent.name == "diffusion_models"

    def same(path: Path, original: Path, prefix: str = "") -> bool:
        a, b = load_file(path), {prefix + k: v for k, v in load_file(original).items()}
        return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert same(written["diffusion model:aio.safetensors"], parts["flux"])
    assert same(written["text encoder:aio_t5xxl.safetensors"], parts["t5"])
    assert same(written["text encoder:aio_clip_l.safetensors"], parts["clip"], "text_model.")
    assert same(written["VAE:aio_vae.safetensors"], parts["vae"])
    for path in written.values():  # every part is what sdkit (and ComfyUI's loaders) take it for
        assert _ok(capsys, "inspect", str(path))["kind"] in ("unet", "text-encoder", "vae")


def test_join_takes_a_diffusers_named_transformer(tmp_path, capsys, parts):
    save_file(tiny_tensors("flux", "diffusers"), tmp_path / "d.safetensors")
    _ok(capsys, "convert", str(tmp_path / "d.safetensors"), "--to", "single-file", "-o", str(tmp_path / "s.safetensors"))
    for name in ("d", "s"):
        _ok(capsys, "join", str(tmp_path / f"{name}.safetensors"), str(parts["clip"]), str(parts["t5"]),
            str(parts["vae"]), "-o", str(tmp_path / f"aio-{name}.safetensors"))
    a, b = load_file(tmp_path / "aio-d.safetensors"), load_file(tmp_path / "aio-s.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("given, expected", [
    (["flux", "clip", "vae"], "needs T5-XXL too"),
    (["flux", "clip", "t5"], "FLUX.1 needs FLUX VAE too"),
    (["flux", "clip", "t5", "sdxl_vae"], "FLUX.1 needs a 16-channel VAE"),
    (["clip", "t5", "vae"], "join needs one diffusion model among the parts, not 0"),
    (["flux", "flux", "clip", "t5", "vae"], "join needs one diffusion model among the parts, not 2"),
    (["flux", "clip", "clip", "t5", "vae"], "a second CLIP-L"),
])
def test_join_refuses_what_does_not_make_the_model(tmp_path, capsys, parts, given, expected):
    out = tmp_path / "aio.safetensors"
    line = _refused(capsys, "join", *[str(parts[name]) for name in given], "-o", str(out))
    assert expected in line
    assert not out.exists()


def test_split_refuses_a_lone_part_and_join_a_checkpoint(tmp_path, capsys, parts):
    line = _refused(capsys, "split", str(parts["flux"]), "-o", str(tmp_path / "parts"))
    assert "not a checkpoint holding a diffusion model" in line and not (tmp_path / "parts").exists()
    line = _refused(capsys, "join", str(TOY_SD1), str(parts["clip"]), "-o", str(tmp_path / "x.safetensors"))
    assert "join takes parts" in line


def test_split_an_sd1_checkpoint_into_a1111_and_comfyui_parts(tmp_path, capsys):
    result = _ok(capsys, "split", str(TOY_SD1), "-o", str(tmp_path / "parts"))
    kinds = {part["kind"]: tmp_path / "parts" / part["path"] for part in result["parts"]}
    assert set(kinds) == {"diffusion model", "text encoder", "VAE"}
    unet = load_file(kinds["diffusion model"])
    assert any(k.startswith("input_blocks.") for k in unet) and not any(k.startswith("model.") for k in unet)
    assert any(k.startswith(("encoder.", "decoder.")) for k in load_file(kinds["VAE"]))
    for kind, path in kinds.items():
        info = _ok(capsys, "inspect", str(path))
        assert info["kind"] == {"diffusion model": "unet", "text encoder": "text-encoder", "VAE": "vae"}[kind]
