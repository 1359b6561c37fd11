"""FLUX.1 LoRA training speed: sdkit's trainer against diffusers' `train_dreambooth_lora_flux.py`
at equal settings, as optimizer steps per second.

    python tests/bench/bench_flux_lora_train.py --device cuda --model /models/FLUX.1-dev \\
        --diffusers-script ~/diffusers/examples/dreambooth/train_dreambooth_lora_flux.py \\
        --resolution 512 --rank 16 --steps 20 60

Without `--model` it runs toy-flux (fixtures/toy/flux/diffusers) on the CPU. The diffusers
script is not part of the diffusers package: give a copy of it from the diffusers
repository of the installed version (its requirements_flux.txt lists what it imports).

Settings shared by both runs: the same pictures (toy concept pictures scaled to the
resolution, captioned "a photo of sks": the script's `--instance_prompt`, sdkit's
`--trigger`), batch size, steps, learning rate (constant, no warm-up), AdamW with weight
decay 1e-2 and gradient clipping at 1.0, rank with alpha = rank, latents cached, the T5
context length of the model's tokenizer (at most 512), uniform noise levels (the script's
`--weighting_scheme none`), mixed precision bf16 on CUDA (fp32 / "no" on the CPU),
gradient checkpointing when asked. The LoRA targets are the same layers: sdkit trains
kohya's set (every linear layer of the double and single blocks); the script is given
them as `--lora_layers` (its suffix match also takes the final `proj_out`, one layer more).

Each trainer runs twice, for the two step counts, as a whole process; steps per second is
(N2 - N1) / (wall2 - wall1), so loading, latent caching and saving cancel out and the two
programs are timed by the same clock. Nothing is downloaded: both read the local model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOY = ROOT / "fixtures" / "toy" / "flux" / "diffusers"
PROMPT = "a photo of sks"
# kohya's FLUX.1 targets (networks/lora_flux.py) in diffusers names, for --lora_layers
LORA_LAYERS = ("attn.to_q,attn.to_k,attn.to_v,attn.to_out.0,attn.add_q_proj,attn.add_k_proj,attn.add_v_proj,"
               "attn.to_add_out,ff.net.0.proj,ff.net.2,ff_context.net.0.proj,ff_context.net.2,norm1.linear,"
               "norm1_context.linear,proj_mlp,proj_out,norm.linear")


def write_pictures(folder: Path, resolution: int, count: int) -> Path:
    """Toy concept pictures at `resolution`, images only (the script opens every file)."""
    from sdkit.runtime.toyscore import write_concept_pictures

    with tempfile.TemporaryDirectory() as scratch:
        write_concept_pictures(Path(scratch), "red", "square", PROMPT, count)
        folder.mkdir(parents=True, exist_ok=True)
        from PIL import Image

        for picture in sorted(Path(scratch).glob("*.png")):
            Image.open(picture).resize((resolution, resolution), Image.NEAREST).save(folder / picture.name)
    return folder


def text_length(model: Path) -> int:
    config = json.loads((model / "tokenizer_2" / "tokenizer_config.json").read_text())
    return min(512, int(config.get("model_max_length") or 512))


def sdkit_command(args: argparse.Namespace, data: Path, output: Path, steps: int) -> list[str]:
    command = [sys.executable, "-m", "sdkit", "--quiet", "train", "lora", "--base", str(args.model),
               "--data", str(data), "-o", str(output), "--trigger", PROMPT, "--steps", str(steps),
               "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--rank", str(args.rank),
               "--resolution", str(args.resolution), "--no-buckets", "--device", args.device,
               "--precision", "bf16" if args.device == "cuda" else "fp32", "--seed", "0", "--force"]
    return command + (["--gradient-checkpointing"] if args.gradient_checkpointing else [])


def diffusers_command(args: argparse.Namespace, data: Path, output: Path, steps: int) -> list[str]:
    command = [sys.executable, str(args.diffusers_script), "--pretrained_model_name_or_path", str(args.model),
               "--instance_data_dir", str(data), "--instance_prompt", PROMPT, "--output_dir", str(output),
               "--resolution", str(args.resolution), "--train_batch_size", str(args.batch_size),
               "--max_train_steps", str(steps), "--learning_rate", str(args.lr), "--lr_scheduler", "constant",
               "--lr_warmup_steps", "0", "--adam_weight_decay", "1e-2", "--max_grad_norm", "1.0",
               "--rank", str(args.rank), "--lora_alpha", str(args.rank), "--lora_layers", LORA_LAYERS,
               "--weighting_scheme", "none", "--cache_latents", "--max_sequence_length", str(text_length(args.model)),
               "--mixed_precision", "bf16" if args.device == "cuda" else "no", "--seed", "0",
               "--checkpointing_steps", str(10 * steps), "--dataloader_num_workers", "0"]
    return command + (["--gradient_checkpointing"] if args.gradient_checkpointing else [])


def wall_time(command: list[str], device: str, extra: dict[str, str]) -> float:
    environment = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **extra)
    if device == "cpu":
        environment["CUDA_VISIBLE_DEVICES"] = ""
    started = time.perf_counter()
    done = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{command[1]} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return elapsed


def steps_per_second(make: object, args: argparse.Namespace, data: Path, scratch: Path, name: str) -> dict:
    low, high = args.steps
    walls = {}
    for steps in (low, high):
        output = scratch / f"{name}-{steps}" / ("sks.safetensors" if name == "sdkit" else "")
        output.parent.mkdir(parents=True, exist_ok=True)
        extra = dict(item.split("=", 1) for item in args.script_env) if name == "diffusers" else {}
        walls[steps] = wall_time(make(args, data, output, steps), args.device, extra)
    return {"walls_s": {str(k): round(v, 2) for k, v in walls.items()},
            "steps_per_second": round((high - low) / (walls[high] - walls[low]), 3)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", type=Path, default=TOY, help="a FLUX.1 diffusers folder (default: toy-flux)")
    parser.add_argument("--diffusers-script", type=Path, help="train_dreambooth_lora_flux.py (skipped without)")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--steps", type=int, nargs=2, default=(10, 40), metavar=("N1", "N2"))
    parser.add_argument("--pictures", type=int, default=8)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--script-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment of the diffusers script's runs only (repeatable)")
    args = parser.parse_args(argv)
    if args.steps[1] <= args.steps[0]:
        parser.error("--steps N1 N2 needs N2 > N1")
    report: dict = {"device": args.device, "model": str(args.model), "resolution": args.resolution,
                    "batch_size": args.batch_size, "rank": args.rank, "steps": list(args.steps)}
    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)
        data = write_pictures(scratch / "data", args.resolution, args.pictures)
        report["sdkit"] = steps_per_second(sdkit_command, args, data, scratch, "sdkit")
        if args.diffusers_script:
            report["diffusers"] = steps_per_second(diffusers_command, args, data, scratch, "diffusers")
            report["ratio_sdkit_to_diffusers"] = round(report["sdkit"]["steps_per_second"]
                                                       / report["diffusers"]["steps_per_second"], 3)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
