"""Settings for the whole test session.

sdkit's hash cache (`sdkit.io.hash_cache`) goes to a folder of this session, never to the
user's home: set in the environment before any test runs, so `sdkit` commands started as
subprocesses inherit it too.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

_CACHE_DIR_KEY = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    folder = tempfile.mkdtemp(prefix="sdkit-test-cache-")
    config.stash[_CACHE_DIR_KEY] = folder
    os.environ["SDKIT_CACHE_DIR"] = folder


def pytest_unconfigure(config: pytest.Config) -> None:
    folder = config.stash.get(_CACHE_DIR_KEY, None)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
