"""The grid runner of figure3.py and tables.py. A grid's runs are model scripts, each run as itself in its own folder
<results-dir>/<run-name>/ (the name the script itself chooses); the runner reads their state from those folders, plans
them, runs them here (a pool of jobs on GPU slots, a job log each, Ctrl-C forwarded, progress and time left) or on
SLURM through submitit, finds them again by the settings their metrics.json records, and reports them. A tool makes
its runs (checked_config, run_of) and hands tool_main a Grid: the runs, its results table and report's files.
Behaviour and messages: docs/reliability.md, "figure3.py and tables.py: the grid (runner.py)".
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import fcntl
import importlib
import io
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, TextIO

import experiment
from experiment import OneLineParser, UsageError, plural

if TYPE_CHECKING:  # an optional extra, for annotations only: imported where used
    from submitit.helpers import DelayedSubmission

HERE = Path(__file__).resolve().parent
JOBS_FOLDER = "jobs"  # in the tool's folder in --results-dir: <run-name>.log, what the children of that run printed
EXTRAS = "pip install -r requirements-extras.txt"
LAST_EPOCHS = 5  # the paper reports the mean test accuracy of the last 5 epochs
POLL_SECONDS = 0.1  # how often `run` looks at its children
PROGRESS_SECONDS = 5.0  # `run` prints a progress line at most this often, and only when an epoch has ended
STOP_WAIT_SECONDS = 60  # how long a stopped child may take to finish writing before it is killed
MAX_TIMEOUT_REQUEUES = 20  # a run longer than --time goes on in further jobs, each resuming the last one's checkpoint
# Every method the tools know, in their order, with its label. Its script is model_vgg_<name>.py beside this file.
METHODS = {"single": "Single", "human": "Human", "maxl": "MAXL", "wamal": "WAMAL", "maoal": "MAOAL"}
PRIMARY_ONLY = {"single"}  # the methods trained without an auxiliary level (--aux-level)
# Recorded settings that say where a run was written, not what it computed: not shown as a difference.
BOOKKEEPING = {"run_name", "results_dir", "resume", "overwrite", "smoke", "download", "workers", "tensorboard"}
# The data and network settings as a run recorded before they existed ran them: the paper's.
RECORDED_DEFAULTS = {"dataset": "cifar100", "backbone": "vgg16", "stem": None, "pretrained": False}
RECORDED_DEFAULTS |= {"image_size": 32, "train_fraction": 1.0, "aux_weight": 1.0}


# ---------------------------------------------------------------------------------------------
# A grid's runs: which script, with which flags, in which folder (each script decides, as when run itself)


def script_path(method: str) -> Path:
    return HERE / f"model_vgg_{method}.py"


def script(method: str) -> ModuleType:
    """The method's model script (importing one trains nothing): its Config and its settings' functions."""
    return importlib.import_module(f"model_vgg_{method}")


def parse_methods(text: str) -> tuple[str, ...]:
    names = [name.strip() for name in text.split(",")]
    for name in names:
        if name not in METHODS:
            raise UsageError(f"--methods: unknown method {name!r}; choose from {', '.join(METHODS)}")
        if not script_path(name).is_file():
            raise UsageError(f"--methods {name}: its script {script_path(name).name} is not in {HERE}")
    return tuple(name for name in METHODS if name in names)


def parse_seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = [int(item) for item in text.split(",")]
    except ValueError:
        raise UsageError(f"--seeds {text!r} is not a comma list of integers (e.g. --seeds 0,1,2)") from None
    if min(seeds) < 0:
        raise UsageError(f"--seeds {text}: seeds are 0 or more")
    return tuple(dict.fromkeys(seeds))


def sets_itself(tool: str, results_dir: str, runs: str = "grid's", script: str = "<method>") -> dict[str, str]:
    """The script flags every tool sets itself (field -> what to use instead): `tool` names it in the reasons."""
    return {
        "seed": "use --seeds",
        "results_dir": f"use {results_dir}--results-dir, before --",
        "run_name": f"{tool} finds every run by its default name",
        "resume": f"{tool} resumes what stopped and never redoes a finished run",
        "overwrite": f"{tool} never redoes a finished run; remove its folder to start it over",
        "smoke": f"the {runs} runs are real runs",
        "help": f"see python model_vgg_{script}.py --help",
    }


def script_flags(tokens: Sequence[str], methods: Sequence[str], sets: dict[str, str], who: str) -> dict[str, list]:
    """The flags after `--` each method's script gets: those it has (`--lr 0.1`, `--lr=0.1`, `--amp`). A flag none
    of them has, or one the tool `who` sets itself (`sets`: its field -> what to use instead), is refused."""
    spellings = {method: {"--help": ("help", False), "-h": ("help", False)} for method in methods}
    for method in methods:  # flag -> (field, takes a value): one flag per Config field, the scripts' contract
        for f in experiment.fields(script(method).Config):
            spellings[method][experiment.flag(f.name)] = (f.name, f.type != "bool")
            if f.type == "bool":
                spellings[method][experiment.flag(f"no_{f.name}")] = (f.name, False)
    known = {flag: spec for method in methods for flag, spec in spellings[method].items()}
    groups, i = [], 0
    while i < len(tokens):
        flag = tokens[i].split("=", 1)[0]
        if flag not in known:
            hint = "flags of the model scripts start with --" if not flag.startswith("-") else "see their --help"
            raise UsageError(f"after --: {flag!r} is not a flag of the selected model scripts ({hint})")
        field, takes_value = known[flag]
        if field in sets:
            raise UsageError(f"after --: {who} sets {flag} itself ({sets[field]})")
        width = 2 if takes_value and "=" not in tokens[i] else 1  # `--lr 0.1`; `--lr=0.1`, `--amp`
        if width == 2 and (i + 1 == len(tokens) or tokens[i + 1].startswith("--")):
            raise UsageError(f"after --: {flag} needs a value")
        groups.append(tokens[i : i + width])
        i += width
    return {m: [t for group in groups if group[0].split("=", 1)[0] in spellings[m] for t in group] for m in methods}


def checked_config(method: str, args: Sequence[str], who: str):
    """The run's settings, parsed and checked as its script does; a refusal becomes one line naming the run."""
    module, stderr = script(method), io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            cfg = module.check_config(experiment.parse_flags(module.Config, list(args)))
        experiment.check_run_settings(cfg)
        return cfg
    except SystemExit:
        message = stderr.getvalue().strip().splitlines()[-1].removeprefix("error: ").removesuffix(" (see --help)")
    except UsageError as error:
        message = str(error)
    raise UsageError(f"{who} refused its flags: {message}")


@dataclass(frozen=True)
class Run:
    method: str
    primary: int
    aux: int | None  # None for Single (one run serves every pair of its primary level) and without a hierarchy
    seed: int
    args: tuple[str, ...]  # the script's flags (without --resume)
    epochs: int  # what the run asks for
    run_dir: Path
    published: tuple[tuple[str, float], ...]  # (source, %) as the script reports them for this configuration
    dataset: str  # its --dataset and --backbone, as its metrics.json records them
    backbone: str
    folder: str  # the tool's own folder in --results-dir, which holds the job logs
    aux_weight: float = 1.0  # its --aux-weight (1: the paper's, and the methods without one)

    @property
    def script(self) -> Path:
        return script_path(self.method)

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def slot(self) -> tuple:
        """Its place in a grid, whatever its other settings, as recorded_slot reads it from its metrics.json."""
        return self.method, self.dataset, self.backbone, self.primary, self.aux, self.seed, self.aux_weight

    @property
    def place(self) -> str:
        """Its place in words: the pair (CIFAR-100) or the dataset, and a backbone other than VGG-16."""
        if self.dataset == "cifar100":
            where = f"{self.primary} → {self.aux}" if self.aux is not None else f"primary {self.primary}"
        else:
            where = self.dataset
        return where + ("" if self.backbone == "vgg16" else f", {self.backbone}")

    @property
    def timed_as(self) -> str:
        """Whose epochs its time left is estimated from: its method's, on the same data and network."""
        if (self.dataset, self.backbone) == ("cifar100", "vgg16"):
            return self.method
        return f"{self.method} on {self.dataset} with {self.backbone}"

    @property
    def job_log(self) -> Path:
        return self.run_dir.parent / self.folder / JOBS_FOLDER / f"{self.name}.log"

    def serves(self, pair: tuple[int, int]) -> bool:
        return self.primary == pair[0] and self.aux in (None, pair[1])


def run_of(method: str, cfg, args: Sequence[str], folder: str, kind: type = Run, **place) -> Run:
    """The run of these flags (`cfg`: their checked_config) in the folder the script names; `place`: other fields."""
    module = script(method)
    name = experiment.run_name(cfg, module.run_name_stem(cfg), module.paper_settings(cfg))
    aux = getattr(cfg, "aux_level", None) if method not in PRIMARY_ONLY else None
    fields = dict(method=method, primary=cfg.primary_level, aux=aux, seed=cfg.seed, args=tuple(args), epochs=cfg.epochs)
    fields |= dict(run_dir=Path(cfg.results_dir) / name, dataset=cfg.dataset, backbone=cfg.backbone, folder=folder)
    fields["aux_weight"] = getattr(cfg, "aux_weight", 1.0)
    fields["published"] = tuple(module.published_accuracy(cfg).items())
    return kind(**{**fields, **place})


# ---------------------------------------------------------------------------------------------
# The state of a run, read from its folder


@dataclass(frozen=True)
class RunState:
    """What a run's folder says. A metrics.json that cannot be used (experiment.read_metrics: truncated, not JSON, an
    accuracy that is not a finite fraction) is `damaged`, with the reason: none of its numbers is used."""

    accuracies: tuple[float, ...] = ()  # test primary accuracy (%) of every epoch done
    epoch_seconds: tuple[float, ...] = ()  # each epoch's time, where recorded: the grid's time left
    not_comparable_because: tuple[str, ...] = ()  # the script's reasons, from the summary
    config: dict | None = None  # the run's recorded settings (kept with damaged numbers: it still finds the run)
    damaged: str | None = None
    has_checkpoint: bool = False
    running_pid: int | None = None  # the live process on this host that holds the run folder's lock

    @property
    def epochs_done(self) -> int:
        return len(self.accuracies)


def read_state(run: Run | Path) -> RunState:
    """The state of a run (or of the run folder given) now."""
    folder = run.run_dir if isinstance(run, Run) else run
    found = dict(has_checkpoint=(folder / "checkpoint.pt").is_file(), running_pid=experiment.lock_holder(folder))
    try:
        record = experiment.read_metrics(folder / "metrics.json")
    except FileNotFoundError:
        return RunState(**found)
    except ValueError as error:
        return RunState(config=getattr(error, "config", None), damaged=str(error), **found)
    summary, config, epochs = record.get("summary"), record.get("config"), record["epochs"]
    reasons = summary.get("not_comparable_because") if isinstance(summary, dict) else None
    return RunState(
        accuracies=tuple(100 * epoch["test_primary_acc"] for epoch in epochs),
        # a finite int or float (JSON's true and false are Python ints, and are not numbers here)
        epoch_seconds=tuple(s for e in epochs if type(s := e.get("seconds")) in (int, float) and math.isfinite(s)),
        not_comparable_because=tuple(r for r in reasons if isinstance(r, str)) if isinstance(reasons, list) else (),
        config=config if isinstance(config, dict) else None,
        **found,
    )


def finished(run: Run, state: RunState) -> bool:
    return state.epochs_done >= run.epochs


def kind(run: Run, state: RunState) -> str:
    if state.running_pid is not None:
        return "running"
    if state.damaged:
        return "damaged"
    if finished(run, state):
        return "finished"
    return "stopped" if state.epochs_done or state.has_checkpoint else "not started"


def describe(run: Run, state: RunState, elsewhere: bool = False) -> str:
    """The run's state in words; `elsewhere`: as `run` and `submit` skip a run that another live process holds."""
    what = kind(run, state)
    if what == "running":
        where = " elsewhere" if elsewhere else ""
        return f"running{where} (pid {state.running_pid}), {state.epochs_done} of {plural(run.epochs, 'epoch')} done"
    if what == "damaged":
        kept = "checkpoint.pt kept" if state.has_checkpoint else "no checkpoint.pt"
        return f"metrics damaged: {state.damaged} ({kept})"
    if what == "finished":
        return f"finished ({plural(state.epochs_done, 'epoch')})"
    if what == "stopped" and not state.epochs_done:  # killed between writing the checkpoint and metrics.json
        return "stopped: checkpoint.pt but no metrics.json yet (resuming writes it)"
    return f"stopped after epoch {state.epochs_done} of {run.epochs}" if what == "stopped" else what


def command(run: Run, state: RunState, gpu: int | None = None) -> list[str]:
    """The run's command line: --resume when its folder holds a checkpoint; on a GPU of --gpus, --device cuda."""
    device = ["--device", "cuda"] if gpu is not None else []
    return [sys.executable, str(run.script), *run.args, *device, *(["--resume"] if state.has_checkpoint else [])]


def plan_lines(runs: Sequence[Run]) -> list[str]:
    """Each run's state and its command as a user would type it; then how many runs are in which state."""
    lines, counts = [], {}
    for run in runs:
        state = read_state(run)
        cmd = command(run, state)
        typed = shlex.join(["python", os.path.relpath(cmd[1]), *cmd[2:]])  # as a user would type it
        lines += [f"{run.name}: {describe(run, state)}", f"    {typed}"]
        counts[kind(run, state)] = counts.get(kind(run, state), 0) + 1
    return [*lines, f"{plural(len(runs), 'run')}: " + ", ".join(f"{n} {what}" for what, n in counts.items())]


def sort_out(runs: Sequence[Run]) -> tuple[list[Run], list[tuple[Run, str]]]:
    """The runs `run` and `submit` start, in order, and those they refuse with the reason; the skipped ones (finished,
    running elsewhere) are printed. Damaged metrics with a checkpoint are started: resuming rewrites them."""
    todo, refused = [], []
    for run in runs:
        state = read_state(run)
        if kind(run, state) in ("running", "finished"):
            print(f"skip  {run.name}: {describe(run, state, elsewhere=True)}")
        elif state.damaged and not state.has_checkpoint:
            reason = f"metrics damaged: {state.damaged}, and no checkpoint.pt to resume from"
            print(f"FAIL  {run.name} ({reason}); move its folder away to start it over", flush=True)
            refused.append((run, reason))
        else:
            todo.append(run)
    return todo, refused


# ---------------------------------------------------------------------------------------------
# Running children: job logs, GPUs, signals


def child_environment(gpu: int | None) -> dict[str, str]:
    """Unbuffered output (the log shows each epoch as it ends); with --gpus, only the child's GPU visible, counted as
    this process counts them (through its own CUDA_VISIBLE_DEVICES, if set)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if gpu is not None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        env["CUDA_VISIBLE_DEVICES"] = visible.split(",")[gpu] if visible else str(gpu)
    return env


def open_job_log(path: Path) -> TextIO | None:
    """The job log, opened for appending and locked (flock) by this process, or None when another process holds it.
    The child started with it as its output inherits the open file and the lock, which so lasts until the child (and
    whatever it started) has ended: two processes never write one job log at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "a")
    try:
        fcntl.flock(log.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.close()
        return None
    return log


def start_logged(cmd: list[str], job_log: Path, env: dict, ignore_signal: int | None = None) -> subprocess.Popen | None:
    """Start `cmd` in its own session (a terminal's Ctrl-C reaches the parent only, which forwards it once), its output
    appended to its job log after a line naming the command; None, starting nothing, when another process holds it."""
    log = open_job_log(job_log)
    if log is None:
        return None
    with log:  # closed here once the child has its own copy, which holds the lock from now on
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
        log.flush()
        # An ignored signal stays ignored across exec: the child does not die of its parent's signal.
        ignore = (lambda: signal.signal(ignore_signal, signal.SIG_IGN)) if ignore_signal else None
        return subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=ignore
        )


def locked_elsewhere(run_dir: Path | str, code: int) -> str | None:
    """Who holds the run folder ('pid N on HOST') when its child exited with code 2 while another process holds the
    folder's lock (it lost the race to a run started elsewhere, maybe on another host); else None."""
    return experiment.locked_by(Path(run_dir)) if code == 2 else None


def exit_text(code: int) -> str:
    """A child's return code in words: Popen gives -N for a child killed by signal N."""
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def stop(child: subprocess.Popen, signum: int = signal.SIGTERM) -> int:
    """Ask a child to stop (it finishes writing and keeps its last checkpoint); kill it if it hangs."""
    with contextlib.suppress(ProcessLookupError):
        child.send_signal(signum)
    try:
        return child.wait(STOP_WAIT_SECONDS)
    except subprocess.TimeoutExpired:
        child.kill()
        return child.wait()


def check_gpus(text: str | None, runs_per_gpu: int) -> list[int | None]:
    """The slots children run in: each GPU of --gpus --runs-per-gpu times, or one slot on the default device."""
    if runs_per_gpu < 1:
        raise UsageError(f"--runs-per-gpu must be at least 1 (got {runs_per_gpu})")
    if text is None:
        if runs_per_gpu > 1:
            raise UsageError("--runs-per-gpu packs runs on the GPUs of --gpus; give --gpus too")
        return [None]
    try:
        gpus = [int(item) for item in text.split(",")]
    except ValueError:
        raise UsageError(f"--gpus {text!r} is not a comma list of GPU numbers (e.g. --gpus 0,1,2,3)") from None
    if len(set(gpus)) != len(gpus):
        raise UsageError(f"--gpus {text} names a GPU twice; use --runs-per-gpu to run several runs on one GPU")
    import torch  # only here: the grid's scripts import it anyway, plan and report need no GPU count

    devices = torch.cuda.device_count()
    have = f"{devices} CUDA device(s), numbered from 0" if devices else f"no CUDA device (torch {torch.__version__})"
    for gpu in gpus:
        if not 0 <= gpu < devices:
            raise UsageError(f"--gpus {text}: there is no GPU {gpu}; this machine has {have}")
    return [gpu for gpu in gpus for _ in range(runs_per_gpu)]


def unwritable_because(folder: Path) -> str | None:
    """Why this process cannot create or write into `folder` (None: it can); the check itself leaves nothing behind."""
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        return str(error.strerror or error)
    finally:
        for path in created:
            with contextlib.suppress(OSError):
                path.rmdir()
    return None


# ---------------------------------------------------------------------------------------------
# `run`: the grid on this machine, with its progress


@dataclass
class Job:
    run: Run
    child: subprocess.Popen
    gpu: int | None
    since: float  # time.monotonic() at its start


def seconds_per_epoch(states: dict[Run, RunState]) -> dict[str, float]:
    """Per kind of run (Run.timed_as: the method, and the data and network where not the paper's), the mean time of
    the epochs its runs have finished (their metrics record each epoch's)."""
    by_kind: dict[str, list[float]] = {}
    for run, state in states.items():
        by_kind.setdefault(run.timed_as, []).extend(state.epoch_seconds)
    return {kind: statistics.fmean(seconds) for kind, seconds in by_kind.items() if seconds}


def time_left(remaining: Sequence[tuple[Run, int]], per_epoch: dict[str, float], parallel: int) -> str:
    """The grid's time left, from (run, epochs done) of every run still to finish: its epochs left, shared by `parallel`
    slots, never less than its longest run's; kinds of run (Run.timed_as) with no epoch timed yet are named."""
    left = [(run, run.epochs - done) for run, done in remaining if run.epochs > done]
    timed = [epochs * per_epoch[run.timed_as] for run, epochs in left if run.timed_as in per_epoch]
    ranks = {method: rank for rank, method in enumerate(METHODS)}
    order = {run.timed_as: (ranks.get(run.method, len(ranks)), run.timed_as) for run, _ in left}
    untimed = sorted({run.timed_as for run, _ in left if run.timed_as not in per_epoch}, key=order.get)
    if not left:
        return "no epoch left"
    if not timed:
        return "time left: not known until an epoch has ended"
    seconds = max(sum(timed) / max(1, min(parallel, len(left))), max(timed))
    minutes, hours = seconds / 60, seconds / 3600
    text = f"{seconds:.0f} s" if seconds < 90 else f"{minutes:.0f} min" if minutes < 90 else f"{hours:.1f} h"
    return f"at least {text} left (no {', '.join(untimed)} epoch timed yet)" if untimed else f"about {text} left"


class GridRun:
    """One `run`: starts the runs to do as slots free up, each re-checked just before it starts; prints each start and
    end, and a progress line when an epoch has ended, at most every PROGRESS_SECONDS, flushed. SIGINT, SIGTERM and
    SIGHUP go on to every child, which stops after writing and keeps its last checkpoint; nothing new starts. After a
    SIGHUP (the terminal closed) nothing is printed: there is no terminal to print to; the job logs keep it all."""

    def __init__(self, runs: Sequence[Run], todo: Sequence[Run], slots: list[int | None]):
        self.states = {run: read_state(run) for run in runs}
        self.todo, self.free, self.parallel = list(todo), list(slots), len(slots)
        self.jobs: list[Job] = []
        self.failed: list[tuple[Run, str]] = []
        self.received: list[int] = []
        self.started, self.progress_checked = 0, -math.inf

    def go(self) -> None:
        signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        previous = {s: signal.signal(s, lambda signum, frame: self.received.append(signum)) for s in signals}
        forwarded = 0
        try:
            while (self.todo and not self.received) or self.jobs:
                while self.todo and self.free and not self.received:
                    self.start(self.todo.pop(0), self.free.pop(0))
                if len(self.received) > forwarded:  # forwarded here, not in the handler: a child started meanwhile too
                    if signal.SIGHUP in self.received:  # the terminal is gone: printing to it would fail
                        silence_stdout(both=True)
                    for job in self.jobs:
                        with contextlib.suppress(ProcessLookupError):
                            job.child.send_signal(self.received[-1])
                    forwarded = len(self.received)
                for job in [job for job in self.jobs if job.child.poll() is not None]:
                    self.jobs.remove(job)
                    self.free.append(job.gpu)
                    self.conclude(job)
                self.show_progress()
                time.sleep(POLL_SECONDS)
        finally:
            for job in self.jobs:  # only after an exception in this process: leave no child behind
                stop(job.child)
            for s, handler in previous.items():
                signal.signal(s, handler)

    def start(self, run: Run, gpu: int | None) -> None:
        state = read_state(run)
        child = None
        if kind(run, state) in ("running", "finished"):  # since the grid was first read
            print(f"skip  {run.name}: {describe(run, state, elsewhere=True)}", flush=True)
        elif (child := start_logged(command(run, state, gpu), run.job_log, child_environment(gpu))) is None:
            holder = experiment.lock_holder(run.run_dir)
            who = f"pid {holder}" if holder else f"another process holds its job log {run.job_log}"
            print(f"skip  {run.name}: running elsewhere ({who})", flush=True)
        if child is None:
            self.free.append(gpu)
            return
        self.jobs.append(Job(run, child, gpu, time.monotonic()))  # first: a failing print stops it too
        self.states[run] = state  # what its progress is measured from
        self.started += 1
        where = f" on GPU {gpu}" if gpu is not None else ""
        print(f"start {run.name}{where} ({self.started} of {self.started + len(self.todo)}): {run.job_log}", flush=True)

    def conclude(self, job: Job) -> None:
        run, code = job.run, job.child.returncode
        self.states[run] = state = read_state(run)
        holder = locked_elsewhere(run.run_dir, code)
        if holder is not None:  # it lost the race for its folder's lock to a run started elsewhere
            print(f"skip  {run.name}: running elsewhere ({holder})", flush=True)
        elif code == 0 and state.damaged:  # a finished run resumed writes no metrics.json
            self.fail(run, f"its metrics.json is still damaged: {state.damaged}")
        elif code == 0:
            print(f"done  {run.name} in {(time.monotonic() - job.since) / 60:.1f} min", flush=True)
        elif self.received:
            print(f"stopped {run.name}; its last checkpoint is kept", flush=True)
        else:
            self.fail(run, exit_text(code))

    def fail(self, run: Run, reason: str) -> None:
        print(f"FAIL  {run.name} ({reason})", flush=True)
        self.failed.append((run, reason))

    def show_progress(self) -> None:
        """A line when a job's epoch has ended since the last look, which is at most every PROGRESS_SECONDS."""
        if time.monotonic() - self.progress_checked < PROGRESS_SECONDS or not self.jobs:
            return
        self.progress_checked = time.monotonic()
        before = {job.run: self.states[job.run].epochs_done for job in self.jobs}
        self.states |= {run: read_state(run) for run in before}
        if any(self.states[run].epochs_done > done for run, done in before.items()):
            going = ", ".join(f"{r.name} epoch {self.states[r].epochs_done} of {r.epochs}" for r in before)
            remaining = [(run, self.states[run].epochs_done) for run in [*before, *self.todo]]
            left = time_left(remaining, seconds_per_epoch(self.states), self.parallel)
            print(f"going {going}; grid: {left}", flush=True)


def run_grid(grid: Grid, slots: list[int | None]) -> int:
    """Run what is missing and resume what stopped, len(slots) at a time, then print the results table. The exit code:
    0 when no run failed (a run going elsewhere is no failure), 1 when one did, 128 + the signal when interrupted."""
    todo, refused = sort_out(grid.runs)
    if not todo and not refused:
        print("nothing to do: every run of the grid is finished or running")
    going = GridRun(grid.runs, todo, slots)
    if todo:
        going.go()
    states = {run: read_state(run) for run in grid.runs}
    if any(state.epochs_done for state in states.values()):  # the results table, as `report` prints it
        print(f"\n{grid.table(grid.runs, states, ())}", flush=True)
    failed = [(run, reason, run.run_dir / "metrics.json") for run, reason in refused]
    for run, reason, see in failed + [(run, reason, run.job_log) for run, reason in going.failed]:
        print(f"failed: {run.name} ({reason}); see {see}", file=sys.stderr)
    if going.received:
        not_started = plural(len(going.todo), "run")
        print(
            "interrupted: every child stopped and keeps its last checkpoint; run the same command again to continue "
            f"({not_started} not started)",
            file=sys.stderr,
        )
        return 128 + going.received[0]
    return 1 if failed or going.failed else 0


# ---------------------------------------------------------------------------------------------
# SLURM through submitit


class RunJob:
    """One run of a grid as a submitit job: the model script as a child process, resumed from its checkpoint when
    its folder holds one, its output appended to the run's job log.

    submitit calls `checkpoint` (its checkpointing protocol) when the job is preempted or nears its time limit: the
    child is stopped (it keeps its last checkpoint) and the same call is requeued, which resumes it. Not a
    submitit Checkpointable: submitit is imported only in `submit`, and the live child is not pickled."""

    def __init__(self, python: str, script: str, args: Sequence[str], run_dir: str, job_log: str, cwd: str):
        self.python, self.script, self.args, self.run_dir = python, script, tuple(args), run_dir
        self.job_log, self.cwd = job_log, cwd
        self.child: subprocess.Popen | None = None

    def command(self) -> list[str]:
        resume = ["--resume"] if (Path(self.cwd) / self.run_dir / "checkpoint.pt").is_file() else []
        return [self.python, self.script, *self.args, *resume]

    def __call__(self) -> str:
        """The job's line for `submit --cluster local`: done, or running elsewhere; an exception when it failed."""
        os.chdir(self.cwd)  # the grid's relative paths (results, data) as at submission
        preempt_signal = signal.Signals["SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")]
        name, job_log = Path(self.run_dir).name, Path(self.job_log)
        signal.pthread_sigmask(signal.SIG_BLOCK, {preempt_signal})  # until the child is known: `checkpoint` stops it
        try:
            self.child = start_logged(self.command(), job_log, child_environment(None), ignore_signal=preempt_signal)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {preempt_signal})
        if self.child is None:
            return f"skip  {name}: running elsewhere (another process holds its job log {job_log})"
        # poll, not wait(): submitit's signal handler runs `checkpoint` in this thread, and a blocking wait() would
        # hold the lock that checkpoint's own wait needs
        while self.child.poll() is None:
            time.sleep(1)
        code = self.child.returncode
        if (holder := locked_elsewhere(self.run_dir, code)) is not None:
            return f"skip  {name}: running elsewhere ({holder})"
        if code != 0:
            raise RuntimeError(f"{name}: {exit_text(code)}; see {job_log}")
        return f"done  {name}"

    def checkpoint(self) -> DelayedSubmission:
        from submitit.helpers import DelayedSubmission

        if self.child is not None and self.child.poll() is None:
            stop(self.child)
        return DelayedSubmission(RunJob(self.python, self.script, self.args, self.run_dir, self.job_log, self.cwd))


def parse_time(text: str) -> int:
    """A SLURM time limit (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in whole minutes, rounded up."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise UsageError(f"--time {text!r} is not a SLURM time (minutes, HH:MM:SS or D-HH:MM:SS)")
    days, *parts = (int(g) if g else None for g in match.groups())
    units = (3600, 60, 1) if days is not None or parts[2] is not None else (60, 1)  # D-HH..., HH:MM:SS; MM, MM:SS
    seconds = (days or 0) * 86400 + sum(value * unit for value, unit in zip(parts, units) if value is not None)
    if seconds <= 0:
        raise UsageError(f"--time {text}: the time limit must be positive")
    return math.ceil(seconds / 60)


def import_extra(name: str, purpose: str, otherwise: str = "") -> ModuleType:
    """An optional extra (submitit, matplotlib), imported only by what needs it; refused with the install command."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise UsageError(f"{purpose} needs {name.split('.')[0]}, an optional extra: {EXTRAS}{otherwise}") from None


def submit_grid(grid: Grid, args: argparse.Namespace) -> int:
    """One array job of the runs still to do, one GPU each, named and logged (submitit's logs) as the tool's folder;
    with --cluster local, waits for them."""
    submitit, timeout_min = import_extra("submitit", "submit"), parse_time(args.time)
    slurm = {}
    for item in args.slurm:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--slurm {item!r} is not KEY=VALUE (e.g. --slurm constraint=h100 --slurm mem=64G)")
        slurm[key.strip()] = value
    if args.array_parallelism is not None and args.array_parallelism < 1:
        raise UsageError(f"--array-parallelism must be at least 1 (got {args.array_parallelism})")
    if args.cluster == "slurm" and shutil.which("sbatch") is None:
        raise UsageError("submit: SLURM's sbatch is not on this machine; run it on the cluster (or --cluster local)")
    todo, refused = sort_out(grid.runs)
    for run, reason in refused:
        print(f"failed: {run.name} ({reason}); see {run.run_dir / 'metrics.json'}", file=sys.stderr)
    if not todo and not refused:
        print("nothing to submit: every run of the grid is finished or running")
    if not todo:
        return 1 if refused else 0
    folder = args.results_dir / grid.folder / "submitit"
    requeues = dict(slurm_max_num_timeout=MAX_TIMEOUT_REQUEUES, local_max_num_timeout=MAX_TIMEOUT_REQUEUES)
    executor = submitit.AutoExecutor(folder=folder, cluster=args.cluster, **requeues)
    parameters = dict(name=grid.folder, timeout_min=timeout_min, gpus_per_node=1, tasks_per_node=1)
    parameters |= dict(slurm_partition=args.partition, slurm_array_parallelism=args.array_parallelism)
    executor.update_parameters(**parameters, slurm_additional_parameters=slurm)
    cwd = os.getcwd()
    run_jobs = [RunJob(sys.executable, str(r.script), r.args, str(r.run_dir), str(r.job_log), cwd) for r in todo]
    with executor.batch():
        jobs = [executor.submit(job) for job in run_jobs]
    for run, job in zip(todo, jobs):
        print(f"job {job.job_id}: {run.name} (log {run.job_log})")
    print(f"submitted {plural(len(jobs), 'run')}; submitit's logs are in {folder}")
    failed = []
    for run, job in zip(todo, jobs) if args.cluster == "local" else ():
        try:
            print(job.result())
        except Exception as error:  # submitit re-raises the job's error here, with its traceback as text
            failed.append(run)
            print(f"failed: {run.name} ({str(error).strip().splitlines()[-1]}); see {run.job_log}", file=sys.stderr)
    return 1 if failed or refused else 0


# ---------------------------------------------------------------------------------------------
# Runs found by their recorded settings (`report` without flags after --)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def recorded(config: dict, name: str):
    """A recorded setting; one a run recorded before the setting existed ran as RECORDED_DEFAULTS says."""
    return config.get(name, RECORDED_DEFAULTS.get(name))


def recorded_slot(config: dict) -> tuple | None:
    """The place in a grid of a run with these recorded settings (method, dataset, backbone, levels, seed, auxiliary
    weight), as Run.slot, or None. The auxiliary level of a method that takes one may be None: a dataset without a
    hierarchy."""
    method, primary, aux, seed = (config.get(name) for name in ("method", "primary_level", "aux_level", "seed"))
    dataset, backbone = recorded(config, "dataset"), recorded(config, "backbone")
    if method not in METHODS or config.get("task", "hierarchy") != "hierarchy":  # MAOAL's --task domains: not these
        return None
    readable = is_int(primary) and is_int(seed) and isinstance(dataset, str) and isinstance(backbone, str)
    if not readable or (method not in PRIMARY_ONLY and not (is_int(aux) or aux is None)):
        return None
    weight = recorded(config, "aux_weight")
    return method, dataset, backbone, primary, aux if method not in PRIMARY_ONLY else None, seed, weight


def runs_as_recorded(runs: Sequence[Run], slot_of: Callable[[dict], tuple | None]) -> tuple[list[Run], list[str]]:
    """The grid's runs where the results folder holds them, found by the settings each metrics.json records (`slot_of`
    them: its place in the grid, as Run.slot), whatever flags named them. Where several folders hold one place, a note
    names them and the settings they differ in, and the one the grid's own flags name is used if it is among them,
    else none: the table never mixes settings unasked."""
    found: dict[tuple, list[tuple[Path, dict | None]]] = {}  # place -> (folder, its recorded settings)
    for path in sorted(runs[0].run_dir.parent.glob("*/metrics.json")) if runs else ():
        config = read_state(path.parent).config
        if config and (slot := slot_of(config)) is not None:
            found.setdefault(slot, []).append((path.parent, config))
    chosen, notes = [], []
    for run in runs:
        candidates = found.get(run.slot, [])
        named = next((c for c in candidates if c[0].name == run.name), None)
        if named is None and any((run.run_dir / name).exists() for name in ("metrics.json", "checkpoint.pt")):
            named = (run.run_dir, None)  # its metrics unreadable: found by its name alone
            candidates = [named, *candidates]
        if len(candidates) > 1:
            notes.append(ambiguity_note(run, candidates, named))
        pick = candidates[0] if len(candidates) == 1 else named
        if pick is not None:  # asking for the epochs it was run with; its args stay the grid's: report starts nothing
            epochs = (pick[1] or {}).get("epochs")
            epochs = epochs if is_int(epochs) and epochs >= 1 else run.epochs
            chosen.append(dataclasses.replace(run, run_dir=pick[0], epochs=epochs))
        elif not candidates:
            chosen.append(run)  # not started
    return chosen, notes


def ambiguity_note(run: Run, candidates: Sequence[tuple[Path, dict | None]], named) -> str:
    """The folders that hold one place of the grid, and the script's settings (in its order) they differ in."""
    configs = [config for _, config in candidates if config]
    names = [f.name for f in experiment.fields(script(run.method).Config) if f.name not in BOOKKEEPING]
    names = [name for name in names if len({json.dumps(recorded(c, name), sort_keys=True) for c in configs}) > 1]

    def settings(config: dict | None) -> str:
        if config is None:
            return "settings unreadable"
        flags = []
        for name in names:
            value = recorded(config, name)
            if isinstance(value, bool):
                flags.append("--" + ("" if value else "no-") + name.replace("_", "-"))
            else:
                flags.append(experiment.flag(name, "none" if value is None else value))
        return " ".join(flags) or "the same settings"

    folders = ", ".join(f"{folder.name} ({settings(config)})" for folder, config in candidates)
    used = f"the report uses {named[0].name}, the grid's own name for it" if named else "none of them is reported"
    return (
        f"{len(candidates)} folders hold {METHODS.get(run.method, run.method)} {run.place}, seed {run.seed}, with "
        f"different settings: {folders}; {used}; to report another, repeat after -- the flags it was run with"
    )


# ---------------------------------------------------------------------------------------------
# Cells: one place of a grid over seeds


@dataclass(frozen=True)
class Cell:
    """One place of a grid over seeds: a measure of each seed's run (by default its last 5 epochs' mean accuracy)."""

    values: tuple[float, ...]
    epochs_done: tuple[int, ...]
    running: int  # runs still going (their folder is locked by a live process)
    unfinished: int  # runs stopped before their last epoch
    damaged: int = 0  # runs whose metrics.json cannot be used: left out of the values

    def text(self) -> str:
        if not self.values:
            return f"— ({self.damaged} damaged)" if self.damaged else "—"
        low, high = min(self.epochs_done), max(self.epochs_done)
        notes = [f"n={len(self.values)}", f"{low} ep" if low == high else f"{low}–{high} ep"]
        counts = ((self.running, "running"), (self.unfinished, "stopped"), (self.damaged, "damaged"))
        return f"{mean_std(self.values)} ({', '.join(notes + [f'{n} {what}' for n, what in counts if n])})"


def last_epochs_mean(accuracies: Sequence[float]) -> float:
    return statistics.fmean(accuracies[-LAST_EPOCHS:])


def mean_std(values: Sequence[float], signed: bool = False) -> str:
    sign = "+" if signed else ""
    if len(values) == 1:
        return f"{values[0]:{sign}.2f}"
    return f"{statistics.fmean(values):{sign}.2f} ± {statistics.stdev(values):.2f}"


def cell_of(runs: Sequence[Run], states: dict[Run, RunState], measure: Callable = last_epochs_mean) -> Cell:
    """The cell of these runs (one place of a grid, one run per seed)."""
    done = [run for run in runs if states[run].epochs_done]  # a damaged run has no epochs to use
    return Cell(
        values=tuple(measure(states[run].accuracies) for run in done),
        epochs_done=tuple(states[run].epochs_done for run in done),
        running=sum(states[run].running_pid is not None for run in done),
        unfinished=sum(states[run].running_pid is None and not finished(run, states[run]) for run in done),
        damaged=sum(states[run].damaged is not None for run in runs),
    )


def differences_by_seed(mine, theirs, states, measure: Callable = last_epochs_mean) -> dict[int, float]:
    """Per seed where both have epochs, in seed order: `measure` of the run in `mine` minus that in `theirs`."""
    by_seed = [
        {run.seed: measure(states[run].accuracies) for run in group if states[run].epochs_done}
        for group in (mine, theirs)
    ]
    return {seed: by_seed[0][seed] - by_seed[1][seed] for seed in sorted(by_seed[0]) if seed in by_seed[1]}


def difference_text(mine, theirs, states, measure: Callable = last_epochs_mean) -> str:
    diffs = list(differences_by_seed(mine, theirs, states, measure).values())
    return f"{mean_std(diffs, signed=True)} (n={len(diffs)})" if diffs else "—"


def cited(runs: Sequence[Run], sources: list[str]) -> str:
    """The figures published for these runs' configuration, `75.7 [1], 74.6 [2]` ([n]: the n-th of `sources`)."""
    published = runs[0].published if runs else ()
    sources += [source for source, _ in published if source not in sources]
    return ", ".join(f"{value:.1f} [{sources.index(source) + 1}]" for source, value in published)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(row) + " |" for row in [header, *rows]]
    return [lines[0], "|" + "---|" * len(header), *lines[1:]]


def not_comparable_reasons(runs: Sequence[Run], states: dict[Run, RunState]) -> list[str]:
    """The scripts' own reasons (their metrics.json summaries), over the runs with epochs."""
    return sorted({reason for run in runs if states[run].epochs_done for reason in states[run].not_comparable_because})


def table_notes(runs: Sequence[Run], states: dict[Run, RunState], notes: Sequence[str]) -> list[str]:
    """A table's last notes: why its runs are not comparable with the published figures, the damaged ones, `notes`."""
    reasons = ", ".join(not_comparable_reasons(runs, states))
    lines = [f"Not comparable with the published figures: {reasons} (in some or all runs)."] if reasons else []
    lines += [f"{run.name}: metrics damaged: {states[run].damaged}; left out." for run in runs if states[run].damaged]
    return lines + list(notes)


def csv_text(rows: Sequence[Sequence]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue()


def csv_numbers(values: Sequence[float]) -> list[str]:
    """The mean, the std and the values themselves, as a results CSV writes them."""
    mean = f"{statistics.fmean(values):.4f}" if values else ""
    return [mean, f"{statistics.stdev(values):.4f}" if len(values) > 1 else "", " ".join(f"{v:.4f}" for v in values)]


# ---------------------------------------------------------------------------------------------
# A tool: its command line, its grid, and the subcommands' work


@dataclass(frozen=True)
class Grid:
    """A tool's grid as the subcommands take it: its runs, and what the tool makes of them."""

    prog: str  # the tool's command, as messages name it: figure3.py, tables.py, tables.py maoal
    folder: str  # its folder in --results-dir: report's files, jobs/, submitit/
    files: str  # report's files, as messages name them (report.md and figure3.png)
    runs: Sequence[Run]
    script_flags: tuple[str, ...]  # everything after `--`
    table: Callable[..., str]  # (runs, states, notes) -> the results table, as report prints it and run ends with
    write: Callable[..., dict]  # (runs, states, table) -> report's files: name -> text, or a function writing a path
    plan_notes: tuple[str, ...] = ()  # plan's last lines
    slot_of: Callable[[dict], tuple | None] = recorded_slot  # a run's place in the grid, from its recorded settings


def report(grid: Grid, results_dir: Path, out: Path | None) -> int:
    """Print the table; write report's files into `out`, by default <results-dir>/<the tool's folder>. Without flags
    after --, each run is found by the settings its metrics.json records."""
    runs, notes = runs_as_recorded(grid.runs, grid.slot_of) if not grid.script_flags else (list(grid.runs), [])
    states = {run: read_state(run) for run in runs}
    if not any(state.epochs_done for state in states.values()):
        for note in notes:
            show(note)
        example = f" (e.g. '{runs[0].run_dir}')" if runs else ""
        if damaged := [run for run in runs if states[run].damaged]:
            first = f"{damaged[0].name}: {states[damaged[0]].damaged}"
            example += f"; {plural(len(damaged), 'run')} with damaged metrics ({first})"
        none = f"none of the grid's {len(grid.runs)} runs has a" if len(grid.runs) > 1 else "the grid's one run has no"
        raise UsageError(
            f"report: {none} finished epoch in '{results_dir}'{example}; "
            f"run `python {grid.prog} run` first, with the same selection and flags after --"
        )
    table = grid.table(runs, states, notes)
    show(table)
    files = grid.write(runs, states, table)  # refused there, before anything is written, without an extra it needs
    folder = out if out is not None else results_dir / grid.folder
    if (reason := unwritable_because(folder)) and out is None:
        elsewhere = "give --out DIR to write them elsewhere"
        raise UsageError(f"report: cannot write {grid.files} into '{folder}' ({reason}); {elsewhere}")
    if reason:
        raise UsageError(f"report --out: cannot write into '{folder}' ({reason}); choose another --out")
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        write = text if callable(text) else lambda tmp, text=text: Path(tmp).write_text(text)
        experiment.write_atomic(folder / name, write)
    show(f"\nwrote {' and '.join(str(folder / name) for name in files)}")
    return 0


def show(text: str) -> None:
    """Print for `report`, whose work is its files: a reader that has gone (`report | head -1`) stops none of it."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        silence_stdout()


def silence_stdout(both: bool = False) -> None:
    """Point stdout (and with `both` stderr) at /dev/null: what is still to be printed, and the interpreter's last
    flush, go nowhere."""
    for stream in (sys.stdout, sys.stderr) if both else (sys.stdout,):
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


def report_markdown(title: str, selection: str, script_flags, table: str, runs, states, best=False, picture=()) -> str:
    """report.md: the title, the selection and flags, the table (and `picture`'s lines), then each run: its state,
    and where it has epochs the mean of its last LAST_EPOCHS (and, with `best`, its best epoch's accuracy)."""
    flags = shlex.join(script_flags) or "none (each run found by the settings its metrics.json records)"
    lines = [f"# {title}", "", f"{selection}; flags after --: {flags}.", "", table, "", *picture, "## Runs", ""]
    for run in runs:
        accuracies = states[run].accuracies
        mean = f", last-{LAST_EPOCHS} mean {last_epochs_mean(accuracies):.2f}%" if accuracies else ""
        best_epoch = f", best {max(accuracies):.2f}%" if best and accuracies else ""
        lines.append(f"- `{run.name}`: {describe(run, states[run])}{mean}{best_epoch}")
    return "\n".join([*lines, ""])


def tool_parser(prog: str, description: str, epilog: str, selection: dict, folder: str, files: str, table: str):
    """A tool's command line: the subcommands plan, run, submit and report, each with the grid's `selection` flags
    (flag -> (default, help)), --seeds and --results-dir, and its own: run's GPUs, submit's SLURM settings, report's
    --out (where `files` go instead of <results-dir>/`folder`). Returns the parser and the subcommands'."""
    parser = OneLineParser(prog=prog, description=description, allow_abbrev=False, epilog=epilog)
    grid = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # a typo of one flag must not mean another
    for flag, (default, text) in selection.items():
        grid.add_argument(flag, default=default, help=text)
    grid.add_argument("--seeds", default="0", help="comma list of seeds (default: %(default)s)")
    grid.add_argument("--results-dir", type=Path, default=Path("results"), help="as the scripts' (default: results)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{plan,run,submit,report}")
    helps = {"plan": "every run: its state and exact command", "run": "run what is missing, resume what stopped"}
    helps |= {"submit": "the same grid as a SLURM job array (submitit)", "report": f"{table}, {files}"}
    subcommand = {name: commands.add_parser(name, parents=[grid], allow_abbrev=False, epilog=epilog, help=text)
                  for name, text in helps.items()}  # fmt: skip
    run, submit = subcommand["run"], subcommand["submit"]
    run.add_argument("--gpus", help="comma list of GPU numbers: one run on each at once (default: one run at a time)")
    run.add_argument("--runs-per-gpu", type=int, default=1, help="runs at once on each GPU of --gpus (default: 1)")
    submit.add_argument("--partition", help="SLURM partition")
    submit.add_argument("--time", required=True, help="time limit per job, as SLURM writes it (e.g. 12:00:00)")
    submit.add_argument("--array-parallelism", type=int, help="at most this many jobs of the array at once")
    repeatable = "any other sbatch parameter (repeatable)"
    submit.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE", help=repeatable)
    local = "local: submitit's local executor on this machine, waiting for the jobs (a test without a cluster)"
    submit.add_argument("--cluster", choices=("slurm", "local"), default="slurm", help=local)
    out = f"write {files} here (default: <results-dir>/{folder})"
    subcommand["report"].add_argument("--out", type=Path, metavar="DIR", help=out)
    return parser, subcommand


def tool_main(argv: list[str] | None, parser: OneLineParser, grid_of: Callable[..., Grid]) -> None:
    """A tool's command line: its flags, then after `--` the scripts'; `grid_of(args, script_flags)` makes its grid,
    and the subcommand does its work. A refusal is one line on stderr, exit code 2."""
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    split = argv.index("--") if "--" in argv else len(argv)
    args = None
    try:
        args = parser.parse_args(argv[:split])
        code = dispatch(args, grid_of(args, tuple(argv[split + 1 :])))
        sys.stdout.flush()  # a reader that has gone shows here, not in the interpreter's last flush
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except BrokenPipeError:
        # The reader of the output has gone (`figure3.py plan | head -1`): what it wanted it has. run and submit
        # stopped their work midway (run's children stop, keeping their checkpoints): 128 + SIGPIPE, as a process
        # killed by SIGPIPE; plan did its work: 0 (report carries on without the reader: see show()).
        silence_stdout()
        code = 0 if args is None or args.command in ("plan", "report") else 128 + signal.SIGPIPE
    raise SystemExit(code)


def dispatch(args: argparse.Namespace, grid: Grid) -> int:
    """The subcommand's work; returns its exit code."""
    if args.command == "plan":
        print("\n".join([*plan_lines(grid.runs), *grid.plan_notes]))
        return 0
    if args.command == "report":
        return report(grid, args.results_dir, args.out)
    device_given = any(token.split("=")[0] == "--device" for token in grid.script_flags)
    if args.command == "run" and args.gpus is not None and device_given:
        raise UsageError(f"after --: {grid.prog.replace('.py', '')} run --gpus sets each run's --device itself")
    slots = check_gpus(args.gpus, args.runs_per_gpu) if args.command == "run" else []
    if reason := unwritable_because(args.results_dir):
        raise UsageError(f"cannot write results to '{args.results_dir}' ({reason}); choose another --results-dir")
    return run_grid(grid, slots) if args.command == "run" else submit_grid(grid, args)
