"""`sdkit verify`: does an adapter make the model draw what it was trained for?

The concept prompt is sampled at N seeds from the base alone and with the adapter —
a LoRA / LyCORIS file, an embedding (the prompt names it by its trigger word), a
hypernetwork, or for DreamBooth a whole checkpoint sampled instead of the base. A scorer,
any Python callable `picture -> label or labels`, reads each picture; a seed counts when
every expected label (`--expect red/circle` = "red" and "circle") is among them. An
adapter passes when the concept shows in at least `--min-rate` of the seeds with it and
in at most `--max-base-rate` without it: a base that already draws the concept proves
nothing about the adapter.

A scorer is named `module:callable` (the module imported from the current folder or the
installed packages) or `path/to/file.py:callable` (the file loaded as a module).

A FLUX.1 base (a diffusers folder) samples with its flow-matching Euler scheduler, the
LoRA applied to its transformer as `lora bake` would bake it.

The default scorer is the toy world's (`sdkit.runtime.toyscore.score_image`: colour and
shape of the drawn figure).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from sdkit.arch import identify
from sdkit.errors import SdkitError, with_article
from sdkit.io import open_model
from sdkit.runtime.pipeline import load_model
from sdkit.runtime.sample.sampler import Sampler, Settings
from sdkit.runtime.sample.lora import LoraRequest
from sdkit.runtime.sample.plan import Adapters, HypernetRequest

Scorer = Callable[[Any], Any]
_ADAPTER_KINDS = ("lora", "embedding", "hypernetwork")


@dataclass(frozen=True)
class VerifyJob:
    adapter: Path
    base: Path
    concept: str
    expect: str  # labels joined by "/"
    seeds: int = 8
    first_seed: int = 0
    min_rate: float = 0.8
    scorer: str | None = None  # "module:callable" or "path/to/file.py:callable"; None: the toy scorer
    strength: float = 1.0
    steps: int = 20
    cfg: float = 7.0
    scheduler: str = "ddim"
    size: int | None = None
    config: Path | None = None
    device: str = "auto"
    max_base_rate: float = 0.2


@dataclass
class VerifyResult:
    kind: str
    expected: list[str]
    with_rate: float
    without_rate: float
    min_rate: float
    max_base_rate: float = 0.2
    labels_with: list[list[str]] = field(default_factory=list)
    labels_without: list[list[str]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.with_rate >= self.min_rate and self.without_rate <= self.max_base_rate

    def failures(self) -> list[str]:
        """Why it did not pass, one phrase per unmet bar."""
        found = []
        if self.with_rate < self.min_rate:
            found.append(f"the concept showed in {self.with_rate:.0%} of pictures with it, "
                         f"below --min-rate {self.min_rate:g}")
        if self.without_rate > self.max_base_rate:
            found.append(f"the base alone showed it in {self.without_rate:.0%} of pictures, "
                         f"above --max-base-rate {self.max_base_rate:g}")
        return found

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "expected": self.expected, "with_rate": self.with_rate,
                "without_rate": self.without_rate, "min_rate": self.min_rate,
                "max_base_rate": self.max_base_rate, "passed": self.passed,
                "labels_with": self.labels_with, "labels_without": self.labels_without}


def toy_labels(picture: Any) -> list[str]:
    """The toy scorer as labels: the colour and the shape it reads (none on a blank picture)."""
    from sdkit.runtime.toyscore import score_image

    score = score_image(picture)
    return [label for label in (score.colour, score.shape) if label]


def _is_file_spec(source: str) -> bool:
    return source.endswith(".py") or "/" in source or os.sep in source


def _module_from_file(spec: str, source: str) -> Any:
    """The Python file `source` run as a module of its own."""
    path = os.path.abspath(source)
    if not os.path.isfile(path):
        raise SdkitError(f"--scorer {spec}: {source} is not a file")
    name = f"sdkit_scorer_{os.path.splitext(os.path.basename(path))[0]}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise SdkitError(f"--scorer {spec}: {source} cannot be loaded as Python")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up there
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _module_from_here(name: str) -> Any:
    """`name` imported with the current folder searched too (an installed `sdkit` command
    does not search it; `python -m` does), for the length of the import."""
    here = os.getcwd()
    added = here not in sys.path
    if added:
        sys.path.append(here)  # after the installed packages: a local file never shadows them
    try:
        return importlib.import_module(name)
    finally:
        if added:
            sys.path.remove(here)


def load_scorer(spec: str | None) -> Scorer:
    """The callable `module:callable` or `path/to/file.py:callable` names, or the toy scorer."""
    if spec is None:
        return toy_labels
    source, _, attribute = spec.rpartition(":")  # the last colon: a Windows path has one too
    if not source or not attribute:
        raise SdkitError(f"--scorer {spec!r}: expected module:callable or path/to/file.py:callable")
    try:
        found: Any = _module_from_file(spec, source) if _is_file_spec(source) else _module_from_here(source)
        for part in attribute.split("."):
            found = getattr(found, part)
    except SdkitError:
        raise
    except Exception as exc:  # the user's module failing as it imports, or a missing name
        raise SdkitError(f"--scorer {spec}: cannot import it ({exc.__class__.__name__}: {exc})") from None
    if not callable(found):
        raise SdkitError(f"--scorer {spec}: not callable")
    return found


def as_labels(value: Any, scorer: str) -> list[str]:
    """A scorer's answer as lowercase labels: a string, or an iterable of strings."""
    if isinstance(value, str):
        return [value.lower()]
    if isinstance(value, Iterable):
        labels = list(value)
        if all(isinstance(label, str) for label in labels):
            return [label.lower() for label in labels]
    raise SdkitError(f"--scorer {scorer}: returned {type(value).__name__}; a scorer returns a label or a "
                     "list of labels")


def adapter_kind(path: Path) -> str:
    with open_model(path) as model:
        kind = identify(model).kind
    if kind not in (*_ADAPTER_KINDS, "checkpoint"):
        raise SdkitError(f"{path}: is {with_article(kind)}; verify takes a LoRA / LyCORIS, an embedding, a hypernetwork "
                         "or a checkpoint")
    return kind


def _adapters(kind: str, path: Path, strength: float) -> Adapters:
    if kind == "lora":
        return Adapters(loras=(LoraRequest(path, path.stem, strength, strength),))
    if kind == "hypernetwork":
        return Adapters(hypernets=(HypernetRequest(path, path.stem, strength),))
    return Adapters(embeddings=((path, None),))


def _rate(sampler: Sampler, job: VerifyJob, scorer: Scorer, expected: list[str]) -> tuple[float, list[list[str]]]:
    # a flow model samples on its own flow-matching Euler scheduler
    scheduler = None if sampler.model.is_flow else job.scheduler
    settings = Settings(steps=job.steps, cfg=job.cfg, seed=job.first_seed, width=job.size, height=job.size,
                        scheduler=scheduler)
    samples = sampler.generate(sampler.plan_prompt(job.concept), settings, job.seeds)
    labels = [as_labels(scorer(sample.image), job.scorer or "toy") for sample in samples]
    hits = sum(all(label in found for label in expected) for found in labels)
    return hits / len(samples), labels


def verify_adapter(job: VerifyJob) -> VerifyResult:
    """Sample the concept without and with the adapter; measure how often it shows."""
    expected = [label.strip().lower() for label in job.expect.split("/") if label.strip()]
    if not expected:
        raise SdkitError("--expect needs at least one label (e.g. red/circle)")
    if job.seeds < 1:
        raise SdkitError(f"--seeds must be at least 1, not {job.seeds}")
    for option, rate in (("--min-rate", job.min_rate), ("--max-base-rate", job.max_base_rate)):
        if not 0 <= rate <= 1:
            raise SdkitError(f"{option} must be between 0 and 1, not {rate:g}")
    kind = adapter_kind(job.adapter)
    scorer = load_scorer(job.scorer)
    base = load_model(job.base, config=job.config, device=job.device, flow=True)
    without, labels_without = _rate(Sampler(base), job, scorer, expected)
    if kind == "checkpoint":
        tuned = load_model(job.adapter, config=job.config, device=job.device, flow=True)
        sampler = Sampler(tuned)
    else:
        sampler = Sampler(base, adapters=_adapters(kind, job.adapter, job.strength))
    try:
        with_rate, labels_with = _rate(sampler, job, scorer, expected)
    finally:
        sampler.close()
    return VerifyResult(kind, expected, with_rate, without, job.min_rate, job.max_base_rate, labels_with,
                        labels_without)
