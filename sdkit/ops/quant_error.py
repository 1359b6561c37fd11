"""The error a quantization (fp8, GGUF) leaves in each layer class, as the casts measure it.

A layer class is a layer in every block (`double_blocks.N.img_attn.qkv`): the report says
how far the stored values are from the source there — the largest absolute error, and the
relative error ||W − Q|| / ||W|| over the class and for its worst tensor.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from sdkit.arch.quantization import layer_class


@dataclass
class ClassError:
    """Quantization error over the tensors of one layer class (`double_blocks.N.img_attn.qkv`)."""

    tensors: int = 0
    max_abs: float = 0.0
    worst_relative: float = 0.0  # the largest ||W - Q|| / ||W|| of one tensor
    squared_error: float = 0.0
    squared_norm: float = 0.0

    def add(self, max_abs: float, error_norm2: float, norm2: float) -> None:
        self.tensors += 1
        self.max_abs = max(self.max_abs, max_abs)
        self.squared_error += error_norm2
        self.squared_norm += norm2
        self.worst_relative = max(self.worst_relative, (error_norm2 / norm2) ** 0.5 if norm2 else 0.0)

    @property
    def relative(self) -> float:
        return (self.squared_error / self.squared_norm) ** 0.5 if self.squared_norm else 0.0

    def to_json(self) -> dict[str, float]:
        return {"tensors": self.tensors, "max_abs": self.max_abs, "relative": self.relative,
                "worst_relative": self.worst_relative}



@dataclass(kw_only=True)
class LayerClassErrors:
    """Errors per layer class, recorded from the writer's worker threads."""

    errors: dict[str, ClassError] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, name: str, max_abs: float, error_norm2: float, norm2: float) -> None:
        with self._lock:
            self.errors.setdefault(layer_class(name), ClassError()).add(max_abs, error_norm2, norm2)

    def errors_json(self) -> dict[str, dict[str, float]]:
        return {name: error.to_json() for name, error in sorted(self.errors.items())}

    def summary(self, shown: int = 3) -> list[str]:
        """The worst layer classes by relative error, in words."""
        worst = sorted(self.errors.items(), key=lambda item: -item[1].relative)[:shown]
        return [f"{name}: relative error {error.relative:.2%} (worst tensor {error.worst_relative:.2%}), "
                f"max |error| {error.max_abs:.3g} over {error.tensors} tensors" for name, error in worst]
