"""Single-file ⇄ diffusers key maps of the transformer families, against diffusers' converters.

Released sizes: every tensor of a released model's single-file listing is replaced by a
1-D ramp of its rows (distinct per tensor), so diffusers' converter — which cuts fused
tensors by rows, at the released widths it assumes — and sdkit's plan can be compared
value for value at full size in a few megabytes. Tiny sizes: the diffusers test configs
with random weights, loaded into the diffusers class itself. Both directions, round trips
bit for bit, except the single-file tensors diffusers has no place for, which come back
as the key map makes them. Families whose single files already use diffusers' names
(HiDream, Qwen-Image) go through the same tests with an identity map; where diffusers has
no single-file converter (Qwen-Image), the expected conversion is that identity.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fixtures" / "families"))

from released import (peer_converters, RELEASES, TINY, diffusers_shapes, single_file_shapes, tiny_tensors,  # noqa: E402
                      typed, write_header_only)

from sdkit.arch.families import FAMILIES  # noqa: E402
from sdkit.arch.fingerprint import match_release  # noqa: E402
from sdkit.arch.keymaps import convert_state_dict  # noqa: E402
from sdkit.arch.keymaps.transformer import diffusers_config, transformer_links, transformer_plan  # noqa: E402
from sdkit.arch.model_detect import single_file_parts  # noqa: E402
from sdkit.errors import SdkitError  # noqa: E402
from sdkit.io import open_model  # noqa: E402

UNET = "model.diffusion_model."


# families whose single files diffusers has no converter for because they already carry
# diffusers' names: the expected conversion keeps every name
NO_CONVERTER = {"qwen-image"}


def _peer_conversion(family: str, checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if family in NO_CONVERTER:
        return dict(checkpoint)
    return peer_converters()[family](checkpoint)


def _single_file_convention(family) -> str:
    """The convention a family's single files are reported in: diffusers' where they
    already use its names."""
    return "diffusers" if family.key_map.same_names else "ldm"


def _as_made(family, dims: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` with the single-file tensors diffusers lacks as the map makes them again."""
    made = dict(tensors)
    for link in transformer_links(family.key_map, dims):
        if link.kind == "unused" and link.ldm[0] in made:
            shape, value = link.arg
            made[link.ldm[0]] = torch.full(shape, value, dtype=made[link.ldm[0]].dtype)
    return made


def _mapped(name: str) -> bool:
    model = RELEASES[name]
    return FAMILIES[model.family].key_map is not None and model.diffusers_class is not None


def _denoiser(path: Path):
    with open_model(path) as model:
        parts = single_file_parts(model)
    assert parts.denoiser is not None and parts.denoiser.family is not None
    return parts.denoiser


def _probed(tmp_path: Path, shapes: dict, name: str, prefix: str = ""):
    return _denoiser(write_header_only(tmp_path / name, typed(shapes, "BF16", prefix)))


def _row_ramps(shapes: dict) -> dict[str, torch.Tensor]:
    """Per tensor, its row numbers offset by the tensor's position: any row moved to the
    wrong place or tensor shows."""
    return {name: torch.arange(shape[0], dtype=torch.int64) + index * 10_000_000
            for index, (name, shape) in enumerate(shapes.items())}


def _assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    wrong = [name for name in expected if not torch.equal(got[name], expected[name])]
    assert not wrong, f"{len(wrong)} tensors differ, e.g. {wrong[:3]}"


@pytest.mark.parametrize("release", [name for name in RELEASES if _mapped(name)])
@pytest.mark.parametrize("prefix", ["", UNET])
def test_released_single_file_converts_as_diffusers_does(tmp_path, release, prefix):
    model = RELEASES[release]
    family = FAMILIES[model.family]
    listing = single_file_shapes(model)
    facts = _probed(tmp_path, listing, "single.safetensors", prefix)
    assert (facts.family, facts.convention) == (family.name, model.single_file_convention)
    assert model.single_file_convention == _single_file_convention(family)
    ramps = _row_ramps(listing)
    # the peer gets the bare names: diffusers' Lumina 2 converter drops `norm_final` before
    # it strips the checkpoint prefix, and fails on it under the prefix
    expected = _peer_conversion(family.name, dict(ramps))
    plan = transformer_plan(family, facts.dims, "ldm_to_diffusers", [prefix + n for n in ramps], prefix)
    got = convert_state_dict(plan, {prefix + name: t for name, t in ramps.items()})
    _assert_same(got, expected)
    assert {name: t.shape[0] for name, t in got.items()} == \
        {name: shape[0] for name, shape in diffusers_shapes(model).items()}

    # and back: the diffusers file's own measurements give the same sizes and the same file
    back_facts = _probed(tmp_path, diffusers_shapes(model), "diffusers.safetensors")
    assert back_facts.convention == "diffusers"
    back = convert_state_dict(transformer_plan(family, back_facts.dims, "diffusers_to_ldm", got), got)
    _assert_same(back, _as_made(family, facts.dims, ramps))


@pytest.mark.parametrize("family_name", [name for name in TINY if FAMILIES[name].key_map is not None])
def test_tiny_diffusers_model_round_trips_through_the_single_file(tmp_path, family_name):
    import diffusers
    from safetensors.torch import save_file

    family = FAMILIES[family_name]
    class_name, config, _ = TINY[family_name]
    state = tiny_tensors(family_name, "diffusers")
    save_file(state, tmp_path / "diffusers.safetensors")
    facts = _denoiser(tmp_path / "diffusers.safetensors")
    single = convert_state_dict(transformer_plan(family, facts.dims, "diffusers_to_ldm", state), state)
    save_file(single, tmp_path / "single.safetensors")
    single_facts = _denoiser(tmp_path / "single.safetensors")
    assert single_facts.convention == _single_file_convention(family) and single_facts.dims == facts.dims
    assert {name: tuple(t.shape) for name, t in single.items()} == TINY[family_name][2](config)

    again = convert_state_dict(transformer_plan(family, single_facts.dims, "ldm_to_diffusers", single), single)
    _assert_same(again, state)
    getattr(diffusers, class_name)(**config).load_state_dict(again, strict=True)


def _configured(name: str) -> bool:
    model = RELEASES[name]
    return FAMILIES[model.family].diffusers_model is not None and model.diffusers_class is not None


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("release", [name for name in RELEASES if _configured(name)])
def test_released_config_from_the_weights_builds_the_released_model(tmp_path, release):
    """The config sdkit writes for a released model's diffusers weights (what the weights
    show, plus the release they match) builds the diffusers class with exactly the
    released keys and shapes, and agrees with the released config.json."""
    import diffusers

    model = RELEASES[release]
    family = FAMILIES[model.family]
    expected = diffusers_shapes(model)
    facts = _denoiser(write_header_only(tmp_path / "d.safetensors", typed(expected, model.dtype), model.metadata))
    match = match_release(family, facts.dims, facts.flags, model.metadata.get("modelspec.architecture", ""))
    assert match.exact and match.release is not None and match.release.name == release
    config = diffusers_config(family, facts.dims, facts.flags, match.release, match.exact)
    assert config.pop("_class_name") == model.diffusers_class
    assert {key: _plain(config[key]) for key in model.config} == {k: _plain(v) for k, v in model.config.items()}
    with torch.device("meta"):
        built = getattr(diffusers, model.diffusers_class)(**config)
    assert {name: tuple(t.shape) for name, t in built.state_dict().items()} == expected


def test_a_key_the_map_has_no_place_for_is_refused(tmp_path):
    model = RELEASES["FLUX.1-dev"]
    listing = dict(single_file_shapes(model), **{"double_blocks.0.img_attn.extra.weight": (4,)})
    facts = _probed(tmp_path, single_file_shapes(model), "single.safetensors")
    with pytest.raises(SdkitError, match=r"FLUX.1 transformer: 1 keys have no place.*img_attn.extra"):
        transformer_plan(FAMILIES["flux"], facts.dims, "ldm_to_diffusers", listing)


def test_a_fused_tensor_missing_a_part_is_refused(tmp_path):
    model = RELEASES["FLUX.1-schnell"]
    facts = _probed(tmp_path, diffusers_shapes(model), "diffusers.safetensors")
    keys = [name for name in diffusers_shapes(model) if name != "transformer_blocks.3.attn.to_k.weight"]
    with pytest.raises(SdkitError, match=r"transformer_blocks.3.attn.to_k.weight is missing"):
        transformer_plan(FAMILIES["flux"], facts.dims, "diffusers_to_ldm", keys)
