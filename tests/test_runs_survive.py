"""Runs that survive what users do to them: resume by the default name, two runs in one folder, seeds, run
names, non-finite numbers, leftovers of a killed run, psi written differently, interrupts before anything
was saved, failed starts, damaged checkpoints, warnings, abbreviated flags, debug runs, TensorBoard.

One test (or a group) per case a user hit; each failed before the run machinery handled it."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST, REPO, run_main

import experiment
import model_vgg_maxl as maxl
import model_vgg_single as single


def args(data_root: Path, results: Path, *extra) -> list[str]:
    return ["--data-root", str(data_root), "--results-dir", str(results), *FAST, *map(str, extra)]


def assert_refused(result, *phrases: str) -> None:
    """Exit code 2, one line on stderr starting with 'error:', containing each phrase, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])


def files_below(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def strict_json(path: Path) -> dict:
    """json.loads that refuses NaN and Infinity, as strict parsers do."""

    def refuse(constant: str):
        raise ValueError(f"{path} holds {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


def popen(script: str, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / script), *flags],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def wait_for(condition, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# --- 1. resume by the default name -------------------------------------------------------------


def test_resume_by_the_default_name_extends_a_finished_run(data_root, tmp_path):
    common = args(data_root, tmp_path, "--limit-batches", 1)
    assert run_main(single, *common, "--epochs", 2).returncode == 0
    (run_dir,) = tmp_path.iterdir()
    result = run_main(single, *common, "--epochs", 3, "--resume")
    assert result.returncode == 0, result.stderr
    assert f"resuming {run_dir} at epoch 3" in result.stdout
    assert [r["epoch"] for r in strict_json(run_dir / "metrics.json")["epochs"]] == [1, 2, 3]


# --- 2. seeds every generator accepts, checked up front ------------------------------------------


@pytest.mark.parametrize("seed", ["-1", "4294967296", "1180591620717411303424"])
def test_a_seed_out_of_range_is_refused_before_anything_is_written(data_root, tmp_path, seed):
    assert_refused(run_main(single, *args(data_root, tmp_path / "r"), "--seed", seed), "--seed must be between 0 and")
    assert not (tmp_path / "r").exists()


def test_the_largest_seed_runs(data_root, tmp_path):
    result = run_main(single, *args(data_root, tmp_path, "--epochs", 1, "--limit-batches", 1, "--seed", 2**32 - 1))
    assert result.returncode == 0, result.stderr


# --- 3. one run per folder at a time; a dead run's lock is taken over -----------------------------


def test_a_second_run_in_the_same_folder_is_refused_while_the_first_lives(data_root, tmp_path):
    flags = args(data_root, tmp_path, "--epochs", 1000, "--limit-batches", 1, "--run-name", "shared")
    first = popen("model_vgg_single.py", *flags, "--seed", "1")
    try:
        wait_for(lambda: (tmp_path / "shared" / "checkpoint.pt").exists(), first)
        before = (tmp_path / "shared" / "metrics.json").read_text()
        second = run_main(single, *flags, "--seed", 2, "--overwrite")
        assert_refused(second, f"'{tmp_path / 'shared'}' is in use by another run (pid {first.pid})")
        assert json.loads((tmp_path / "shared" / "metrics.json").read_text())["config"]["seed"] == 1
        assert before  # the first run's results are its own
    finally:
        first.kill()  # SIGKILL: no cleanup, the lock file stays behind with a dead pid
        first.communicate()
    assert (tmp_path / "shared" / ".lock").exists()
    assert experiment.lock_holder(tmp_path / "shared") is None
    done = len(json.loads((tmp_path / "shared" / "metrics.json").read_text())["epochs"])
    resumed = run_main(single, *flags, "--seed", 1, "--resume", "--epochs", done + 1)
    assert resumed.returncode == 0, resumed.stderr
    assert not (tmp_path / "shared" / ".lock").exists()  # released and removed at the end


def test_a_holder_on_another_host_is_named_with_its_host(tmp_path):
    """A shared filesystem: the lock file says which host holds the folder; its pid cannot be checked from here."""
    run_dir = tmp_path / "run"
    with experiment.RunFolder(run_dir):
        assert (run_dir / ".lock").read_text().split() == [str(os.getpid()), socket.gethostname()]
    run_dir.mkdir()
    (run_dir / ".lock").write_text(f"{os.getpid()} node17\n")  # a live pid here, but the record is node17's
    assert experiment.lock_holder(run_dir) is None
    fd = os.open(run_dir / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # stands for node17's run holding the lock
        with pytest.raises(experiment.UsageError, match=rf"in use by another run \(pid {os.getpid()} on node17\)"):
            experiment.RunFolder(run_dir).__enter__()
    finally:
        os.close(fd)
    assert (run_dir / ".lock").read_text() == f"{os.getpid()} node17\n"  # the refused run changed nothing


def test_the_lock_is_exclusive_within_a_process_too(tmp_path):
    """Two RunFolder holders of one folder: the second is refused, naming this process."""
    with experiment.RunFolder(tmp_path / "run") as run_dir:
        assert experiment.lock_holder(run_dir) == os.getpid()
        with pytest.raises(experiment.UsageError, match=rf"in use by another run \(pid {os.getpid()}\)"):
            experiment.RunFolder(tmp_path / "run").__enter__()
    assert experiment.lock_holder(tmp_path / "run") is None and not (tmp_path / "run").exists()


# --- 4. a bound on the auxiliary classes ---------------------------------------------------------


def test_a_huge_psi_is_refused_with_the_memory_it_would_take(data_root, tmp_path):
    result = run_main(maxl, *args(data_root, tmp_path / "r"), "--psi", "100000")
    assert_refused(result, "2000000 auxiliary classes", "GiB", "at most 10000")
    assert not (tmp_path / "r").exists()


# --- 5. run names are plain names inside the results folder ---------------------------------------


@pytest.mark.parametrize("name", ["../escape", "/abs/path", ".", "..", "a/b", "-x", ""])
def test_a_run_name_that_is_not_a_plain_name_is_refused(data_root, tmp_path, name):
    results = tmp_path / "deep" / "results"
    result = run_main(single, *args(data_root, results, "--epochs", 1, "--limit-batches", 1), f"--run-name={name}")
    if name == "":  # the default name
        assert result.returncode == 0, result.stderr
        return
    assert_refused(result, "is not a plain folder name")
    assert files_below(tmp_path) == []


# --- 6. every recorded number finite, strict JSON -------------------------------------------------


def test_a_non_finite_test_loss_stops_the_run_and_nothing_holds_nan(data_root, tmp_path):
    """One step with a huge learning rate: the training loss of that step is still finite, the test loss not."""
    result = run_main(single, *args(data_root, tmp_path, "--epochs", 2, "--limit-batches", 1, "--lr", "1e30"))
    assert_refused(result, "non-finite test_primary_loss", "at epoch 1", "nothing was saved")
    assert files_below(tmp_path) == []


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_a_non_finite_setting_is_refused(data_root, tmp_path, value):
    assert_refused(run_main(maxl, *args(data_root, tmp_path), f"--entropy-weight={value}"), "--entropy-weight must be")


def test_metrics_json_is_strict_json(data_root, tmp_path):
    assert (
        run_main(maxl, *args(data_root, tmp_path, "--epochs", 1, "--limit-batches", 1, "--batch-size", 4)).returncode
        == 0
    )
    (run_dir,) = tmp_path.iterdir()
    metrics = strict_json(run_dir / "metrics.json")
    assert all(math.isfinite(v) for record in metrics["epochs"] for v in record.values())


# --- 7. leftovers of a killed checkpoint write ----------------------------------------------------


def test_temporary_files_of_a_killed_run_are_removed_at_the_next_start(data_root, tmp_path):
    common = args(data_root, tmp_path, "--limit-batches", 1, "--run-name", "r")
    assert run_main(single, *common, "--epochs", 1).returncode == 0
    leftovers = [tmp_path / "r" / ".checkpoint.pt.abc123.tmp", tmp_path / "r" / ".metrics.json.x9.tmp"]
    for leftover in leftovers:
        leftover.write_bytes(b"\0" * 1000)
    assert run_main(single, *common, "--epochs", 2, "--resume").returncode == 0
    assert files_below(tmp_path / "r") == ["checkpoint.pt", "metrics.json"]


# --- 8. psi compared as the parsed list -----------------------------------------------------------


def test_the_same_psi_written_differently_resumes(data_root, tmp_path):
    common = args(data_root, tmp_path, "--limit-batches", 1, "--run-name", "r", "--primary-level", 3, "--batch-size", 4)
    assert run_main(maxl, *common, "--epochs", 1, "--psi", " 5 ").returncode == 0
    resumed = run_main(maxl, *common, "--epochs", 2, "--resume", "--psi", "5,5,5")
    assert resumed.returncode == 0, resumed.stderr
    assert len(strict_json(tmp_path / "r" / "metrics.json")["epochs"]) == 2


def test_a_checkpoint_of_psi_as_text_compares_as_the_list(tmp_path):
    """Older checkpoints hold psi as its text ('5'): it compares equal to the parsed list of this run."""
    cfg = maxl.check_config(maxl.Config(primary_level=3, psi="5,5,5"))
    saved = {**dataclasses.asdict(cfg), "psi": " 5 ", "aux_level": None}
    assert experiment.settings_as_checked(maxl.METHOD, saved) == dataclasses.asdict(cfg)


# --- 9, 10. an interrupt before anything was saved; failed starts leave nothing ------------------


def test_an_interrupt_in_the_first_epoch_offers_no_resume_and_leaves_no_folder(data_root, tmp_path):
    process = popen("model_vgg_maxl.py", *args(data_root, tmp_path / "results", "--epochs", 1))
    wait_for(lambda: (tmp_path / "results").exists() and any((tmp_path / "results").iterdir()), process)
    # The start line is printed just before the first step.
    wait_for(lambda: process.stdout.readline().startswith("maxl: "), process)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "interrupted in epoch 1; no epoch was completed and nothing was saved" in stderr
    assert "--resume" not in stderr and "Traceback" not in stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    "case",
    ["missing data", "bad seed", "huge psi", "bad checkpoint"],
)
def test_a_failed_start_leaves_no_empty_folder(data_root, tmp_path, case):
    results = tmp_path / "results"
    flags = {
        "missing data": args(tmp_path / "nowhere", results),
        "bad seed": [*args(data_root, results), "--seed", "-5"],
        "huge psi": [*args(data_root, results), "--psi", "900"],
        "bad checkpoint": [*args(data_root, results), "--resume", "--run-name", "never-ran"],
    }[case]
    assert run_main(maxl, *flags).returncode == 2
    assert not results.exists()


# --- 11. a checkpoint with the right settings and a missing entry ---------------------------------


@pytest.mark.parametrize("entry", ["model", "optimizer", "rng"])
def test_a_checkpoint_missing_an_entry_is_reported_as_incomplete(data_root, tmp_path, entry):
    common = args(data_root, tmp_path, "--limit-batches", 1, "--run-name", "r")
    assert run_main(single, *common, "--epochs", 1).returncode == 0
    path = tmp_path / "r" / "checkpoint.pt"
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint[entry]
    torch.save(checkpoint, path)
    before = path.read_bytes()
    assert_refused(run_main(single, *common, "--epochs", 2, "--resume"), f"is incomplete (no {entry})")
    assert path.read_bytes() == before


# --- 12. no warnings about torch's internals or the machine ---------------------------------------


def test_a_default_maxl_run_prints_no_warnings(data_root, tmp_path):
    """Default --workers (the CPUs this process may use, at most 4) and the forward-mode meta-gradient."""
    flags = ["--data-root", data_root, "--results-dir", tmp_path, "--no-download", "--device", "cpu"]
    result = subprocess.run(
        [sys.executable, str(REPO / "model_vgg_maxl.py"), *map(str, flags), "--batch-size", "4", "--epochs", "1"]
        + ["--limit-batches", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr


def test_default_workers_fit_the_machine():
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert experiment.default_workers() == min(4, cpus)


# --- 13. no abbreviated flags ---------------------------------------------------------------------


def test_an_abbreviated_flag_is_refused(data_root, tmp_path):
    assert_refused(run_main(single, *args(data_root, tmp_path), "--epoch", "3"), "unrecognized arguments: --epoch 3")
    assert files_below(tmp_path) == []


# --- 14. a debug run says so ----------------------------------------------------------------------


def test_a_limited_run_on_synthetic_data_says_so_and_prints_no_published_figure(data_root, tmp_path):
    result = run_main(maxl, *args(data_root, tmp_path, "--epochs", 1, "--limit-batches", 1, "--batch-size", 4))
    assert result.returncode == 0, result.stderr
    (run_dir,) = tmp_path.iterdir()
    assert run_dir.name.startswith("maxl-second-order-pri20-aux100-seed0-") and run_dir.name.endswith("-limit1")
    last = result.stdout.strip().splitlines()[-1]
    assert "76.6" not in last and "published:" not in last
    assert (
        "not comparable with the published figures "
        "(--batch-size 4, --limit-batches 1, synthetic data, 1 of the paper's 200 epochs)" in last
    )
    summary = strict_json(run_dir / "metrics.json")["summary"]
    assert summary["comparable_with_published"] is False
    assert summary["published_test_primary_acc"]["WAMAL authors' README"] == 76.6


def test_only_the_papers_setup_is_comparable(tmp_path):
    cfg = experiment.check_settings(maxl.METHOD, maxl.Config(data_root=str(tmp_path)))
    assert experiment.not_comparable(maxl.METHOD, cfg, 200) == []
    assert experiment.not_comparable(maxl.METHOD, cfg, 150) == ["150 of the paper's 200 epochs"]
    assert experiment.not_comparable(
        maxl.METHOD, experiment.check_settings(maxl.METHOD, maxl.Config(data_root=str(tmp_path), lr=0.02)), 200
    ) == ["--lr 0.02"]


# --- TensorBoard ----------------------------------------------------------------------------------


def test_tensorboard_without_the_package_is_one_line(data_root, tmp_path, monkeypatch):
    monkeypatch.setattr(experiment.importlib.util, "find_spec", lambda name: None)
    assert_refused(run_main(single, *args(data_root, tmp_path / "r"), "--tensorboard"), "pip install tensorboard")
    assert not (tmp_path / "r").exists()


def test_tensorboard_writes_every_epochs_numbers(data_root, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    flags = args(data_root, tmp_path, "--epochs", 2, "--limit-batches", 1, "--run-name", "tb")
    result = run_main(single, *flags, "--tensorboard")
    assert result.returncode == 0, result.stderr
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    history = strict_json(tmp_path / "tb" / "metrics.json")["epochs"]
    for name in ("train_primary_loss", "test_primary_acc"):
        scalars = events.Scalars(name)
        assert [s.step for s in scalars] == [1, 2]
        assert [s.value for s in scalars] == pytest.approx([r[name] for r in history])


# --- settings that contradict themselves or the data; file modes ---------------------------------


@pytest.mark.parametrize("module", [single, maxl], ids=["single", "maxl"])
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr-gamma", "0"], "--lr-gamma must be positive and finite (got 0.0)"),
        (["--lr-gamma", "-1"], "--lr-gamma must be positive and finite (got -1.0)"),
        (["--focal-gamma", "-5"], "--focal-gamma must be 0 or more (got -5.0)"),
        (["--resume", "--overwrite"], "--resume continues a run and --overwrite starts it over; give one of them"),
    ],
)
def test_settings_that_cannot_mean_what_they_say_are_refused(data_root, tmp_path, module, flags, message):
    result = run_main(module, *args(data_root, tmp_path / "r"), "--limit-batches", 1, *flags)
    assert_refused(result, message)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_results_files_get_the_mode_the_umask_gives(data_root, tmp_path, umask, mode):
    """Written to a private temporary file and renamed, the results still get a new file's usual mode."""
    previous = os.umask(umask)
    try:
        result = run_main(single, *args(data_root, tmp_path, "--epochs", 1, "--limit-batches", 1, "--run-name", "m"))
    finally:
        os.umask(previous)
    assert result.returncode == 0, result.stderr
    for name in ("metrics.json", "checkpoint.pt"):
        assert (tmp_path / "m" / name).stat().st_mode & 0o777 == mode, name
