"""Pictures drawn during training: DreamBooth's class pictures and the previews.

Both use sdkit's sampler (`sdkit.runtime.sample.sampler.Sampler`) on the model being trained,
with DDIM (deterministic for a seed) at the training resolution. Class pictures are
drawn by the base model before training starts, from `--class-prompt` at seeds 0, 1, ...;
pictures already in the class folder count, so a second run reuses them. Previews are
drawn every `--preview-every` steps from the current weights with the same seeds each
time, so the series shows what training changes; each PNG carries its parameters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from sdkit.runtime.pipeline import LoadedModel
from sdkit.runtime.sample.sampler import Sampler, Settings
from sdkit.runtime.sample.png import save_png
from sdkit.runtime.train.data import image_files

SCHEDULER = "ddim"
CFG = 7.0

Progress = Callable[[int, int], None]


def sampling_settings(size: int, steps: int, seed: int) -> Settings:
    return Settings(steps=steps, cfg=CFG, seed=seed, width=size, height=size, scheduler=SCHEDULER)


def ensure_class_images(model: LoadedModel, prompt: str, folder: Path, count: int, size: int, steps: int,
                        progress: Progress | None = None) -> list[Path]:
    """`count` class pictures in `folder`: the ones there, plus new ones drawn from `prompt`."""
    folder.mkdir(parents=True, exist_ok=True)
    existing = image_files(folder)
    missing = count - len(existing)
    if missing > 0:
        sampler = Sampler(model)
        plan = sampler.plan_prompt(prompt)
        taken = {path.name for path in existing}
        seed = 0
        for made in range(missing):
            while f"class-{seed:05d}.png" in taken:
                seed += 1
            sample = sampler.generate(plan, sampling_settings(size, steps, seed))[0]
            save_png(sample.image, folder / f"class-{seed:05d}.png", sample.parameters)
            seed += 1
            if progress is not None:
                progress(made + 1, missing)
    return image_files(folder)[:count]


def draw_previews(sampler: Sampler, prompts: Sequence[str], rewrite: Callable[[str], str], seeds: int,
                  size: int, steps: int, step: int, folder: Path) -> list[Path]:
    """One PNG per (prompt, seed) of the current weights, named by step."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for prompt_index, prompt in enumerate(prompts):
        plan = sampler.plan_prompt(rewrite(prompt))
        samples = sampler.generate(plan, sampling_settings(size, steps, 0), seeds)
        for sample in samples:
            path = folder / f"step-{step:06d}-p{prompt_index}-s{sample.seed}.png"
            written.append(save_png(sample.image, path, sample.parameters.replace(plan.text, prompt, 1),
                                    overwrite=True))
    return written
