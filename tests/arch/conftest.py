"""Fixtures of the arch tests: cached tiny LDM checkpoints and a LyCORIS file writer."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from arch_models import ldm_tensors


@pytest.fixture(scope="session")
def ldm_checkpoint() -> Callable[..., dict[str, torch.Tensor]]:
    """Factory with a cache: tiny LDM state dicts by family."""
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def build(family: str) -> dict[str, torch.Tensor]:
        if family not in cache:
            cache[family] = ldm_tensors(family)
        return dict(cache[family])

    return build


@pytest.fixture
def lycoris_file(tmp_path: Path) -> Callable[..., Path]:
    """Factory: save a LyCORIS network over `module` with LyCORIS's own writer.

    LyCORIS keeps its preset in class attributes; they are restored after the test.
    """
    from lycoris.logging import logger
    from lycoris.wrapper import LycorisNetwork

    attrs = ("ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "LORA_PREFIX",
             "MODULE_ALGO_MAP", "NAME_ALGO_MAP", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")
    saved = {attr: getattr(LycorisNetwork, attr) for attr in attrs}
    logger.setLevel(logging.ERROR)

    def build(parts: list[tuple[Any, str, list[str]]], algo: str, name: str = "adapter",
              metadata: dict[str, str] | None = None, **kwargs: Any) -> Path:
        from safetensors.torch import load_file, save_file

        merged: dict[str, torch.Tensor] = {}
        for index, (module, prefix, targets) in enumerate(parts):
            LycorisNetwork.apply_preset({
                "enable_conv": True, "target_module": targets, "target_name": [],
                "module_algo_map": {}, "name_algo_map": {}, "lora_prefix": prefix,
                "use_fnmatch": False, "exclude_name": []})
            network = LycorisNetwork(module, lora_dim=4, conv_lora_dim=4, alpha=2, conv_alpha=2,
                                     network_module=algo, **kwargs)
            network.apply_to()  # registers the adapter modules that save_weights writes
            part_path = tmp_path / f"{name}.part{index}.safetensors"
            network.save_weights(str(part_path), torch.float32, None)
            merged.update(load_file(part_path))
        path = tmp_path / f"{name}.safetensors"
        save_file(merged, path, metadata=metadata)
        return path

    yield build
    for attr, value in saved.items():
        setattr(LycorisNetwork, attr, value)


