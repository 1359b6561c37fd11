"""An empty, offline Hugging Face cache for a test: what a machine that never downloaded
anything looks like to sdkit's tokenizer and scheduler lookups."""

from __future__ import annotations

from pathlib import Path

import pytest


def use_empty_hub_cache(monkeypatch: pytest.MonkeyPatch, folder: Path) -> dict[str, str]:
    """Point huggingface_hub (in this process, and in the environment for subprocesses)
    at an empty cache with the hub switched off; returns the environment variables set."""
    import huggingface_hub.constants as hub

    folder.mkdir(parents=True, exist_ok=True)
    variables = {"HF_HOME": str(folder), "HF_HUB_CACHE": str(folder), "HF_HUB_OFFLINE": "1"}
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(folder))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    return variables
