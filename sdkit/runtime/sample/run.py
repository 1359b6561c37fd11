"""`sdkit sample` as one library call: load, sample every prompt (and XY value), write PNGs.

Layouts of what is drawn:
- plain: every prompt, `batch` seeds each (seed, seed+1, ...), one PNG per picture:
  `OUT` for a single picture, else `OUT-<n>` numbered in drawing order;
- `grid`: the same pictures in one PNG, a row per prompt and a column per seed, and each
  picture on its own beside it (`OUT-<n>`, numbered even when there is one);
- `xy` (an `Axis`): one PNG, a column per value of the parameter and a row per prompt
  (and per seed when `batch` > 1).
Grids carry the parameters of their first picture, as A1111's grids do. Every output
path is checked before anything is drawn, so a refused run leaves no partial output.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdkit.errors import SdkitError
from sdkit.runtime.pipeline import load_model
from sdkit.runtime.sample.grid import Axis, grid_image
from sdkit.runtime.sample.library import Library, resolve_file
from sdkit.runtime.sample.plan import (
    AdapterArgs,
    PromptPlan,
    plan_prompt,
    resolve_adapters,
)
from sdkit.runtime.sample.png import (  # noqa: F401
    check_output_paths,
    numbered_paths,
    output_paths,
    picture_paths,
    save_png,
)
from sdkit.runtime.sample.sampler import (
    Sample,
    Sampler,
    Settings,
    check_settings,
    settings_with,
)

# (label of the current picture run, steps done, steps in that run)
RunProgress = Callable[[str, int, int], None]


@dataclass
class SampleJob:
    """Everything `sdkit sample` is asked to do."""

    model: str
    prompts: Sequence[str]
    settings: Settings = field(default_factory=Settings)
    batch: int = 1
    adapters: AdapterArgs = field(default_factory=AdapterArgs)
    library: str | None = None
    config: str | None = None
    vae: str | None = None
    text_encoders: Sequence[str] = ()  # a transformer diffusion model alone: its text encoder files
    device: str = "auto"
    dtype: str = "auto"
    grid: bool = False
    xy: Axis | None = None


@dataclass
class SampleResult:
    outputs: list[Path]
    samples: list[Sample]
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # prompt tags whose adapter was not found


def run_sample(job: SampleJob, output: str | os.PathLike[str], *, overwrite: bool = False,
               progress: RunProgress | None = None) -> SampleResult:
    """Draw what `job` asks for and write it under `output`."""
    if not job.prompts:
        raise SdkitError("no prompt given (--prompt TEXT)")
    # checked before the minutes a large model may take to load
    for value in job.xy.values if job.xy is not None else (None,):
        settings = job.settings if value is None else settings_with(job.settings, job.xy.parameter, value)
        check_settings(settings, job.batch)
    paths = picture_paths(output, len(job.prompts), job.batch, one_picture=job.grid or job.xy is not None)
    # a grid keeps its pictures too, as A1111 saves both: OUT-0, OUT-1, … beside it
    singles = numbered_paths(Path(output), len(job.prompts) * job.batch) if job.grid and job.xy is None else []
    check_output_paths(paths + singles, overwrite)
    library = Library(Path(job.library)) if job.library else None
    vae = resolve_file(job.vae, "vae", library, f"--vae {job.vae}") if job.vae else None
    adapters = resolve_adapters(job.adapters, library)
    plans = [plan_prompt(prompt, adapters, library) for prompt in job.prompts]
    text_encoders = [resolve_file(file, "text-encoder", library, f"--text-encoder {file}")
                     for file in job.text_encoders]
    model = load_model(job.model, config=job.config, vae=vae, device=job.device, dtype=job.dtype,
                       flow=True, text_encoders=text_encoders)
    sampler = Sampler(model, library, adapters)
    try:
        images, samples = _draw(sampler, plans, job, progress)
    finally:
        sampler.close()
    texts = [sample.parameters for sample in samples[:len(images)]]  # a grid: its first picture's
    written = [save_png(image, path, text, overwrite=overwrite) for image, path, text in zip(images, paths, texts)]
    written += [save_png(sample.image, path, sample.parameters, overwrite=overwrite)
                for sample, path in zip(samples, singles)]
    missing = list(dict.fromkeys(reason for plan in plans for reason in plan.missing))
    return SampleResult(written, samples, list(sampler.notes), missing)


def _draw(sampler: Sampler, plans: list[PromptPlan], job: SampleJob,
          progress: RunProgress | None) -> tuple[list[Any], list[Sample]]:
    """(the pictures to write, every sample drawn: row by row for a grid)."""
    if job.xy is not None:
        rows, columns, row_labels = _xy_cells(sampler, plans, job, progress)
        return [grid_image(_images(rows), columns, row_labels)], [s for row in rows for s in row]
    rows = _plain_cells(sampler, plans, job, progress)
    samples = [sample for row in rows for sample in row]
    if job.grid:
        columns = [f"seed {sample.seed}" for sample in rows[0]]
        return [grid_image(_images(rows), columns, list(job.prompts))], samples
    return [sample.image for sample in samples], samples


def _images(rows: list[list[Sample]]) -> list[list[Any]]:
    return [[sample.image for sample in row] for row in rows]


def _label(progress: RunProgress | None, label: str) -> Callable[[int, int], None] | None:
    if progress is None:
        return None
    return lambda done, total: progress(label, done, total)


def _plain_cells(sampler: Sampler, plans: list[PromptPlan], job: SampleJob,
                 progress: RunProgress | None) -> list[list[Sample]]:
    rows = []
    for index, plan in enumerate(plans, start=1):
        label = f"prompt {index}/{len(plans)}"
        rows.append(sampler.generate(plan, job.settings, job.batch, _label(progress, label)))
    return rows


def _xy_cells(sampler: Sampler, plans: list[PromptPlan], job: SampleJob,
              progress: RunProgress | None) -> tuple[list[list[Sample]], list[str], list[str]]:
    """Pictures per (prompt, seed) row and axis-value column, with the labels."""
    axis = job.xy
    columns: list[list[Sample]] = []
    total = len(plans) * len(axis.values)
    for value_index, value in enumerate(axis.values):
        settings = settings_with(job.settings, axis.parameter, value)
        column: list[Sample] = []
        for plan_index, plan in enumerate(plans):
            run = value_index * len(plans) + plan_index + 1
            column += sampler.generate(plan, settings, job.batch, _label(progress, f"{axis.parameter} {run}/{total}"))
        columns.append(column)
    rows = [[column[row] for column in columns] for row in range(len(columns[0]))]
    row_labels = [prompt if job.batch == 1 else f"{prompt} (seed +{offset})"
                  for prompt in job.prompts for offset in range(job.batch)]
    return rows, [axis.label(value) for value in axis.values], row_labels
