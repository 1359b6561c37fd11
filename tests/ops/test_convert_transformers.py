"""`sdkit convert --to diffusers | single-file` on lone transformer diffusion models.

Tiny random-weight models of each family with a key map (the diffusers test configs): the
diffusers folder sdkit writes loads in the family's diffusers class with no missing or
unexpected keys, and the way back gives the input's tensors bit for bit (single-file
tensors diffusers has no place for come back as the key map makes them). The released-size
comparison with diffusers' own converters is tests/arch/test_transformer_keymaps.py.
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
from released import TINY, tiny_tensors  # noqa: E402

from sdkit.arch.families import FAMILIES  # noqa: E402
from sdkit.arch.keymaps.transformer import transformer_links  # noqa: E402
from sdkit.arch.model_detect import single_file_parts  # noqa: E402
from sdkit.io import open_model  # noqa: E402

MAPPED = [name for name in TINY if FAMILIES[name].key_map is not None]


def _config_dir(folder: Path, family: str) -> Path:
    class_name, config, _ = TINY[family]
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "config.json").write_text(json.dumps({"_class_name": class_name, **config}))
    return folder


def _load_diffusers(folder: Path, family: str):
    import diffusers

    class_name = TINY[family][0]
    model = getattr(diffusers, class_name).from_pretrained(folder)
    return model.state_dict()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def _as_made(family: str, path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` (the file at `path`) with the single-file tensors diffusers lacks as the
    map makes them again."""
    with open_model(path) as model:
        dims = single_file_parts(model).denoiser.dims
    made = dict(tensors)
    for link in transformer_links(FAMILIES[family].key_map, dims):
        if link.kind == "unused" and link.ldm[0] in made:
            made[link.ldm[0]] = torch.full_like(made[link.ldm[0]], link.arg[1])
    return made


@pytest.mark.parametrize("family", MAPPED)
def test_single_file_to_diffusers_folder_and_back(tmp_path, capsys, family):
    original = tiny_tensors(family, "ldm")
    source = tmp_path / "tiny.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in original.items()}, source)
    config = _config_dir(tmp_path / "config", family)

    code, _out, err = run_sdkit(capsys, "convert", str(source), "--to", "diffusers", "-o", str(tmp_path / "d"),
                                "--config", str(config))
    assert code == 0, err
    loaded = _load_diffusers(tmp_path / "d", family)  # strict: no missing or unexpected key
    written = load_file(tmp_path / "d" / "diffusion_pytorch_model.safetensors")
    assert _same(loaded, written)

    code, _out, err = run_sdkit(capsys, "convert", str(tmp_path / "d"), "--to", "single-file",
                                "-o", str(tmp_path / "back.safetensors"))
    assert code == 0, err
    assert _same(load_file(tmp_path / "back.safetensors"), _as_made(family, source, original))


@pytest.mark.parametrize("family", MAPPED)
def test_diffusers_weights_become_single_file_weights(tmp_path, capsys, family):
    state = tiny_tensors(family, "diffusers")
    save_file(state, tmp_path / "d.safetensors")
    code, _out, err = run_sdkit(capsys, "convert", str(tmp_path / "d.safetensors"), "--to", "single-file",
                                "-o", str(tmp_path / "s.safetensors"))
    assert code == 0, err
    single = load_file(tmp_path / "s.safetensors")
    assert {k: tuple(v.shape) for k, v in single.items()} == TINY[family][2](TINY[family][1])
    code, _out, err = run_sdkit(capsys, "convert", str(tmp_path / "s.safetensors"), "--to", "diffusers",
                                "-o", str(tmp_path / "again.safetensors"))
    assert code == 0, err
    assert _same(load_file(tmp_path / "again.safetensors"), state)


def test_layout_and_precision_change_together(tmp_path, capsys):
    original = tiny_tensors("flux", "ldm")
    save_file(original, tmp_path / "tiny.safetensors")
    code, _out, err = run_sdkit(capsys, "convert", str(tmp_path / "tiny.safetensors"), "--to", "diffusers",
                                "--dtype", "bf16", "-o", str(tmp_path / "d.safetensors"))
    assert code == 0, err
    written = load_file(tmp_path / "d.safetensors")
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    assert torch.equal(written["x_embedder.weight"], original["img_in.weight"].to(torch.bfloat16))


def test_plain_fp8_converts_and_keeps_its_bytes(tmp_path, capsys):
    original = {k: v.to(torch.float8_e4m3fn) for k, v in tiny_tensors("flux", "ldm").items()}
    save_file(original, tmp_path / "fp8.safetensors")
    assert run_sdkit(capsys, "convert", str(tmp_path / "fp8.safetensors"), "--to", "diffusers",
                     "-o", str(tmp_path / "d.safetensors"))[0] == 0
    assert run_sdkit(capsys, "convert", str(tmp_path / "d.safetensors"), "--to", "single-file",
                     "-o", str(tmp_path / "back.safetensors"))[0] == 0
    back = load_file(tmp_path / "back.safetensors")
    assert sorted(back) == sorted(original)
    assert all(torch.equal(back[k].view(torch.uint8), original[k].view(torch.uint8)) for k in original)


def _refused(capsys, *args: str) -> str:
    code, _out, err = run_sdkit(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("sdkit: error: "), err
    return lines[0]


def test_other_sizes_without_a_config_are_refused(tmp_path, capsys):
    save_file(tiny_tensors("flux", "ldm"), tmp_path / "tiny.safetensors")
    line = _refused(capsys, "convert", str(tmp_path / "tiny.safetensors"), "--to", "diffusers",
                    "-o", str(tmp_path / "d"))
    assert "match no FLUX.1 release" in line and "axes_dims_rope" in line and "--config" in line
    assert not (tmp_path / "d").exists()


def test_a_config_contradicting_the_weights_is_refused(tmp_path, capsys):
    save_file(tiny_tensors("flux", "ldm"), tmp_path / "tiny.safetensors")
    config = _config_dir(tmp_path / "config", "flux")
    path = config / "transformer" / "config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), num_layers=3)))
    line = _refused(capsys, "convert", str(tmp_path / "tiny.safetensors"), "--to", "diffusers",
                    "-o", str(tmp_path / "d"), "--config", str(config))
    assert "num_layers = 3, but the weights have 1" in line
    assert not (tmp_path / "d").exists()


def _scaled_fp8(path: Path) -> dict[str, torch.Tensor]:
    """A tiny FLUX.1 in ComfyUI's scaled fp8: fp8 matrices, one float32 scale each (their
    values differ, so a scale applied to the wrong weight shows), the marker key."""
    tensors = {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in tiny_tensors("flux", "ldm").items()}
    matrices = [k for k, v in tensors.items() if v.dtype == torch.float8_e4m3fn]
    tensors.update({k[:-len("weight")] + "scale_weight": torch.tensor(0.25 * (i + 1)) for i, k in enumerate(matrices)})
    tensors[matrices[0][:-len("weight")] + "scale_input"] = torch.tensor(1.0)
    tensors["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    save_file(tensors, path)
    return tensors


def _values(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What ComfyUI computes with: each scaled weight times its scale, in bf16."""
    plain = {}
    for name, tensor in tensors.items():
        if name.endswith(("scale_weight", "scale_input")) or name == "scaled_fp8":
            continue
        scale = tensors.get(name[:-len("weight")] + "scale_weight", torch.tensor(1.0))
        plain[name] = (tensor.to(torch.float32) * scale).to(torch.bfloat16)
    return plain


def test_scaled_fp8_casts_to_its_scaled_values(tmp_path, capsys):
    scaled = _scaled_fp8(tmp_path / "scaled.safetensors")
    code, out, err = run_sdkit(capsys, "convert", str(tmp_path / "scaled.safetensors"), "--dtype", "bf16",
                               "-o", str(tmp_path / "plain.safetensors"))
    assert code == 0, err
    assert "multiplied by their scales" in out + err
    assert _same(load_file(tmp_path / "plain.safetensors"), _values(scaled))
    assert run_sdkit(capsys, "inspect", str(tmp_path / "plain.safetensors"))[0] == 0


def test_scaled_fp8_changes_layout_with_a_cast(tmp_path, capsys):
    scaled = _scaled_fp8(tmp_path / "scaled.safetensors")
    code, _out, err = run_sdkit(capsys, "convert", str(tmp_path / "scaled.safetensors"), "--to", "diffusers",
                                "--dtype", "bf16", "-o", str(tmp_path / "d.safetensors"))
    assert code == 0, err
    written = load_file(tmp_path / "d.safetensors")
    assert torch.equal(written["transformer_blocks.0.attn.to_out.0.weight"],
                       _values(scaled)["double_blocks.0.img_attn.proj.weight"])


def test_scaled_fp8_layout_without_a_cast_is_refused(tmp_path, capsys):
    _scaled_fp8(tmp_path / "scaled.safetensors")
    line = _refused(capsys, "convert", str(tmp_path / "scaled.safetensors"), "--to", "diffusers",
                    "-o", str(tmp_path / "d.safetensors"))
    assert "is scaled fp8" in line and "--dtype bf16" in line
    assert not (tmp_path / "d.safetensors").exists()


def test_modelspec_names_the_codebase_whose_names_the_file_uses(tmp_path, capsys):
    from safetensors import safe_open

    save_file(tiny_tensors("flux", "diffusers"), tmp_path / "d.safetensors")
    for target, expected in (("single-file", "https://github.com/black-forest-labs/flux"), ("diffusers", "diffusers")):
        output = tmp_path / f"{target}.safetensors"
        code, _out, err = run_sdkit(capsys, "convert", str(tmp_path / "d.safetensors"), "--to", target,
                                    "--dtype", "bf16", "-o", str(output))
        assert code == 0, err
        with safe_open(output, "pt") as handle:
            assert handle.metadata()["modelspec.implementation"] == expected
