"""The compact trainer: LoRA, LoHa, LoKr, textual inversion, hypernetworks, DreamBooth.

    from sdkit.runtime.train import DataOptions, TrainConfig, train
    result = train(TrainConfig("lora", Path("base.safetensors"), Path("out.safetensors"),
                               DataOptions(Path("pictures"))))

Outputs are community files (kohya LoRA / LyCORIS, A1111 embeddings and hypernetworks,
single-file checkpoints) with `<stem>.train.json` and `<stem>.loss.png` beside them.
`verify_adapter` samples with and without an adapter and measures its effect.
"""

from typing import Any

from sdkit.runtime.train.config import (DataOptions, DreamBoothOptions, EmbeddingOptions, HypernetOptions,
                                        LossOptions, NetworkOptions, OptimOptions, RunOptions, TrainConfig)

__all__ = [
    "DataOptions", "DreamBoothOptions", "EmbeddingOptions", "HypernetOptions", "LossOptions", "NetworkOptions",
    "OptimOptions", "RunOptions", "TrainConfig", "TrainEvent", "TrainResult", "train",
]

_LOOP_NAMES = ("TrainEvent", "TrainResult", "train")


def __getattr__(name: str) -> Any:
    # the loop needs torch and diffusers: import it on first use, so that `sdkit --help` and
    # every command that only reads option lists from the config start in milliseconds
    if name in _LOOP_NAMES:
        from sdkit.runtime.train import loop
        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
