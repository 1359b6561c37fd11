"""`train(config)`: load, prepare the data, train, save — the whole run.

The loop runs under 🤗 accelerate: `Accelerator` places the model, wraps it for
data-parallel training when launched on several GPUs (`accelerate launch -m sdkit train
...`), applies mixed precision and gradient accumulation; on a plain CPU run it is a
single process. Each optimizer step is `--grad-accum` micro-steps; micro-step m on
process p trains global batch m·P + p of an endless sequence of shuffled epochs, and
draws all its randomness from generators seeded by (seed, m, p) — so the same seed gives
the same weights, and a resumed run continues exactly where the saved one stopped.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from sdkit import __version__
from sdkit.errors import SdkitError
from sdkit.io import hash_file
from sdkit.ops.recipe_meta import recorded_path
from sdkit.runtime.pipeline import load_model, resolve_device
from sdkit.runtime.train.buckets import BatchPlan
from sdkit.runtime.train.config import TrainConfig, check_config, check_family_options
from sdkit.runtime.train.data import DatasetScan, ImageFilter, scan_dataset
from sdkit.runtime.train.datasets import (combined_scan, scan_subsets, split_tags, subset_samples, subsets_of,
                                          with_dataset_settings)
from sdkit.runtime.train.denoiser import Denoiser, sdxl_time_ids
from sdkit.runtime.train.flow import FlowObjective, FluxDenoiser, design_architecture
from sdkit.runtime.train.latents import LatentBatch, LatentSource, TrainSample
from sdkit.runtime.train.logs import TrainLog, epoch_file, epochs_done, step_scalars
from sdkit.runtime.train.methods import SaveContext, TrainingMethod, make_method
from sdkit.runtime.train.objective import Objective
from sdkit.runtime.train.optimizers import current_lr
from sdkit.runtime.train.outputs import (RunFacts, draw_loss_curve, kohya_metadata, loss_summary, spec_metadata,
                                         write_json_atomic)
from sdkit.runtime.train.precision import PrecisionPlan, resolve_precision
from sdkit.runtime.train.sampling import draw_previews, ensure_class_images
from sdkit.runtime.train.setup import (base_is_flow, bucket_counts, cast_frozen, class_samples, denoiser_of,
                                       enable_checkpointing, freeze, instance_samples, make_accelerator,
                                       make_lr_scheduler, make_optimizer, micro_seed, side_path, training_buckets)
from sdkit.runtime.train.state import (TrainState, folder_digest, load_state, restore_optimizer, restore_parameters,
                                       run_identity, save_state)


@dataclass
class TrainEvent:
    """Progress of one phase: "latents", "class-images", "train", "preview", "save"."""

    phase: str
    done: int
    total: int
    loss: float | None = None
    lr: float | None = None  # the first parameter group's learning rate after the step


Progress = Callable[[TrainEvent], None]


@dataclass
class TrainResult:
    outputs: list[Path]
    record: Path
    loss_curve: Path
    steps: int
    resumed_from: int
    losses: list[float]
    precision: str
    main_process: bool = True  # False on the other processes of a multi-GPU run (they write nothing)
    notes: list[str] = field(default_factory=list)
    previews: list[Path] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def train(config: TrainConfig, progress: Progress | None = None) -> TrainResult:
    """Run the training `config` describes; returns what was written."""
    return Trainer(config, progress).run()


class Trainer:
    def __init__(self, config: TrainConfig, progress: Progress | None) -> None:
        check_config(config)
        self.flow = base_is_flow(config.base, has_parts=config.vae is not None or bool(config.text_encoders))
        check_family_options(config, self.flow)
        self.config = config
        self.progress = progress
        self.notes: list[str] = []
        self.timings: dict[str, float] = {}
        self.previews: list[Path] = []
        self.epoch_outputs: list[Path] = []
        self.log: TrainLog | None = None
        self._run_identity: dict[str, Any] | None = None
        device = resolve_device(config.run.device)
        self.plan: PrecisionPlan = resolve_precision(config.run.precision, device)
        if self.plan.note:
            self.notes.append(self.plan.note)
        self.accelerator = make_accelerator(self.plan, config.optim.grad_accum, cpu=device.type == "cpu")
        self._clock = time.perf_counter()

    # ---- phases ---------------------------------------------------------------------

    def _lap(self, name: str) -> None:
        """Time since the last lap, added to phase `name`."""
        now = time.perf_counter()
        self.timings[name] = round(self.timings.get(name, 0.0) + now - self._clock, 3)
        self._clock = now

    def _emit(self, phase: str, done: int, total: int, loss: float | None = None, lr: float | None = None) -> None:
        if self.progress is not None and self.accelerator.is_main_process:
            self.progress(TrainEvent(phase, done, total, loss, lr))

    def run(self) -> TrainResult:
        self.config = config = with_dataset_settings(self.config)
        self.started_at = started_at = time.time()
        self.hashes = self._hash_base()
        self.scan = self._scan()
        # a state of another run is refused before the model loads
        self.resume_state = load_state(config.run.resume, config, self._identity()) if config.run.resume else None
        self._lap("data_s")
        # loaded on the CPU in float32, moved to the device once frozen weights are cast
        self.model = load_model(config.base, config=config.config_dir, device="cpu", dtype="fp32", flow=self.flow,
                                vae=config.vae, text_encoders=config.text_encoders)
        self._lap("load_s")
        self.resolution, buckets = training_buckets(self.model, config.data)
        self.samples = self._instance_samples(buckets)
        self.classes = self._class_samples()
        self._lap("data_s")
        self.method = self._build_method()
        self.instance_latents = self._latents(self.samples, config.data.cache)
        self.class_latents = self._latents(self.classes, "memory") if self.classes else None
        self._lap("latents_s")
        losses, resumed_from = self._train()
        self._lap("train_s")
        outputs = self._save(losses, started_at, self.hashes)
        self._lap("save_s")
        return self._finish(outputs, losses, resumed_from)

    def _hash_base(self) -> Future | None:
        """sha256 (and the short hashes) of a base file, computed in the background: for the
        metadata on the main process, and on every process that checks a state to resume."""
        if not self.config.base.is_file():
            return None
        if not self.accelerator.is_main_process and self.config.run.resume is None:
            return None
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdkit-train-hash")
        future = pool.submit(hash_file, self.config.base)
        pool.shutdown(wait=False)
        return future

    def _identity(self) -> dict[str, Any]:
        """This run's identity for training states (see `state.run_identity`)."""
        if self._run_identity is None:
            base = self.config.base
            if not base.exists():
                raise SdkitError(f"{base}: no such file or directory")
            digest = f"sha256:{self.hashes.result().sha256}" if self.hashes is not None else \
                f"files:{folder_digest(base)}"
            self._run_identity = run_identity(self.config, digest, f"sha256:{self.scan.listing_digest()}")
        return self._run_identity

    def _scan(self) -> DatasetScan:
        data = self.config.data
        # folders the run writes pictures into may sit inside the data folder
        exclude = (self._class_folder(), side_path(self.config, ".previews"), side_path(self.config, ".loss.png"),
                   *((data.cache_dir,) if data.cache_dir else ()))
        image_filter = ImageFilter(data.min_width, data.min_height, data.min_aspect, data.max_aspect)
        kohya = subsets_of(self.config)
        self.subset_scans = scan_subsets(kohya[1], image_filter, exclude) if kohya else None
        scan = combined_scan(self.subset_scans) if self.subset_scans else scan_dataset(data.folder, image_filter,
                                                                                         exclude)
        if scan.dropped:
            first, reason = next(iter(scan.dropped.items()))
            self.notes.append(f"{len(scan.dropped)} of {len(scan.dropped) + len(scan.records)} images dropped "
                              f"(e.g. {first}: {reason}); see the record for all")
        if scan.uncaptioned:
            self.notes.append(f"{scan.uncaptioned} images have no caption")
        return scan

    def _instance_samples(self, buckets: list[tuple[int, int]]) -> list[TrainSample]:
        if self.subset_scans is None:
            return instance_samples(self.scan, buckets, self.config.data)
        return subset_samples(self.subset_scans, buckets, self.config.data.trigger,
                              self.config.dreambooth.prior_weight)

    def _class_folder(self) -> Path:
        return self.config.dreambooth.class_dir or side_path(self.config, ".class-images")

    def _class_samples(self) -> list[TrainSample]:
        options = self.config.dreambooth
        if self.config.method != "dreambooth" or not options.class_prompt:
            return []
        folder = self._class_folder()
        paths = []
        if self.accelerator.is_main_process:
            self._to_device()
            paths = ensure_class_images(self.model, options.class_prompt, folder, options.class_image_count,
                                        self.resolution, self.config.run.sample_steps,
                                        lambda done, total: self._emit("class-images", done, total))
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            from sdkit.runtime.train.data import image_files

            paths = image_files(folder)[:options.class_image_count]
        return class_samples(paths, options.class_prompt, self.resolution)

    def _build_method(self) -> TrainingMethod:
        model, config = self.model, self.config
        freeze(model)
        method = make_method(config, model)
        torch.manual_seed(config.run.seed)  # peft initialises its layers from the global generator
        method.setup(torch.Generator().manual_seed(config.run.seed))
        modules = [denoiser_of(model), *(getattr(model.pipe, name) for name in model.text_components)]
        cast_frozen(modules, self.plan.frozen_dtype)
        self._to_device()
        if config.optim.gradient_checkpointing:
            enable_checkpointing(model, method.text_grad)
        if self.flow:
            self.denoiser = FluxDenoiser(model.pipe)
        else:
            self.denoiser = Denoiser(model.pipe, model.family, method.text_grad, method.extra_module())
        return method

    def _to_device(self) -> None:
        self.model.pipe.to(self.accelerator.device)
        self.model.device = self.accelerator.device

    def _latents(self, samples: list[TrainSample], mode: str) -> LatentSource:
        data = self.config.data
        cache_dir = data.cache_dir or data.folder / ".sdkit-latents"
        source = LatentSource(self.model.pipe.vae, samples, mode, data.crop, cache_dir)
        source.prepare(lambda done, total: self._emit("latents", done, total))
        return source

    # ---- training -------------------------------------------------------------------

    def _named_trainables(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self.denoiser.named_parameters() if p.requires_grad}

    def _train(self) -> tuple[list[float], int]:
        config, accelerator = self.config, self.accelerator
        optimizer = make_optimizer(self.method.parameter_groups(), config.optim, accelerator.device)
        objective = FlowObjective if self.flow else Objective
        self.objective = objective(self.model.scheduler_config, config.loss)
        start, losses, state = 0, [], self.resume_state
        if state is not None:
            restore_parameters(self._named_trainables(), state.parameters, config.run.resume)
            restore_optimizer(optimizer, state.optimizer)
            start, losses = state.step, state.losses
            self.notes.append(f"resumed from step {start} ({config.run.resume})")
        scheduler = make_lr_scheduler(optimizer, config.optim, start)
        self.wrapped, self.optimizer = accelerator.prepare(self.denoiser, optimizer)
        if state is not None and state.scaler is not None and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(state.scaler)
        self.scheduler = scheduler
        processes = accelerator.num_processes
        self.instance_plan = BatchPlan([s.bucket for s in self.samples], config.optim.batch_size, config.run.seed)
        self.class_plan = BatchPlan([s.bucket for s in self.classes], config.optim.batch_size,
                                    config.run.seed + 1) if self.classes else None
        self.batches_per_epoch = self.instance_plan.per_epoch
        self.processes = processes
        self.denoiser.train()
        for step in range(start, config.optim.steps):
            losses.append(self._optimizer_step(step))
            self._emit("train", step + 1, config.optim.steps, losses[-1], self.optimizer.param_groups[0]["lr"])
            self._after_step(step + 1, losses)
        return losses, start

    def _optimizer_step(self, step: int) -> float:
        config, accelerator = self.config, self.accelerator
        total = torch.zeros((), device=accelerator.device)
        parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        for index in range(config.optim.grad_accum):
            micro = step * config.optim.grad_accum + index
            with accelerator.accumulate(self.wrapped):
                loss = self._micro_loss(micro)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.optim.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(parameters, config.optim.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            total += loss.detach()
        self.scheduler.step()
        self.method.after_optimizer_step()
        mean = accelerator.reduce(total / config.optim.grad_accum, reduction="mean")
        return float(mean)

    def _micro_loss(self, micro: int) -> torch.Tensor:
        process = self.accelerator.process_index
        seed = micro_seed(self.config.run.seed, micro, process)
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # dropout layers draw from the global generators
        rng = random.Random(seed)
        index = micro * self.processes + process
        batch = self.instance_latents.batch(self.instance_plan.batch_at(index), generator, rng)
        loss = self._batch_loss(batch, generator, rng, self.config.data.caption_dropout)
        if self.class_plan is not None:
            prior = self.class_latents.batch(self.class_plan.batch_at(index), generator, rng)
            loss = loss + self.config.dreambooth.prior_weight * self._batch_loss(prior, generator, rng, 0.0)
        return loss

    def _batch_loss(self, batch: LatentBatch, generator: torch.Generator, rng: random.Random,
                    dropout: float) -> torch.Tensor:
        captions = [self.method.caption("" if dropout and rng.random() < dropout else
                                        split_tags(sample.caption, sample.keep_tokens, sample.shuffle_caption, rng))
                    for sample in batch.samples]
        noisy = self.objective.noisy_batch(batch.latents.to(self.accelerator.device), generator)
        time_ids = None
        if self.denoiser.sdxl:
            sizes = [(s.record.width, s.record.height) for s in batch.samples]
            time_ids = sdxl_time_ids(sizes, batch.crops, batch.samples[0].bucket)
        prediction = self.wrapped(noisy.noisy, noisy.timesteps, self.denoiser.tokenize(captions), time_ids)
        weights = torch.tensor([sample.weight for sample in batch.samples], device=prediction.device)
        return (self.objective.loss(prediction, noisy) * weights).mean()

    def _after_step(self, done: int, losses: list[float]) -> None:
        run = self.config.run
        self._log_step(done, losses)
        self._save_epoch(done, losses)
        if run.preview_every and done % run.preview_every == 0:
            self._preview(done)
        if run.save_every and (done % run.save_every == 0 or done == self.config.optim.steps):
            self.accelerator.wait_for_everyone()
            if self.accelerator.is_main_process:
                scaler = self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else None
                state = TrainState(done, self._named_trainables(), self.optimizer.state_dict(), scaler, losses)
                save_state(self.config.state_dir, state, self.config, self._identity())

    def _log_step(self, done: int, losses: list[float]) -> None:
        folder = self.config.run.log_dir
        if folder is None or not self.accelerator.is_main_process:
            return
        if self.log is None:
            self.log = TrainLog(folder)
            if not self.log.tensorboard:
                self.notes.append("the tensorboard package is not installed: --log-dir has scalars.csv only "
                                  "(pip install 'sdkit[tensorboard]' for event files)")
        rates = [current_lr(self.optimizer, self.scheduler, index) for index in range(len(self.optimizer.param_groups))]
        self.log.add(done, step_scalars(losses, self.batches_per_epoch, rates))

    def _save_epoch(self, done: int, losses: list[float]) -> None:
        """kohya's --save_every_n_epochs: a numbered file at the end of every N epochs but the last."""
        every, optim = self.config.run.save_every_n_epochs, self.config.optim
        if not every or done == optim.steps:
            return
        epoch = epochs_done(done, optim.grad_accum, self.processes, self.batches_per_epoch)
        if epoch == epochs_done(done - 1, optim.grad_accum, self.processes, self.batches_per_epoch) or epoch % every:
            return
        final, notes = self.config, list(self.notes)
        self.config = replace(final, output=epoch_file(final.output, epoch))
        try:
            self.epoch_outputs += self._save(losses, self.started_at, self.hashes)
        finally:
            self.config, self.notes = final, notes

    def _preview(self, step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        from sdkit.runtime.sample.sampler import Sampler

        run = self.config.run
        self.denoiser.eval()
        try:
            with self.accelerator.autocast():
                written = draw_previews(Sampler(self.model), run.preview_prompts, self.method.prompt,
                                        run.preview_seeds, self.resolution, run.sample_steps, step,
                                        side_path(self.config, ".previews"))
        finally:
            self.denoiser.train()
        self.previews += written
        self._emit("preview", step, self.config.optim.steps)

    # ---- outputs --------------------------------------------------------------------

    def _run_facts(self, losses: list[float], started_at: float, hashes: Future | None) -> RunFacts:
        found = hashes.result() if hashes is not None else None
        base_hashes = {"sha256": found.sha256, "legacy": found.legacy, "autov2": found.autov2} if found else {}
        return RunFacts(family=self.model.family, prediction=self.prediction, precision=self.plan.name,
                        resolution=self.resolution, buckets=bucket_counts(self.samples), samples=len(self.samples),
                        class_images=len(self.classes), batches_per_epoch=self.batches_per_epoch,
                        processes=self.processes, steps_done=len(losses), started_at=started_at,
                        finished_at=time.time(), base_hashes=base_hashes,
                        class_dir=self._class_folder() if self.classes else None, subsets=self._subset_facts())

    def _subset_facts(self) -> dict[str, dict[str, Any]]:
        if not self.subset_scans:
            return {}
        return {item.subset.image_dir.name: {"n_repeats": item.subset.num_repeats, "img_count": len(item.scan.records),
                                             "is_reg": item.subset.is_reg} for item in self.subset_scans}

    @property
    def prediction(self) -> str:
        if self.flow:
            return "flow"
        return "v" if self.objective.prediction == "v_prediction" else "epsilon"

    def _save(self, losses: list[float], started_at: float, hashes: Future | None) -> list[Path]:
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return []
        self.facts = self._run_facts(losses, started_at, hashes)
        config = self.config
        default = torch.float16 if config.method == "dreambooth" else torch.float32
        dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
        parts = [str(path) for path in (*config.text_encoders, *([config.vae] if config.vae else []))]
        inputs = [str(config.base), *parts, str(config.data.folder)]
        input_hashes = {str(config.data.folder): self.scan.fingerprint()}
        if self.facts.base_hashes.get("sha256"):
            input_hashes[str(config.base)] = self.facts.base_hashes["sha256"]
        autov2 = self.facts.base_hashes.get("autov2")
        context = SaveContext(path=config.output, steps=len(losses), prediction=self.prediction,
                              dtype=dtypes[config.run.save_precision] if config.run.save_precision else default,
                              training_metadata={**kohya_metadata(config, self.scan, self.facts),
                                                 **spec_metadata(config, self.facts), **self._flow_spec()},
                              recipe_params=config.to_json(recorded=True), inputs=inputs,
                              input_hashes=input_hashes,
                              base_short_hash=autov2, overwrite=config.run.overwrite)
        self._emit("save", 0, 1)
        written = self.method.save(context)
        self.notes += self.method.notes
        return written

    def _flow_spec(self) -> dict[str, str]:
        """A flow base's ModelSpec architecture: the released design it follows (dev / schnell)."""
        architecture = design_architecture(self.model.family, self.model.pipe.transformer) if self.flow else None
        return {"modelspec.architecture": f"{architecture}/lora"} if architecture else {}

    def _finish(self, outputs: list[Path], losses: list[float], resumed_from: int) -> TrainResult:
        config = self.config
        if self.log is not None:
            self.log.close()
        outputs = self.epoch_outputs + outputs
        record, curve = side_path(config, ".train.json"), side_path(config, ".loss.png")
        result = TrainResult(outputs, record, curve, len(losses), resumed_from, losses, self.plan.name,
                             self.accelerator.is_main_process, self.notes, self.previews, dict(self.timings))
        if not self.accelerator.is_main_process:
            return result
        trained = len(losses) - resumed_from
        result.timings["steps_per_second"] = round(trained / self.timings["train_s"], 3) if trained else 0.0
        write_json_atomic(record, self._record(result))
        draw_loss_curve(curve, losses, f"{config.method} {config.stem.name}: loss per step")
        return result

    def _record(self, result: TrainResult) -> dict[str, Any]:
        facts, config = self.facts, self.config
        return {
            "sdkit_version": __version__, "method": config.method, "config": config.to_json(recorded=True),
            "base": {"path": recorded_path(config.base), "family": facts.family, "prediction": facts.prediction,
                     **{k: v for k, v in facts.base_hashes.items() if v}},
            "data": {**self.scan.report(), "folder": recorded_path(self.scan.folder),
                     "samples_per_epoch": facts.samples, "class_images": facts.class_images,
                     "resolution": facts.resolution, "buckets": {f"{w}x{h}": n for (w, h), n in
                                                                  sorted(facts.buckets.items())},
                     "latents_encoded": self.instance_latents.encoded},
            "precision": self.plan.name, "device": str(self.accelerator.device), "processes": facts.processes,
            "steps": {"done": result.steps, "resumed_from": result.resumed_from,
                      "batches_per_epoch": facts.batches_per_epoch},
            "loss": loss_summary(result.losses), "timings": result.timings,
            "started_at": facts.started_at, "finished_at": facts.finished_at,
            "outputs": [recorded_path(p) for p in result.outputs],
            "previews": [recorded_path(p) for p in result.previews],
            "notes": result.notes,
        }
