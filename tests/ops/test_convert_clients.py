"""What `sdkit convert` writes is what its clients load: transformers and ComfyUI read the
text encoders, configs hold only what the weights say (or the released model's values),
position ids are never cast, a conversion that would only copy is refused, LoRA outputs
in diffusers names warn, and --quiet is quiet."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import test_convert_support as S
from sdkit.arch.keymaps import checkpoint_from_ldm
from sdkit.arch.keymaps.stock import determined_settings
from sdkit.cli import convert_cmd  # noqa: F401  (attaches `convert` to the group)
from sdkit.cli.main import main
from sdkit.errors import SdkitError
from sdkit.io import open_model
from sdkit.ops.convert.model import ConvertOptions, convert_model

ROOT = Path(__file__).resolve().parents[2]
TOY = ROOT / "fixtures" / "toy"
POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"
ENCODERS = {"sd1": ("text_encoder",), "sd2": ("text_encoder",), "sdxl": ("text_encoder", "text_encoder_2")}

# ComfyUI (comfy/sd.py `detect_te_model`, comfy/sd1_clip.py `SDClipModel.load_sd`): a text
# encoder file is told to be CLIP by this key and loaded into a model whose weights all sit
# under `text_model.`; CLIP-G's projection is read from `text_projection.weight`
COMFY_CLIP_MARKER = "text_model.encoder.layers.0.mlp.fc1.weight"
COMFY_CLIP_PREFIXES = ("text_model.embeddings.", "text_model.encoder.layers.", "text_model.final_layer_norm.")
COMFY_PROJECTION = "text_projection.weight"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clients")
    out: dict[str, Path] = {}
    for family in ENCODERS:
        out[family] = S.write_ldm(root / f"{family}.safetensors", S.ldm_state(family))
        out[f"{family}-config"] = S.write_pipeline(family, root / f"{family}-config", weights=False)
    return out


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`sdkit ARGS` as the console script runs it: exit code, stdout, stderr."""
    code = 0
    try:
        main(list(args))
    except SystemExit as exit_info:
        code = int(exit_info.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---- text encoders of diffusers outputs ------------------------------------------------

def assert_comfyui_names(keys: set[str]) -> None:
    assert COMFY_CLIP_MARKER in keys
    strays = [k for k in keys if not k.startswith(COMFY_CLIP_PREFIXES) and k != COMFY_PROJECTION]
    assert not strays, strays[:5]


def assert_same_outputs(loaded: torch.nn.Module, original: torch.nn.Module) -> None:
    # weights memory-mapped from the file at odd offsets make BLAS sum in another order:
    # in fresh memory, like the original's, the same weights compute the same bits
    for parameter in loaded.parameters():
        parameter.data = parameter.data.clone()
    ids = torch.tensor([[0, 7, 12, 30, 1, 1]])  # start, words, end (id 1), padding
    with torch.no_grad():
        ours, theirs = loaded.eval()(ids), original(ids)
    assert torch.equal(ours.last_hidden_state, theirs.last_hidden_state)
    pooled = "text_embeds" if hasattr(theirs, "text_embeds") else "pooler_output"
    assert torch.equal(getattr(ours, pooled), getattr(theirs, pooled))


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_written_text_encoders_load_in_transformers_and_carry_comfyui_names(files, tmp_path, family):
    convert_model(files[family], tmp_path / "out",
                  ConvertOptions(to="diffusers", config_dir=str(files[f"{family}-config"])))
    for name in ENCODERS[family]:
        folder = tmp_path / "out" / name
        assert_comfyui_names(set(load_file(folder / "model.safetensors")))
        original = S.modules(family)[name]
        loaded, info = type(original).from_pretrained(folder, output_loading_info=True)
        assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
        assert_same_outputs(loaded, original)


def test_one_text_encoder_written_alone_has_the_same_names(files, tmp_path):
    for name in ENCODERS["sdxl"]:
        convert_model(files["sdxl"], tmp_path / f"{name}.safetensors",
                      ConvertOptions(to="diffusers", only=name, config_dir=str(files["sdxl-config"])))
        assert_comfyui_names(set(load_file(tmp_path / f"{name}.safetensors")))


# ---- configs: what the weights say, or the released model's --------------------------

TOY_MODELS = ("sd1", "sd1-b", "sdxl")
# sizes every derived config must hold (and the committed toy config agrees on)
MUST_DETERMINE = {
    "unet": ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types",
             "up_block_types", "transformer_layers_per_block", "cross_attention_dim", "use_linear_projection"),
    "vae": ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels"),
    "text_encoder": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "max_position_embeddings"),
    "text_encoder_2": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "projection_dim"),
}
# the toy models' settings that no tensor shape carries, named by a refusal
UNSAID = ("attention_head_dim", "norm_num_groups", "sample_size", "scaling_factor", "num_attention_heads",
          "hidden_act")


def toy_file(model: str) -> Path:
    return TOY / model / f"toy-{model}.safetensors"


def toy_built(model: str) -> bool:
    return toy_file(model).is_file() and (TOY / model / "diffusers").is_dir()


@pytest.mark.parametrize("model", TOY_MODELS)
def test_toy_configs_read_off_the_weights_agree_with_the_committed_ones(model):
    if not toy_built(model):
        pytest.skip("toy fixtures not built (fixtures/toy/build.py)")
    with open_model(toy_file(model)) as file:
        derived = checkpoint_from_ldm({name: info.shape for name, info in file.infos.items()}).configs
    assert set(derived) == {p.name for p in (TOY / model / "diffusers").iterdir() if (p / "config.json").is_file()}
    for component, config in derived.items():
        committed = json.loads((TOY / model / "diffusers" / component / "config.json").read_text())
        determined = determined_settings(component, config)
        assert set(MUST_DETERMINE[component]) <= set(determined)
        wrong = {name: (value, committed.get(name)) for name, value in determined.items()
                 if json.dumps(value) != json.dumps(committed.get(name))}
        assert not wrong, (component, wrong)


@pytest.mark.parametrize("model", TOY_MODELS)
def test_toy_single_file_to_diffusers_without_config_names_what_the_weights_do_not_say(tmp_path, model, capsys):
    if not toy_built(model):
        pytest.skip("toy fixtures not built (fixtures/toy/build.py)")
    with pytest.raises(SdkitError) as caught:
        convert_model(toy_file(model), tmp_path / "out", ConvertOptions(to="diffusers"))
    message = str(caught.value)
    assert all(name in message for name in UNSAID) and "--config" in message
    assert "block_out_channels" in message  # the size that is not the released model's
    assert list(tmp_path.iterdir()) == []
    code, out, err = run_main(capsys, "convert", str(toy_file(model)), "--to", "diffusers", "--only", "vae",
                              "-o", str(tmp_path / "vae"))
    assert code == 1 and err.startswith("sdkit: error: ") and len(err.strip().splitlines()) == 1
    assert "scaling_factor" in err and "attention_head_dim" not in err  # only the part written
    assert list(tmp_path.iterdir()) == []


def test_a_config_for_every_written_part_comes_from_config_or_the_weights(files, tmp_path):
    """A partial --config: the parts it lacks are derived, and refused when not stock."""
    config = files["sd1-config"]
    partial = tmp_path / "partial"
    for part in ("unet", "vae", "tokenizer", "scheduler"):
        (partial / part).mkdir(parents=True)
        for item in (config / part).iterdir():
            (partial / part / item.name).write_bytes(item.read_bytes())
    with pytest.raises(SdkitError, match="text_encoder num_attention_heads, hidden_act"):
        convert_model(files["sd1"], tmp_path / "out", ConvertOptions(to="diffusers", config_dir=str(partial)))
    # a component written as a bare weight file has no config to guess
    convert_model(files["sd1"], tmp_path / "vae.safetensors", ConvertOptions(to="diffusers", only="vae"))


# ---- position ids and conversions that change nothing ----------------------------------

def broken_ids(kind: str, count: int) -> torch.Tensor:
    ramp = torch.arange(count).view(1, -1)
    if kind == "F32 integers":  # right values, a float type (a merge averaged them)
        return ramp.float()
    drift = torch.linspace(0, 0.3, count).view(1, -1)  # values off the integers
    return (ramp + drift).to(torch.float16 if kind == "F16 drifted" else torch.float32)


@pytest.mark.parametrize("kind", ["F32 integers", "F32 drifted", "F16 drifted"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_broken_position_ids_are_kept_as_they_are_when_casting(tmp_path, kind, dtype):
    tensors = S.ldm_state("sd1")
    ids = broken_ids(kind, tensors[POSITION_IDS].numel())
    tensors.update({POSITION_IDS: ids, "model_ema.decay": torch.tensor(0.99)})
    source = S.write_ldm(tmp_path / "in.safetensors", tensors)
    result = convert_model(source, tmp_path / "out.safetensors", ConvertOptions(dtype=dtype, prune=True))
    written = load_file(tmp_path / "out.safetensors")
    assert written[POSITION_IDS].dtype == ids.dtype and torch.equal(written[POSITION_IDS], ids)
    assert POSITION_IDS in result.broken_position_ids and POSITION_IDS not in result.precision.cast
    assert any("kept as they are" in note for note in result.notes)
    assert written["model.diffusion_model.out.2.weight"].dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    fixed = convert_model(source, tmp_path / "fixed.safetensors", ConvertOptions(dtype=dtype, fix_clip=True))
    out = load_file(tmp_path / "fixed.safetensors")[POSITION_IDS]
    assert POSITION_IDS in fixed.fixed_position_ids and out.dtype == torch.int64
    assert torch.equal(out, torch.arange(out.numel()).view(out.shape))


def half_checkpoint(dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in S.ldm_state("sd1").items()}


def half_lora() -> dict[str, torch.Tensor]:
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    return {f"{name}.lora_down.weight": torch.randn(4, 320).half(), f"{name}.lora_up.weight": torch.randn(320, 4).half(),
            f"{name}.alpha": torch.tensor(2.0).half()}


def vae_alone() -> dict[str, torch.Tensor]:
    head = "first_stage_model."
    return {k[len(head):]: v for k, v in half_checkpoint().items() if k.startswith(head)}


COPIES = {  # name: (tensors, options that change nothing in them, a hint the refusal gives)
    "fp16 checkpoint, --dtype fp16": (half_checkpoint, dict(dtype="fp16"), "already fp16"),
    "bf16 checkpoint, --dtype bf16": (lambda: half_checkpoint(torch.bfloat16), dict(dtype="bf16"), "already bf16"),
    "clean fp16 checkpoint, --prune": (half_checkpoint, dict(dtype="fp16", prune=True), "nothing to prune"),
    "good position ids, --fix-clip": (half_checkpoint, dict(dtype="fp16", fix_clip=True), "not broken"),
    "fp16 VAE alone, --dtype fp16": (vae_alone, dict(dtype="fp16"), "already fp16"),
    "fp16 LoRA, --dtype fp16": (half_lora, dict(dtype="fp16"), "already fp16"),
    "fp16 embedding, --dtype fp16": (lambda: {"emb_params": torch.randn(2, 768).half()}, dict(dtype="fp16"),
                                     "already fp16"),
    "F32 position ids, --dtype fp16": (lambda: {**half_checkpoint(), POSITION_IDS: broken_ids("F32 drifted", 16)},
                                       dict(dtype="fp16"), "--fix-clip"),
}


@pytest.mark.parametrize("case", COPIES)
def test_a_conversion_that_would_only_copy_is_refused(tmp_path, case, capsys):
    make, options, hint = COPIES[case]
    source = S.write_ldm(tmp_path / "in.safetensors", make())
    with pytest.raises(SdkitError, match="nothing would change") as caught:
        convert_model(source, tmp_path / "out.safetensors", ConvertOptions(**options))
    assert hint in str(caught.value)
    flags = [f"--{name.replace('_', '-')}" if value is True else f"--{name}={value}" for name, value in options.items()]
    code, out, err = run_main(capsys, "convert", str(source), "-o", str(tmp_path / "out.safetensors"), *flags)
    assert code == 1 and err.startswith("sdkit: error: ") and "nothing would change" in err
    assert len(err.strip().splitlines()) == 1 and sorted(tmp_path.iterdir()) == [source]


def test_the_same_dtype_with_something_else_to_do_is_written(tmp_path):
    half = half_checkpoint()
    junk = S.write_ldm(tmp_path / "junk.safetensors", {**half, "alphas_cumprod": torch.rand(1000)})
    pruned = convert_model(junk, tmp_path / "pruned.safetensors", ConvertOptions(dtype="fp16", prune=True))
    assert "alphas_cumprod" not in load_file(tmp_path / "pruned.safetensors") and pruned.prune.dropped
    pickle = tmp_path / "model.ckpt"
    torch.save({"state_dict": half}, pickle)
    convert_model(pickle, tmp_path / "from-pickle.safetensors", ConvertOptions(dtype="fp16"))
    S.assert_same(load_file(tmp_path / "from-pickle.safetensors"), half)
    broken = S.write_ldm(tmp_path / "broken.safetensors", {**half, POSITION_IDS: broken_ids("F32 drifted", 16)})
    fixed = convert_model(broken, tmp_path / "fixed.safetensors", ConvertOptions(dtype="fp16", fix_clip=True))
    assert POSITION_IDS in fixed.fixed_position_ids


# ---- LoRA names the WebUIs do not load, and --quiet ------------------------------------

def kohya_lora(family: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A kohya LoRA of the released model's module names and sizes (one module per part)."""
    if family == "sd1":
        modules = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (320, 320),
                   "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (768, 768)}
        return _lora(modules), {"ss_base_model_version": "sd_v1"}
    modules = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (640, 640),
               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
               "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (1280, 1280)}
    return _lora(modules), {"ss_base_model_version": "sdxl_base_v1-0"}


def _lora(modules: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    tensors = {}
    for name, (out_features, in_features) in modules.items():
        tensors[f"{name}.lora_down.weight"] = torch.randn(4, in_features)
        tensors[f"{name}.lora_up.weight"] = torch.randn(out_features, 4)
        tensors[f"{name}.alpha"] = torch.tensor(2.0)
    return tensors


def comfyui_unet_names(path: str) -> set[str]:
    """The names ComfyUI's `model_lora_keys_unet` looks up for a diffusers UNet layer's LoRA:
    bare or under `unet.`, attention projections spelled `processor.to_*` (`to_out.0` as
    `processor.to_out`)."""
    if path.endswith(".to_out.0"):
        name = path.removesuffix(".to_out.0") + ".processor.to_out"
    else:
        name = path.replace(".to_", ".processor.to_")
    return {name, "unet." + name}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_lora_in_diffusers_names_warns_that_comfyui_and_a1111_miss_it(tmp_path, family, capsys):
    tensors, meta = kohya_lora(family)
    save_file(tensors, tmp_path / "kohya.safetensors", metadata=meta)
    result = convert_model(tmp_path / "kohya.safetensors", tmp_path / "peft.safetensors", ConvertOptions(to="diffusers"))
    assert len(result.warnings) == 1 and "kohya" in result.warnings[0] and "--to single-file" in result.warnings[0]
    written = {key.rsplit(".lora_", 1)[0] for key in load_file(tmp_path / "peft.safetensors")}
    unet = [name.removeprefix("unet.") for name in written if name.startswith("unet.")]
    assert unet and all("unet." + path not in comfyui_unet_names(path) for path in unet)
    back = convert_model(tmp_path / "peft.safetensors", tmp_path / "back.safetensors",
                         ConvertOptions(to="single-file"))
    assert back.warnings == []
    args = ("convert", str(tmp_path / "kohya.safetensors"), "--to", "diffusers")
    code, out, err = run_main(capsys, *args, "-o", str(tmp_path / "again.safetensors"))
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert code == 0 and len(warnings) == 1 and "ComfyUI" in warnings[0] and "--to single-file" in warnings[0]
    code, out, err = run_main(capsys, "--quiet", *args, "-o", str(tmp_path / "quiet.safetensors"))
    assert code == 0 and out == "" and err == ""  # --quiet: nothing on success, as for every writer


def test_quiet_convert_prints_nothing(files, tmp_path, capsys):
    args = ("convert", str(files["sd1"]), "--to", "diffusers", "--config", str(files["sd1-config"]))
    code, out, err = run_main(capsys, "--quiet", *args, "-o", str(tmp_path / "quiet"))
    assert code == 0 and out == "" and err == "" and (tmp_path / "quiet" / "model_index.json").is_file()
    code, out, err = run_main(capsys, *args, "-o", str(tmp_path / "chatty"))
    assert code == 0 and "wrote" in err
    code, out, err = run_main(capsys, "convert", "--help")
    assert "ComfyUI" in " ".join(out.split())
