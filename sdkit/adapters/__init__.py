"""Adapter formats and their weight math.

- `lora_format`: LoRA / LyCORIS / peft state dicts parsed into `LoraFile` / `LoraModule`
  (`sdkit.io.LazyTensor`s, alpha, rank, algorithm); torch is not imported until tensors load.
- `lora_math`: `delta_weight(module, base_weight, strength)` for every algorithm.
"""

from sdkit.adapters.lora_format import LoraFile, LoraModule, parse_lora

__all__ = ["LoraFile", "LoraModule", "parse_lora"]
