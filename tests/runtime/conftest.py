"""Session fixtures of the runtime tests: the tiny models (see runtime_models.py)."""

from __future__ import annotations

import pytest
import torch

from runtime_models import TinyModel, build_tiny_model


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny tensors: one thread is several times faster than two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def sd1(tmp_path_factory) -> TinyModel:
    return build_tiny_model(tmp_path_factory.mktemp("sd1"), "sd1")


@pytest.fixture(scope="session")
def sdxl(tmp_path_factory) -> TinyModel:
    return build_tiny_model(tmp_path_factory.mktemp("sdxl"), "sdxl-base")


@pytest.fixture(scope="session")
def sd2(tmp_path_factory) -> TinyModel:
    return build_tiny_model(tmp_path_factory.mktemp("sd2"), "sd2")
