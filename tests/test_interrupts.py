"""Interrupts and hang-ups as a terminal, ssh or a scheduler deliver them: Ctrl-C typed on a real pseudo-terminal (the
line discipline signals the whole process group, the data-loading workers too), two hang-ups in a row, a hang-up to
figure3.py's runner, and the resume command of a script started by its path from another folder. Each ends in one
line, the exit code 128 + the signal, the last checkpoint kept, the lock released and no process left behind."""

from __future__ import annotations

import fcntl
import inspect
import json
import multiprocessing.resource_sharer
import os
import pty
import select
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import torch
from conftest import REPO, run_main

import create_dataset
import figure3
import model_vgg_single

# Many short epochs (3 batches of 10 images): a signal finds the run in the middle of one.
SLOW_EPOCHS = ["--epochs", "40", "--batch-size", "10", "--limit-batches", "3", "--no-download", "--device", "cpu"]


def on_terminal(cmd: list[str], cwd: Path) -> tuple[subprocess.Popen, int]:
    """Start `cmd` in a session of its own whose controlling terminal is a new pseudo-terminal; returns the process
    and the terminal's master side (what a terminal emulator reads and types into)."""
    master, slave = pty.openpty()

    def controlling_terminal():
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        cmd, cwd=cwd, stdin=slave, stdout=slave, stderr=slave, preexec_fn=controlling_terminal, env=env
    )
    os.close(slave)
    return process, master


def read_until(master: int, process: subprocess.Popen, text: str, seen: list[str], timeout: float = 240) -> None:
    """Read the terminal's output into `seen` until `text` appears (or the process ends)."""
    deadline = time.monotonic() + timeout
    while text not in "".join(seen):
        assert time.monotonic() < deadline and process.poll() is None, "".join(seen)
        if select.select([master], [], [], 0.2)[0]:
            try:
                seen.append(os.read(master, 65536).decode(errors="replace"))
            except OSError:  # the terminal's other side has closed
                return


def finish(master: int, process: subprocess.Popen, seen: list[str]) -> str:
    """Wait for the process; everything it printed on the terminal."""
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        if select.select([master], [], [], 0.2)[0]:
            try:
                seen.append(os.read(master, 65536).decode(errors="replace"))
            except OSError:
                break
    process.wait(timeout=60)
    os.close(master)
    return "".join(seen)


def group_is_gone(pgid: int) -> bool:
    """No process of the group is left (the loader's workers included), within a few seconds."""
    for _ in range(50):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_ctrl_c_on_a_terminal_with_loader_workers_is_one_line_and_the_resume_command(data_root, tmp_path):
    """The default --workers (the CPUs, at most 4): Ctrl-C reaches the workers too; they leave it to the run."""
    script = ["model_vgg_single.py", "--data-root", str(data_root), "--results-dir", str(tmp_path), *SLOW_EPOCHS]
    process, master = on_terminal([sys.executable, *script, "--run-name", "c"], REPO)
    seen: list[str] = []
    read_until(master, process, "epoch   1/40", seen)  # epoch 1 is saved
    time.sleep(0.5)  # and the next has started its workers
    os.write(master, b"\x03")  # what typing Ctrl-C sends: the terminal signals the foreground process group
    out = finish(master, process, seen)
    assert process.returncode == 130, out
    assert "Traceback" not in out and "DataLoader worker" not in out, out
    lines = [line for line in out.splitlines() if "interrupted" in line]
    assert len(lines) == 1 and "; the checkpoint after epoch " in lines[0], out
    assert lines[0].endswith(f"Resume with: python model_vgg_single.py {' '.join(script[1:])} --run-name c --resume")
    assert (tmp_path / "c" / "checkpoint.pt").is_file() and not (tmp_path / "c" / ".lock").exists()
    assert group_is_gone(process.pid)  # its session's group: the run and its workers


def test_two_hang_ups_in_a_row_stop_the_run_once(data_root, tmp_path):
    """A terminal closing, then its session: the second SIGHUP finds the run already stopping, and changes nothing."""
    cmd = [sys.executable, "model_vgg_single.py", "--data-root", str(data_root), "--results-dir", str(tmp_path)]
    process, master = on_terminal([*cmd, *SLOW_EPOCHS, "--run-name", "h"], REPO)
    seen: list[str] = []
    read_until(master, process, "epoch   1/40", seen)
    os.killpg(process.pid, signal.SIGHUP)
    os.killpg(process.pid, signal.SIGHUP)
    out = finish(master, process, seen)
    assert process.returncode == 129, out  # an exit, not a death by the signal (-1)
    assert "Traceback" not in out, out
    log = (tmp_path / "h" / "log.txt").read_text()
    assert log.count("interrupted") == 1 and "Resume with: " in log
    assert (tmp_path / "h" / "checkpoint.pt").is_file() and not (tmp_path / "h" / ".lock").exists()
    assert group_is_gone(process.pid)


def test_the_resume_command_is_the_script_as_it_was_invoked(data_root, tmp_path, monkeypatch):
    """Started by its path from another folder, the run's resume line names that path, which works from there."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = os.path.relpath(REPO / "model_vgg_single.py", elsewhere)
    epochs = ["--epochs", "3", "--batch-size", "10", "--limit-batches", "2", "--no-download", "--device", "cpu"]
    flags = ["--data-root", str(data_root), "--results-dir", str(tmp_path / "r"), *epochs, "--workers", "0"]
    process = subprocess.Popen(
        [sys.executable, script, *flags, "--run-name", "p"], cwd=elsewhere, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    while not (tmp_path / "r" / "p" / "metrics.json").exists():
        assert process.poll() is None, process.communicate()
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143 and "Traceback" not in stderr, stderr
    run_dir = tmp_path / "r" / "p"
    assert stderr.strip().splitlines()[-1] in (run_dir / "log.txt").read_text()  # the one line, also in the log
    assert not (run_dir / ".lock").exists()
    done = len(json.loads((run_dir / "metrics.json").read_text())["epochs"])
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert saved["next_epoch"] == len(saved["epochs"]) == done >= 1  # the checkpoint is the last epoch's
    resume = stderr.split("Resume with: ")[1].strip()
    assert resume.startswith(f"python {script} ") and resume.endswith("--run-name p --resume")
    # The command works from there: its script path is the script, seen from that folder, and its flags resume the
    # run (run in this process, from that folder: no second interpreter start-up).
    python, path, *resume_flags = resume.split()
    assert (elsewhere / path).resolve() == (REPO / "model_vgg_single.py").resolve()
    monkeypatch.chdir(elsewhere)
    again = run_main(model_vgg_single, *resume_flags)
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stdout
    assert [e["epoch"] for e in json.loads((run_dir / "metrics.json").read_text())["epochs"]] == [1, 2, 3]


def test_a_hang_up_to_the_grid_runner_stops_its_runs_and_the_same_command_resumes_them(data_root, tmp_path):
    """figure3.py run passes a SIGHUP on to its runs (in sessions of their own), which stop and keep their
    checkpoints; the same command afterwards resumes them. (SIGINT and SIGTERM: tests/test_figure3.py.)"""
    run = [
        sys.executable,
        "figure3.py",
        "run",
        "--methods",
        "single",
        "--pairs",
        "20-100",
        "--results-dir",
        str(tmp_path),
    ]
    flags = ["--", "--data-root", str(data_root), "--no-download", "--device", "cpu", "--batch-size", "10"]
    flags += ["--epochs", "3", "--limit-batches", "2"]
    runner = subprocess.Popen([*run, *flags], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = None
    while metrics is None:
        assert runner.poll() is None, runner.communicate()
        time.sleep(0.1)
        metrics = next(iter(tmp_path.glob("single-*/metrics.json")), None)
    runner.send_signal(signal.SIGHUP)
    runner.communicate(timeout=180)
    assert runner.returncode == 129
    run_dir = metrics.parent
    assert (run_dir / "checkpoint.pt").is_file() and not (run_dir / ".lock").exists()
    job_log = (tmp_path / "figure3" / "jobs" / f"{run_dir.name}.log").read_text()
    assert "interrupted" in job_log and "Traceback" not in job_log
    again = run_main(figure3, *run[2:], *flags)  # the same command, in this process: no interpreter start-up
    assert again.returncode == 0, again.stderr
    assert "--resume" in (tmp_path / "figure3" / "jobs" / f"{run_dir.name}.log").read_text().split("===")[-1]


def test_a_loader_worker_says_nothing_of_the_run_having_stopped_reading(monkeypatch):
    """A worker's resource-sharer thread (multiprocessing's: it hands the run a batch's shared memory) that finds its
    connection to a stopping run broken prints no traceback into the run's output; any other error it meets is still
    reported. That thread reports through sys.excepthook. (Here in this process, with the signal calls of a worker's
    start left out.)"""
    serve = inspect.getsource(multiprocessing.resource_sharer._ResourceSharer._serve)
    assert "sys.excepthook(*sys.exc_info())" in serve
    reported = []
    monkeypatch.setattr(sys, "excepthook", lambda kind, error, traceback: reported.append(kind))
    monkeypatch.setattr(create_dataset.signal, "signal", lambda *args: None)
    monkeypatch.setattr(create_dataset.signal, "pthread_sigmask", lambda *args: None)
    create_dataset.ignore_interrupts(0)  # a worker's start
    for error in (BrokenPipeError(32, "Broken pipe"), ConnectionResetError(104, "reset"), ValueError("other")):
        try:
            raise error
        except Exception:
            sys.excepthook(*sys.exc_info())  # as the resource sharer does
    assert reported == [ValueError]
