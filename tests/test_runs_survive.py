"""Runs that survive what users do to them: resume by the default name, two runs in one folder, seeds, run
names, non-finite numbers, leftovers of a killed run, psi written differently, interrupts before anything
was saved, failed starts, damaged checkpoints, warnings, abbreviated flags, debug runs, TensorBoard.

One test (or a group) per case a user hit; each failed before the run machinery handled it."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
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

import create_dataset
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
        # metrics.json is written just after checkpoint.pt: wait for it, or the read below may come in between.
        wait_for(lambda: (tmp_path / "shared" / "metrics.json").exists(), first)
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
    assert run_main(maxl, *args(data_root, tmp_path, "--epochs", 1, "--limit-batches", 1)).returncode == 0
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
    assert files_below(tmp_path / "r") == ["checkpoint.pt", "log.txt", "metrics.json"]


# --- 8. psi compared as the parsed list -----------------------------------------------------------


def test_the_same_psi_written_differently_resumes(data_root, tmp_path):
    common = args(data_root, tmp_path, "--limit-batches", 1, "--run-name", "r", "--primary-level", 3)
    assert run_main(maxl, *common, "--epochs", 1, "--psi", " 5 ").returncode == 0
    resumed = run_main(maxl, *common, "--epochs", 2, "--resume", "--psi", "5,5,5")
    assert resumed.returncode == 0, resumed.stderr
    assert len(strict_json(tmp_path / "r" / "metrics.json")["epochs"]) == 2


def test_a_checkpoint_of_psi_as_text_compares_as_the_list(tmp_path):
    """Older checkpoints hold psi as its text ('5'), and none of the settings added since: the text compares equal
    to the parsed list of this run, and a missing setting as the script's default."""
    cfg = maxl.check_config(maxl.Config(primary_level=3, psi="5,5,5"))
    saved = {**experiment.settings(cfg), "psi": " 5 ", "aux_level": None, "method": "maxl"}
    del saved["tensorboard"]  # a setting this checkpoint predates
    torch.save({"config": saved, "next_epoch": 1}, tmp_path / "checkpoint.pt")
    assert experiment.load_checkpoint(tmp_path / "checkpoint.pt", "maxl", cfg)["config"] == saved
    other = maxl.check_config(maxl.Config(primary_level=3, psi="5,5,4"))
    with pytest.raises(experiment.UsageError, match=r"was written with --psi +5 +but this run has --psi 5,5,4"):
        experiment.load_checkpoint(tmp_path / "checkpoint.pt", "maxl", other)


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
    assert create_dataset.default_workers() == min(4, cpus)


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
    cfg = maxl.check_config(maxl.Config(data_root=str(tmp_path)))
    assert experiment.not_comparable(cfg, maxl.paper_settings(cfg), 200) == []
    assert experiment.not_comparable(cfg, maxl.paper_settings(cfg), 150) == ["150 of the paper's 200 epochs"]
    edited = maxl.check_config(maxl.Config(data_root=str(tmp_path), lr=0.02))
    assert experiment.not_comparable(edited, maxl.paper_settings(edited), 200) == ["--lr 0.02"]


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


# --- faults during a run: a full disk ----------------------------------------------------------


def test_a_full_disk_stops_the_run_with_one_line_and_the_resume_command(data_root, tmp_path, monkeypatch):
    real_write_bytes = Path.write_bytes
    writes = {"checkpoint": 0}

    def full_on_the_second_checkpoint(path, data):
        if ".checkpoint.pt." in path.name:
            writes["checkpoint"] += 1
            if writes["checkpoint"] == 2:
                real_write_bytes(path, bytes(data)[:1000])  # part of it fits, then the disk is full
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_bytes(path, data)

    monkeypatch.setattr(Path, "write_bytes", full_on_the_second_checkpoint)
    flags = args(data_root, tmp_path, "--epochs", 3, "--limit-batches", 1, "--run-name", "full")
    result = run_main(single, *flags)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith("error: could not write checkpoint.pt in ") and "(No space left on device)" in line
    assert "the checkpoint after epoch 1 in" in line and "is kept. Resume with: " in line and "--resume" in line
    assert files_below(tmp_path / "full") == ["checkpoint.pt", "log.txt", "metrics.json"]  # no temp file, no lock
    assert torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["next_epoch"] == 1
    assert len(strict_json(tmp_path / "full" / "metrics.json")["epochs"]) == 1
    assert line in (tmp_path / "full" / "log.txt").read_text()
    monkeypatch.undo()
    assert run_main(single, *flags, "--resume").returncode == 0
    assert len(strict_json(tmp_path / "full" / "metrics.json")["epochs"]) == 3


# --- run folders and names ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, message",
    [
        ("x" * 300, "--run-name has 300 characters; at most 200 make a folder name"),
        ("figure3", "--run-name figure3 is reserved: figure3.py keeps its report, picture and job logs"),
    ],
    ids=["too-long", "reserved"],
)
def test_run_names_no_folder_can_hold_are_refused(data_root, tmp_path, name, message):
    assert_refused(run_main(single, *args(data_root, tmp_path / "r"), "--run-name", name), message)
    assert not (tmp_path / "r").exists()


def test_a_folder_holding_files_no_run_wrote_is_refused(data_root, tmp_path):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "chapter1.tex").write_text("precious")
    result = run_main(single, *args(data_root, tmp_path), "--run-name", "thesis", "--overwrite")
    assert_refused(result, "holds files no run of this project wrote (chapter1.tex)")
    assert files_below(folder) == ["chapter1.tex"]


def test_a_finished_run_resumed_at_its_epochs_takes_no_folder_and_writes_nothing(data_root, tmp_path, monkeypatch):
    """Read-only storage (a finished run on an archive): the summary, and not a single write."""
    flags = args(data_root, tmp_path, "--epochs", 1, "--limit-batches", 1, "--run-name", "done")
    assert run_main(single, *flags).returncode == 0
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "done").iterdir()}

    def no_folder(path):
        raise AssertionError("the run folder was taken")

    monkeypatch.setattr(experiment, "RunFolder", no_folder)
    result = run_main(single, *flags, "--resume")
    assert result.returncode == 0, result.stderr
    assert "already finished 1 epoch;" in result.stdout and "final test primary accuracy" in result.stdout
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "done").iterdir()} == before


# --- messages -----------------------------------------------------------------------------------


def test_an_interrupt_after_the_epoch_was_saved_says_so(data_root, tmp_path, monkeypatch):
    def interrupted_line(record, epochs):
        raise experiment.Interrupted(signal.SIGINT)

    monkeypatch.setattr(single, "epoch_line", interrupted_line)  # the signal arrives just after the save
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as exit_info, contextlib.redirect_stderr(io.StringIO()) as stderr:
        single.main(args(data_root, tmp_path, "--limit-batches", 1, "--run-name", "i"))
    signal.signal(signal.SIGINT, previous)  # an interrupted run ignores further signals until its process ends
    assert exit_info.value.code == 130
    assert "interrupted after epoch 1 was saved; the checkpoint after epoch 1 is in" in stderr.getvalue()


def test_resume_of_a_default_name_that_is_not_there_says_what_made_the_name(data_root, tmp_path):
    common = args(data_root, tmp_path, "--epochs", 1, "--limit-batches", 1)
    assert run_main(single, *common).returncode == 0
    result = run_main(single, *common, "--lr", "0.02", "--resume")
    assert_refused(result, "--resume: no checkpoint at", "these settings differ from the paper's: ")
    assert "--lr 0.02" in result.stderr and "single runs in" in result.stderr
    assert "single-pri20-seed0-" in result.stderr.split("single runs in")[1]  # the run that is there


def test_no_published_figure_says_why(data_root, tmp_path):
    result = run_main(single, *args(data_root, tmp_path, "--epochs", 1, "--limit-batches", 1, "--primary-level", 3))
    assert "published: none for this configuration (the MAXL paper shows Single only as a curve" in result.stdout
    assert "its successors report it at primary 20 only)" in result.stdout
    assert "mean of the last 1 epoch " in result.stdout


@pytest.mark.parametrize("module", [single, maxl], ids=["single", "maxl"])
def test_help_shows_each_default_once_and_none_empty(module):
    entries = experiment.command_line(module.Config, module.__doc__).format_help().split("\n  --")
    for entry in entries:
        text = " ".join(entry.split())
        assert text.count("(default:") <= 1 and "(default: None)" not in text and "(default: )" not in text, text


# --- --smoke accepts only what it uses, and fails when its run does not train ---------------------


def test_smoke_refuses_the_flags_it_sets_itself(tmp_path):
    result = run_main(single, "--smoke", "--epochs", 5, "--results-dir", tmp_path / "x", "--data-root", "/nonexistent")
    assert_refused(result, "--smoke sets --data-root --epochs --results-dir itself")
    assert not (tmp_path / "x").exists()


def test_a_smoke_run_that_diverges_fails():
    result = run_main(single, "--smoke", "--lr", 0.5)
    assert_refused(result, "smoke test failed: the test loss went from", "training diverged")
    assert "smoke test passed" not in result.stdout


# --- progress on a terminal ---------------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_one_line_redrawn_at_most_once_a_second(monkeypatch):
    clock = {"now": 100.0}
    monkeypatch.setattr(experiment.time, "perf_counter", lambda: clock["now"])
    terminal = Terminal()
    progress = experiment.Progress()
    progress.start(terminal, epochs=3)
    progress.start_epoch(1)
    for step in range(10):
        clock["now"] += 0.25  # four steps a second, 100 images each
        progress.update("phase 1", step, 10, 100)
    draws = terminal.getvalue().split("\r\033[K")[1:]
    assert len(draws) == 3  # 2.5 s of steps: drawn at 0.25 s, then once a second
    assert all(", 400 img/s, " in draw for draw in draws)
    assert draws[0].startswith("epoch 1/3 phase 1: step 2/10, 400 img/s, epoch left 0:00:02")
    assert draws[-1].startswith("epoch 1/3 phase 1: step 10/10, 400 img/s, epoch left 0:00:00")
    assert "run left ?" in draws[-1]  # no epoch finished yet: no estimate for the run
    progress.end_epoch()
    assert terminal.getvalue().endswith("\r\033[K")  # cleared before the epoch line is printed
    progress.start_epoch(2)
    for step in range(3):
        clock["now"] += 1.0
        progress.update("phase 1", step, 10, 100)
    assert "run left 0:00:" in terminal.getvalue().split("\r\033[K")[-1]


def test_progress_is_silent_off_a_terminal_and_never_in_the_log(data_root, tmp_path, monkeypatch):
    progress = experiment.Progress()
    pipe = io.StringIO()
    progress.start(pipe, epochs=2)
    progress.start_epoch(1)
    for step in range(5):
        progress.update("train", step, 5, 20)
    assert pipe.getvalue() == ""
    terminal = Terminal()
    monkeypatch.setattr(experiment.Progress, "update", lambda self, *a: self.stream.write("\r\033[Kdrawn"))
    monkeypatch.setattr(sys, "stderr", terminal)
    flags = args(data_root, tmp_path, "--epochs", 1, "--limit-batches", 2, "--run-name", "p")
    single.main(flags)
    assert "drawn" in terminal.getvalue() and "drawn" not in (tmp_path / "p" / "log.txt").read_text()


# --- provenance ---------------------------------------------------------------------------------


def test_metrics_and_log_record_where_when_and_with_what_each_session_ran(data_root, tmp_path):
    flags = args(data_root, tmp_path, "--limit-batches", 1, "--run-name", "prov")
    assert run_main(single, *flags, "--epochs", 1).returncode == 0
    assert run_main(single, *flags, "--epochs", 2, "--resume").returncode == 0
    metrics = strict_json(tmp_path / "prov" / "metrics.json")
    first, second = metrics["provenance"]
    keys = {"code", "host", "started", "ended", "command", "python", "torch", "torchvision", "cuda", "device"}
    assert set(first) == set(second) == keys and first["host"] == socket.gethostname()
    assert first["started"] <= first["ended"] <= second["started"] <= second["ended"]
    assert second["command"].startswith("python ") and "--resume" in second["command"]
    assert set(first["code"]) == {"commit", "modified"} and first["device"].startswith("cpu")
    assert [record["lr"] for record in metrics["epochs"]] == [0.01, 0.01] and all(
        r["seconds"] > 0 for r in metrics["epochs"]
    )
    log = (tmp_path / "prov" / "log.txt").read_text()
    assert log.count("# command: ") == 2 and log.count("# code: ") == 2 and "torchvision" in log
    assert "resuming" in log and log.count("final test primary accuracy") == 2


def test_every_optimisers_learning_rate_is_recorded_per_epoch(data_root, tmp_path):
    """Each epoch records the learning rate every optimiser trained it with: lr (the network's), lr_gen (MAXL's
    label generator), after the epoch's numbers."""
    flags = args(data_root, tmp_path, "--epochs", 2, "--limit-batches", 1, "--run-name", "lr", "--lr-step", 1)
    assert run_main(maxl, *flags, "--gen-lr", "0.004").returncode == 0
    epochs = strict_json(tmp_path / "lr" / "metrics.json")["epochs"]
    assert [(e["lr"], e["lr_gen"]) for e in epochs] == [(0.01, 0.004), (0.005, 0.002)]
    assert list(epochs[0])[-3:] == ["lr", "lr_gen", "seconds"]


def test_a_batch_larger_than_the_training_set_is_refused(data_root, tmp_path):
    assert_refused(
        run_main(single, *args(data_root, tmp_path / "r"), "--batch-size", 10**12),
        "--batch-size 1000000000000 is more than the 200 training images; choose at most 200",
    )
    assert not (tmp_path / "r").exists()


def test_a_finished_run_with_damaged_metrics_gets_them_back_from_its_checkpoint(data_root, tmp_path):
    flags = args(data_root, tmp_path, "--epochs", 1, "--limit-batches", 1, "--run-name", "cut")
    assert run_main(single, *flags).returncode == 0
    whole = strict_json(tmp_path / "cut" / "metrics.json")
    (tmp_path / "cut" / "metrics.json").write_text(json.dumps(whole)[:300])
    result = run_main(single, *flags, "--resume")
    assert result.returncode == 0 and "rewrote its damaged metrics.json from the checkpoint" in result.stdout
    assert strict_json(tmp_path / "cut" / "metrics.json") == whole
    assert files_below(tmp_path / "cut") == ["checkpoint.pt", "log.txt", "metrics.json"]
