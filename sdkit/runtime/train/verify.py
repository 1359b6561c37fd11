"""`sdkit verify`: does an adapter make the model draw what it was trained for?

The concept prompt is sampled at N seeds from the base alone and with the adapter —
a LoRA / LyCORIS file, an embedding (the prompt names it by its trigger word), a
hypernetwork, or for DreamBooth a whole checkpoint sampled instead of the base. A scorer,
any Python callable `picture -> label or labels`, reads each picture; a seed counts when
every expected label (`--expect red/circle` = "red" and "circle") is among them. The
verdict is the fraction of seeds with the adapter, against `--min-rate`; the fraction
without it is reported beside it, as the effect is the difference.

The default scorer is the toy world's (`sdkit.runtime.toyscore.score_image`: colour and
shape of the drawn figure).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from sdkit.arch import identify
from sdkit.errors import SdkitError
from sdkit.io import open_model
from sdkit.runtime.pipeline import load_model
from sdkit.runtime.sample import Sampler, Settings
from sdkit.runtime.sample_lora import LoraRequest
from sdkit.runtime.sample_plan import Adapters, HypernetRequest

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
    scorer: str | None = None  # "module:callable"; None: the toy scorer
    strength: float = 1.0
    steps: int = 20
    cfg: float = 7.0
    scheduler: str = "ddim"
    size: int | None = None
    config: Path | None = None
    device: str = "auto"


@dataclass
class VerifyResult:
    kind: str
    expected: list[str]
    with_rate: float
    without_rate: float
    min_rate: float
    labels_with: list[list[str]] = field(default_factory=list)
    labels_without: list[list[str]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.with_rate >= self.min_rate

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "expected": self.expected, "with_rate": self.with_rate,
                "without_rate": self.without_rate, "min_rate": self.min_rate, "passed": self.passed,
                "labels_with": self.labels_with, "labels_without": self.labels_without}


def toy_labels(picture: Any) -> list[str]:
    """The toy scorer as labels: the colour and the shape it reads (none on a blank picture)."""
    from sdkit.runtime.toyscore import score_image

    score = score_image(picture)
    return [label for label in (score.colour, score.shape) if label]


def load_scorer(spec: str | None) -> Scorer:
    """`module:callable` imported, or the toy scorer."""
    if spec is None:
        return toy_labels
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise SdkitError(f"--scorer {spec!r}: expected module:callable")
    try:
        found: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError) as exc:
        raise SdkitError(f"--scorer {spec}: cannot import it ({exc})") from None
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
        raise SdkitError(f"{path}: is a {kind}; verify takes a LoRA / LyCORIS, an embedding, a hypernetwork "
                         "or a checkpoint")
    return kind


def _adapters(kind: str, path: Path, strength: float) -> Adapters:
    if kind == "lora":
        return Adapters(loras=(LoraRequest(path, path.stem, strength, strength),))
    if kind == "hypernetwork":
        return Adapters(hypernets=(HypernetRequest(path, path.stem, strength),))
    return Adapters(embeddings=((path, None),))


def _rate(sampler: Sampler, job: VerifyJob, scorer: Scorer, expected: list[str]) -> tuple[float, list[list[str]]]:
    settings = Settings(steps=job.steps, cfg=job.cfg, seed=job.first_seed, width=job.size, height=job.size,
                        scheduler=job.scheduler)
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
    if not 0 <= job.min_rate <= 1:
        raise SdkitError(f"--min-rate must be between 0 and 1, not {job.min_rate:g}")
    kind = adapter_kind(job.adapter)
    scorer = load_scorer(job.scorer)
    base = load_model(job.base, config=job.config, device=job.device)
    without, labels_without = _rate(Sampler(base), job, scorer, expected)
    if kind == "checkpoint":
        tuned = load_model(job.adapter, config=job.config, device=job.device)
        sampler = Sampler(tuned)
    else:
        sampler = Sampler(base, adapters=_adapters(kind, job.adapter, job.strength))
    try:
        with_rate, labels_with = _rate(sampler, job, scorer, expected)
    finally:
        sampler.close()
    return VerifyResult(kind, expected, with_rate, without, job.min_rate, labels_with, labels_without)
