"""Shared fixtures: a small synthetic CIFAR-100 in the real on-disk format, and a script runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from create_dataset import make_synthetic_cifar100  # noqa: E402

# Flags that keep a script run small and on the CPU.
FAST = ["--no-download", "--device", "cpu", "--workers", "0", "--batch-size", "20"]


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """200 train and 100 test images written as cifar-100-python/{train,test,meta} plus the md5 marker."""
    return make_synthetic_cifar100(tmp_path_factory.mktemp("cifar") / "data", n_train=200, n_test=100, seed=0)


def run_script(script: str, *args: str, timeout: float = 240, **popen_kwargs) -> subprocess.CompletedProcess:
    """Run a model script from the repository root in a fresh interpreter."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **popen_kwargs,
    )
