"""What a file's own metadata says: family / prediction hints and human-readable summaries.

Reads kohya `ss_*` keys and ModelSpec `modelspec.*` keys (formats.md (f)). Values are strings;
structured kohya values (`ss_tag_frequency`, `ss_network_args`) are JSON.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping

from sdkit.arch.families import family_from_kohya_version, family_from_modelspec
from sdkit.io.safetensors_json import metadata_json

_TOP_TAGS = 5
_DESCRIPTION_CHARS = 200


@dataclass
class MetadataHints:
    """Claims the metadata makes about the model, each with the key it came from."""

    family: str | None = None
    family_source: str | None = None
    prediction: str | None = None
    prediction_source: str | None = None
    variant: str | None = None


def metadata_hints(metadata: Mapping[str, str]) -> MetadataHints:
    hints = MetadataHints()
    architecture = metadata.get("modelspec.architecture", "")
    version = metadata.get("ss_base_model_version", "")
    model_type = metadata.get("ss_model_type", "")
    if architecture and family_from_modelspec(architecture):
        hints.family, hints.family_source = family_from_modelspec(architecture), "modelspec.architecture"
    elif model_type and family_from_kohya_version(model_type):
        # sd-scripts' FLUX trainer writes `ss_model_type` flux / chroma: the finer of the two
        hints.family, hints.family_source = family_from_kohya_version(model_type), "ss_model_type"
    elif version and family_from_kohya_version(version):
        hints.family, hints.family_source = family_from_kohya_version(version), "ss_base_model_version"
    elif metadata.get("ss_v2", "").lower() == "true":
        hints.family, hints.family_source = "sd2", "ss_v2"
    _prediction_hint(metadata, hints)
    base = architecture.lower().split("/")[0]
    if base.endswith("-inpainting"):
        hints.variant = "inpaint"
    elif base.endswith("-depth"):
        hints.variant = "depth"
    return hints


def _prediction_hint(metadata: Mapping[str, str], hints: MetadataHints) -> None:
    declared = metadata.get("modelspec.prediction_type", "").strip().lower()
    version = metadata.get("ss_base_model_version", "").strip().lower()
    if declared in ("v", "v_prediction", "v-prediction"):
        hints.prediction, hints.prediction_source = "v", "modelspec.prediction_type"
    elif declared in ("epsilon", "eps"):
        hints.prediction, hints.prediction_source = "epsilon", "modelspec.prediction_type"
    elif metadata.get("modelspec.architecture", "").lower().split("/")[0].endswith("-768-v"):
        hints.prediction, hints.prediction_source = "v", "modelspec.architecture"
    elif version.endswith("_v"):
        hints.prediction, hints.prediction_source = "v", "ss_base_model_version"
    elif version in ("sd_v1", "sd_v2"):
        # sd-scripts appends "_v" for v-parameterization, so its plain names mean epsilon
        hints.prediction, hints.prediction_source = "epsilon", "ss_base_model_version"


def metadata_notes(metadata: Mapping[str, str]) -> tuple[list[str], dict[str, Any]]:
    """Notes and facts summarising training metadata, ModelSpec fields and trigger words."""
    notes: list[str] = []
    facts: dict[str, Any] = {}
    training = _kohya_summary(metadata)
    if training:
        facts["training"] = training
        notes.append("training: " + ", ".join(f"{k} {v}" for k, v in training.items()))
    spec = {k.removeprefix("modelspec."): v for k, v in metadata.items() if k.startswith("modelspec.")}
    if spec:
        facts["modelspec"] = spec
        notes.append("modelspec: " + _modelspec_summary(spec))
    triggers = _trigger_words(metadata)
    if triggers:
        facts["trigger_words"] = triggers
        notes.append("trigger words: " + ", ".join(triggers))
    tags = _top_tags(metadata.get("ss_tag_frequency", ""))
    if tags:
        facts["top_tags"] = dict(tags)
        notes.append("most frequent training tags: " + ", ".join(f"{t} ({n})" for t, n in tags))
    return notes, facts


_KOHYA_FIELDS = (  # (metadata key, label) in the order people read them
    ("ss_network_module", "network"), ("ss_network_dim", "dim"), ("ss_network_alpha", "alpha"),
    ("ss_base_model_version", "base"), ("ss_sd_model_name", "base model"),
    ("ss_steps", "steps"), ("ss_max_train_steps", "max steps"), ("ss_epoch", "epochs"),
    ("ss_resolution", "resolution"), ("ss_learning_rate", "lr"), ("ss_num_train_images", "images"),
    ("ss_output_name", "name"),
)


def _kohya_summary(metadata: Mapping[str, str]) -> dict[str, str]:
    summary = {label: metadata[key] for key, label in _KOHYA_FIELDS if metadata.get(key)}
    args = metadata_json(metadata.get("ss_network_args", ""))
    if isinstance(args, dict) and args:
        summary["args"] = ", ".join(f"{k}={v}" for k, v in args.items())
    return summary


def _modelspec_summary(spec: Mapping[str, str]) -> str:
    parts = []
    for key in ("title", "architecture", "author", "date", "resolution", "license", "usage_hint"):
        if spec.get(key):
            parts.append(f"{key} {spec[key]!r}")
    description = spec.get("description", "")
    if description:
        cut = description[:_DESCRIPTION_CHARS]
        parts.append(f"description {cut + ('…' if len(description) > len(cut) else '')!r}")
    return ", ".join(parts) if parts else ", ".join(sorted(spec))


def _trigger_words(metadata: Mapping[str, str]) -> list[str]:
    phrase = metadata.get("modelspec.trigger_phrase", "")
    return [word.strip() for word in phrase.split(",") if word.strip()]


def _top_tags(raw: str) -> list[tuple[str, int]]:
    """Most frequent caption tags over every dataset folder of `ss_tag_frequency`."""
    folders = metadata_json(raw)
    if not isinstance(folders, dict):
        return []
    counts: Counter[str] = Counter()
    for tags in folders.values():
        if isinstance(tags, dict):
            for tag, count in tags.items():
                if isinstance(count, (int, float)):
                    counts[str(tag).strip()] += int(count)
    return counts.most_common(_TOP_TAGS)
