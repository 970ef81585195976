"""Shared fixtures: a small synthetic CIFAR-100 in the real on-disk format, and ways to run a model script."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

# Each test process (pytest-xdist worker) gets its share of the cores, and so do the scripts it starts:
# more OpenMP threads than cores spin against each other and slow everything down.
if "PYTEST_XDIST_WORKER" in os.environ:  # a worker (the controlling process runs no test and sets nothing)
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))

# Temporary folders (tmp_path, and the temporary folders of the scripts this suite starts) in memory where the machine
# has room there: every epoch of a run writes and fsyncs a checkpoint of one or two VGG-16s (120-250 MB), which on a
# disk costs about a second each. Where /dev/shm is small (a container's 64 MB) or TMPDIR is set, nothing changes;
# MAXL_TESTS_TMP_ON_DISK=1 keeps them on disk.
SHM, SHM_NEEDED = Path("/dev/shm"), 8 * 2**30
if not os.environ.get("TMPDIR") and not os.environ.get("MAXL_TESTS_TMP_ON_DISK") and SHM.is_dir():
    with contextlib.suppress(OSError):
        shm = os.statvfs(SHM)
        if shm.f_bavail * shm.f_frsize >= SHM_NEEDED and os.access(SHM, os.W_OK | os.X_OK):
            os.environ["TMPDIR"] = str(SHM)  # inherited by the pytest-xdist workers and every child
            import tempfile

            tempfile.tempdir = None  # gettempdir() reads TMPDIR again

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from create_dataset import make_synthetic_cifar100  # noqa: E402

# Flags that keep a script run small and on the CPU: batches of 4 images (a test that needs another size says so).
FAST = ["--no-download", "--device", "cpu", "--workers", "0", "--batch-size", "4"]


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """200 train and 100 test images written as cifar-100-python/{train,test,meta} plus the md5 marker."""
    return make_synthetic_cifar100(tmp_path_factory.mktemp("cifar") / "data", n_train=200, n_test=100, seed=0)


def run_script(script: str, *args: str, timeout: float = 240, **popen_kwargs) -> subprocess.CompletedProcess:
    """Run a model script from the repository root in a fresh interpreter, as a user does."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **popen_kwargs,
    )


def run_main(module: ModuleType, *args: str) -> SimpleNamespace:
    """A script's main() in this process (no interpreter start-up): returncode, stdout and stderr as run_script
    gives them. An exception other than SystemExit propagates, i.e. fails the test as a traceback would."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            module.main([str(a) for a in args])
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def checked(module: ModuleType, **fields):
    """A script's Config with these fields, checked as the script checks it (its derived defaults resolved)."""
    return module.check_config(module.Config(**fields))


def default_name(module: ModuleType, cfg) -> str:
    """The default run name the script gives a checked config."""
    import experiment

    return experiment.run_name(cfg, module.run_name_stem(cfg), module.paper_settings(cfg))


# ---------------------------------------------------------------------------------------------
# Real images: Fashion-MNIST's original files, as Debian's package dataset-fashion-mnist installs them (.ci/run
# installs it). A test that needs them skips without them, except where REAL_DATA_REQUIRED is set (CI): there it fails.
FASHION_MNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
REAL_DATA_REQUIRED = os.environ.get("REAL_DATA_REQUIRED", "") not in ("", "0")
REAL_SUBSET = {"n_train": 300, "n_test": 500, "seed": 0}  # the subset README's table is measured on


@pytest.fixture(scope="session")
def fashion_mnist_subset(tmp_path_factory) -> Path:
    """The data root of a fixed subset of the real Fashion-MNIST (REAL_SUBSET: the same images on every machine)."""
    from create_dataset import IDX_FILES, write_subset

    present = [any((FASHION_MNIST_DIR / name).with_suffix(s).exists() for s in ("", ".gz")) for name in IDX_FILES]
    if not all(present):
        why = f"real Fashion-MNIST not in {FASHION_MNIST_DIR}: apt-get install dataset-fashion-mnist"
        why += " (or set FASHION_MNIST_DIR to the folder of its four files)"
        if REAL_DATA_REQUIRED:
            pytest.fail(f"{why}; REAL_DATA_REQUIRED is set (CI)")
        pytest.skip(why)
    root = tmp_path_factory.mktemp("fashion-mnist") / "data"
    write_subset("fashion-mnist", FASHION_MNIST_DIR, root, **REAL_SUBSET)
    return root


# ---------------------------------------------------------------------------------------------
# Order: the longest modules first (the float64 groups, each one unit on one worker, and the real-image runs), so that
# pytest-xdist hands out the short tests last and the two workers finish together; within a module, as written.
FIRST = ["test_maxl_math.py", "test_real_images.py", "test_wamal.py", "test_figure3.py", "test_interrupts.py"]


def pytest_collection_modifyitems(items: list) -> None:
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))
