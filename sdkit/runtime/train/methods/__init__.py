"""Training methods: what each one trains and the file it writes."""

from __future__ import annotations

from sdkit.runtime.pipeline import LoadedModel
from sdkit.runtime.train.config import TrainConfig
from sdkit.runtime.train.methods.base import SaveContext, TrainingMethod
from sdkit.runtime.train.methods.dreambooth import DreamBoothMethod
from sdkit.runtime.train.methods.hypernet import HypernetMethod
from sdkit.runtime.train.methods.lora import NetworkMethod
from sdkit.runtime.train.methods.ti import EmbeddingMethod

_CLASSES: dict[str, type[TrainingMethod]] = {
    "lora": NetworkMethod, "loha": NetworkMethod, "lokr": NetworkMethod, "ti": EmbeddingMethod,
    "hypernet": HypernetMethod, "dreambooth": DreamBoothMethod,
}


def make_method(config: TrainConfig, model: LoadedModel) -> TrainingMethod:
    return _CLASSES[config.method](config, model)


__all__ = ["SaveContext", "TrainingMethod", "make_method"]
