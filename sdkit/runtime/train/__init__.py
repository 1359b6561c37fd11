"""The compact trainer: LoRA, LoHa, LoKr, textual inversion, hypernetworks, DreamBooth.

    from sdkit.runtime.train import DataOptions, TrainConfig, train
    result = train(TrainConfig("lora", Path("base.safetensors"), Path("out.safetensors"),
                               DataOptions(Path("pictures"))))

Outputs are community files (kohya LoRA / LyCORIS, A1111 embeddings and hypernetworks,
single-file checkpoints) with `<stem>.train.json` and `<stem>.loss.png` beside them.
`verify_adapter` samples with and without an adapter and measures its effect.
"""

from sdkit.runtime.train.config import (DataOptions, DreamBoothOptions, EmbeddingOptions, HypernetOptions,
                                        LossOptions, NetworkOptions, OptimOptions, RunOptions, TrainConfig)
from sdkit.runtime.train.loop import TrainEvent, TrainResult, train

__all__ = [
    "DataOptions", "DreamBoothOptions", "EmbeddingOptions", "HypernetOptions", "LossOptions", "NetworkOptions",
    "OptimOptions", "RunOptions", "TrainConfig", "TrainEvent", "TrainResult", "train",
]
