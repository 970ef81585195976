"""The MAXL paper's Figure 3 in one command: Single, Human and MAXL on every pair of the CIFAR-100 hierarchy.

The grid: Single at primary levels 3, 10 and 20 (one run per level, shared by the pairs with that primary
level), Human and MAXL at the six (primary, auxiliary) pairs 3-10, 3-20, 3-100, 10-20, 10-100, 20-100, for
each seed. Every run is a model script, run as itself in its own folder <results-dir>/<run-name>/ (the
name the script itself chooses), its output in log.txt there.

    python figure3.py plan                                  # every run: its state and exact command
    python figure3.py run                                   # runs what is missing, resumes what stopped
    python figure3.py run --gpus 0,1,2,3 --runs-per-gpu 2 --seeds 0,1,2 -- --meta-grad finite-difference
    python figure3.py submit --partition gpu --time 12:00:00      # the same grid on SLURM (submitit)
    python figure3.py report                                # the table, results/figure3/report.md and .png

--methods, --pairs and --seeds select part of the grid (wamal and maoal are opt-in). Flags after `--` go
to every run whose script has them (`-- --epochs 50`); a flag none of the selected scripts has is refused.
plan, run and report need only what the model scripts need; submit and the picture need the extras
(pip install -r requirements-extras.txt).

Cost, projected from benchmarks/README.md (one H100, 200 epochs: about 6 minutes for Single or Human, 31 for
MAXL): about 4 hours per seed for the 15 runs one at a time; --gpus and --runs-per-gpu run several at once.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import experiment
import model_vgg_human
import model_vgg_maoal
import model_vgg_maxl
import model_vgg_single
import model_vgg_wamal
from experiment import OneLineParser, UsageError

if TYPE_CHECKING:  # the optional extras, for annotations only: imported where used
    from matplotlib.figure import Figure
    from submitit.helpers import DelayedSubmission


@dataclass(frozen=True)
class Method:
    label: str  # the column title
    takes_aux: bool  # trained with an auxiliary level (--aux-level); Single is not
    default: bool  # in the default --methods: the curves of the paper's Figure 3
    compared_with: tuple[str, ...] = ()  # per pair, "<this> − <other>", paired by seed


# Every method figure3 knows, in column order. Its script is model_vgg_<name>.py beside this file.
METHODS = {
    "single": Method("Single", takes_aux=False, default=True),
    "human": Method("Human", takes_aux=True, default=True),
    "maxl": Method("MAXL", takes_aux=True, default=True, compared_with=("human", "single")),
    "wamal": Method("WAMAL", takes_aux=True, default=False, compared_with=("human",)),
    "maoal": Method("MAOAL", takes_aux=True, default=False, compared_with=("human",)),
}
# The model scripts (importing one trains nothing): figure3 uses each one's METHOD and Config.
SCRIPTS = {
    "single": model_vgg_single,
    "human": model_vgg_human,
    "maxl": model_vgg_maxl,
    "wamal": model_vgg_wamal,
    "maoal": model_vgg_maoal,
}
PAIRS = ((3, 10), (3, 20), (3, 100), (10, 20), (10, 100), (20, 100))  # (primary, auxiliary), the paper's order
LEVELS = (3, 10, 20, 100)
HERE = Path(__file__).resolve().parent
REPORT_FOLDER = "figure3"  # inside --results-dir: report.md, figure3.png, submitit/
EXTRAS = "pip install -r requirements-extras.txt"
LAST_EPOCHS = 5  # the paper reports the mean test accuracy of the last 5 epochs
AUTHORS_WORDS = (
    "Figure 3 is a plot in every version of the paper, with no numbers; the authors' ICLR 2019 submission says "
    "MAXL performs about as well as Human on 4 of the 6 pairs and worse on 2, and that 20 → 100 is its best pair"
)
# Script flags figure3 sets itself, and what to use instead.
FIGURE3_SETS = {
    "primary_level": "use --pairs",
    "aux_level": "use --pairs",
    "seed": "use --seeds",
    "results_dir": "use figure3's --results-dir, before --",
    "run_name": "figure3 finds every run by its default name",
    "resume": "figure3 resumes what stopped and never redoes a finished run",
    "overwrite": "figure3 never redoes a finished run; remove its folder to start it over",
    "smoke": "the grid's runs are real runs",
    "help": "see python model_vgg_<method>.py --help",
}
POLL_SECONDS = 0.1  # how often `run` looks at its children
STOP_WAIT_SECONDS = 60  # how long a stopped child may take to finish writing before it is killed
MAX_TIMEOUT_REQUEUES = 20  # a run longer than --time goes on in further jobs, each resuming the last one's checkpoint


# ---------------------------------------------------------------------------------------------
# The grid: which runs, with which flags, in which folders (each script's METHOD decides, as in the script)


@dataclass(frozen=True)
class Selection:
    methods: tuple[str, ...]
    pairs: tuple[tuple[int, int], ...]
    seeds: tuple[int, ...]
    results_dir: Path
    script_flags: tuple[str, ...]  # everything after `--`


@dataclass(frozen=True)
class Run:
    method: str
    primary: int
    aux: int | None  # None for Single: one run serves every pair with this primary level
    seed: int
    script: Path
    args: tuple[str, ...]  # the script's flags (without --resume)
    epochs: int  # what the run asks for
    run_dir: Path
    published: tuple[tuple[str, float], ...]  # (source, %) as the script reports them for this configuration

    @property
    def name(self) -> str:
        return self.run_dir.name

    def serves(self, pair: tuple[int, int]) -> bool:
        return self.primary == pair[0] and self.aux in (None, pair[1])


def script_path(method: str) -> Path:
    return HERE / f"model_vgg_{method}.py"


def parse_methods(text: str) -> tuple[str, ...]:
    names = [name.strip() for name in text.split(",")]
    for name in names:
        if name not in METHODS:
            raise UsageError(f"--methods: unknown method {name!r}; choose from {', '.join(METHODS)}")
        if not script_path(name).is_file():
            raise UsageError(f"--methods {name}: its script {script_path(name).name} is not in {HERE}")
    return tuple(name for name in METHODS if name in names)


def parse_pairs(text: str) -> tuple[tuple[int, int], ...]:
    pairs = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)-(\d+)\s*", item)
        pair = (int(match[1]), int(match[2])) if match else None
        if pair is not None and pair[0] in LEVELS and pair[1] in LEVELS and pair[1] <= pair[0]:
            finer = ", ".join(str(level) for level in LEVELS if level > pair[0]) or "none"
            raise UsageError(
                f"--pairs {item.strip()}: the auxiliary level {pair[1]} must be finer than the primary level "
                f"{pair[0]} (finer levels: {finer})"
            )
        if pair not in PAIRS:
            raise UsageError(
                f"--pairs: {item.strip()!r} is not a pair of the hierarchy; choose from "
                f"{', '.join(f'{p}-{a}' for p, a in PAIRS)}"
            )
        pairs.append(pair)
    return tuple(pair for pair in PAIRS if pair in pairs)


def parse_seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = [int(item) for item in text.split(",")]
    except ValueError:
        raise UsageError(f"--seeds {text!r} is not a comma list of integers (e.g. --seeds 0,1,2)") from None
    if min(seeds) < 0:
        raise UsageError(f"--seeds {text}: seeds are 0 or more")
    return tuple(dict.fromkeys(seeds))


def flag_spellings(module: ModuleType) -> dict[str, tuple[str, bool]]:
    """A script's flags, one per Config field (the scripts' contract): spelling -> (field, takes a value)."""
    spellings = {}
    for f in dataclasses.fields(module.Config):
        flag = "--" + f.name.replace("_", "-")
        is_switch = f.type == "bool"
        spellings[flag] = (f.name, not is_switch)
        if is_switch:
            spellings["--no-" + flag[2:]] = (f.name, False)
    spellings["--help"] = spellings["-h"] = ("help", False)
    return spellings


def split_script_flags(tokens: Sequence[str], spellings: dict[str, tuple[str, bool]]) -> list[list[str]]:
    """The flags after `--`, one group of tokens per flag (`--lr 0.1`, `--lr=0.1`, `--amp`)."""
    groups, i = [], 0
    while i < len(tokens):
        flag = tokens[i].split("=", 1)[0]
        if flag not in spellings:
            hint = "flags of the model scripts start with --" if not flag.startswith("-") else "see their --help"
            raise UsageError(f"after --: {flag!r} is not a flag of the selected model scripts ({hint})")
        field, takes_value = spellings[flag]
        if field in FIGURE3_SETS:
            raise UsageError(f"after --: figure3 sets {flag} itself ({FIGURE3_SETS[field]})")
        if takes_value and "=" not in tokens[i]:
            if i + 1 == len(tokens) or tokens[i + 1].startswith("--"):
                raise UsageError(f"after --: {flag} needs a value")
            groups.append([tokens[i], tokens[i + 1]])
            i += 2
        else:
            groups.append([tokens[i]])
            i += 1
    return groups


def checked_config(module: ModuleType, args: list[str], who: str):
    """The run's settings, parsed and checked as its script does; a refusal becomes one line naming the run."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return experiment.check_settings(module.METHOD, experiment.parse_config(module.METHOD, args))
    except SystemExit:
        message = stderr.getvalue().strip().splitlines()[-1].removeprefix("error: ").removesuffix(" (see --help)")
    except UsageError as error:
        message = str(error)
    raise UsageError(f"{who} refused its flags: {message}")


def build_grid(selection: Selection) -> list[Run]:
    """Every run of the selected grid, seed by seed, each once (Single shared by the pairs of its primary level)."""
    spellings = {method: flag_spellings(SCRIPTS[method]) for method in selection.methods}
    known = {flag: spec for method in selection.methods for flag, spec in spellings[method].items()}
    groups = split_script_flags(selection.script_flags, known)
    runs: dict[tuple, Run] = {}
    for seed in selection.seeds:
        for primary, aux in selection.pairs:
            for method in selection.methods:
                run_aux = aux if METHODS[method].takes_aux else None
                if (method, primary, run_aux, seed) in runs:
                    continue
                own_flags = [
                    token for group in groups if group[0].split("=", 1)[0] in spellings[method] for token in group
                ]
                args = [
                    "--primary-level",
                    str(primary),
                    *(["--aux-level", str(run_aux)] if run_aux is not None else []),
                    "--seed",
                    str(seed),
                    "--results-dir",
                    str(selection.results_dir),
                    *own_flags,
                ]
                module = SCRIPTS[method]
                pair_text = f"{primary}-{run_aux}" if run_aux is not None else f"primary {primary}"
                cfg = checked_config(module, args, f"{script_path(method).name} ({pair_text}, seed {seed})")
                runs[(method, primary, run_aux, seed)] = Run(
                    method=method,
                    primary=primary,
                    aux=run_aux,
                    seed=seed,
                    script=script_path(method),
                    args=tuple(args),
                    epochs=cfg.epochs,
                    run_dir=selection.results_dir / experiment.default_run_name(module.METHOD, cfg),
                    published=tuple(module.METHOD.published_accuracy(cfg).items()),
                )
    return list(runs.values())


# ---------------------------------------------------------------------------------------------
# The state of a run, read from its folder


@dataclass(frozen=True)
class RunState:
    accuracies: tuple[float, ...]  # test primary accuracy (%) of every epoch done, from metrics.json
    has_checkpoint: bool
    running_pid: int | None  # the live process holding the run folder's lock

    @property
    def epochs_done(self) -> int:
        return len(self.accuracies)


def read_state(run: Run) -> RunState:
    try:
        records = json.loads((run.run_dir / "metrics.json").read_text())["epochs"]
        accuracies = tuple(100 * record["test_primary_acc"] for record in records)
    except (OSError, ValueError, KeyError, TypeError):  # no metrics yet; the script rewrites them on resume
        accuracies = ()
    return RunState(
        accuracies=accuracies,
        has_checkpoint=(run.run_dir / "checkpoint.pt").is_file(),
        running_pid=experiment.lock_holder(run.run_dir),
    )


def finished(run: Run, state: RunState) -> bool:
    return state.epochs_done >= run.epochs


def kind(run: Run, state: RunState) -> str:
    if state.running_pid is not None:
        return "running"
    if finished(run, state):
        return "finished"
    return "stopped" if state.epochs_done else "not started"


def describe(run: Run, state: RunState) -> str:
    return {
        "running": f"running (pid {state.running_pid}), {state.epochs_done} of {run.epochs} epochs done",
        "finished": f"finished ({state.epochs_done} epochs)",
        "stopped": f"stopped after epoch {state.epochs_done} of {run.epochs}",
        "not started": "not started",
    }[kind(run, state)]


def command(run: Run, state: RunState, gpu: int | None = None) -> list[str]:
    """The run's command line: --resume when its folder holds a checkpoint; on a GPU of --gpus, --device cuda."""
    device = ["--device", "cuda"] if gpu is not None else []
    resume = ["--resume"] if state.has_checkpoint else []
    return [sys.executable, str(run.script), *run.args, *device, *resume]


def shown(cmd: Sequence[str]) -> str:
    """A command as a user would type it: `python` and the script's path from the current folder."""
    return shlex.join(["python", os.path.relpath(cmd[1]), *cmd[2:]])


def plan_lines(runs: Sequence[Run], states: Sequence[RunState]) -> list[str]:
    lines = []
    for run, state in zip(runs, states):
        lines += [f"{run.name}: {describe(run, state)}", f"    {shown(command(run, state))}"]
    counts: dict[str, int] = {}
    for run, state in zip(runs, states):
        counts[kind(run, state)] = counts.get(kind(run, state), 0) + 1
    lines.append(f"{len(runs)} runs: " + ", ".join(f"{n} {what}" for what, n in counts.items()))
    return lines


# ---------------------------------------------------------------------------------------------
# Running children: logs, GPUs, signals


def child_environment(gpu: int | None) -> dict[str, str]:
    """Unbuffered output (the log shows each epoch as it ends); with --gpus, only the child's GPU visible, counted as
    this process counts them (through its own CUDA_VISIBLE_DEVICES, if set)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if gpu is not None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        env["CUDA_VISIBLE_DEVICES"] = visible.split(",")[gpu] if visible else str(gpu)
    return env


def start_logged(
    cmd: list[str], run_dir: Path, env: dict[str, str], ignore_signal: int | None = None
) -> subprocess.Popen:
    """Start `cmd` in its own session (a terminal's Ctrl-C reaches the parent only, which forwards it once), its
    output appended to run_dir/log.txt after a line naming the command."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "log.txt", "a") as log:
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
        log.flush()
        return subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            # An ignored signal stays ignored across exec: the child does not die of its parent's signal.
            preexec_fn=(lambda: signal.signal(ignore_signal, signal.SIG_IGN)) if ignore_signal else None,
        )


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

    count = torch.cuda.device_count()
    for gpu in gpus:
        if not 0 <= gpu < count:
            have = (
                f"{count} CUDA device(s), numbered from 0" if count else f"no CUDA device (torch {torch.__version__})"
            )
            raise UsageError(f"--gpus {text}: there is no GPU {gpu}; this machine has {have}")
    return [gpu for gpu in gpus for _ in range(runs_per_gpu)]


def check_writable(folder: Path) -> None:
    """Refuse a results folder this process cannot create or write into; the check itself leaves nothing behind."""
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise UsageError(
            f"cannot write results to '{folder}' ({error.strerror or error}); choose another --results-dir"
        ) from None
    finally:
        for path in created:
            with contextlib.suppress(OSError):
                path.rmdir()


def run_grid(runs: Sequence[Run], slots: list[int | None]) -> int:
    """Run what is missing and resume what stopped, len(slots) at a time; returns the exit code. Progress lines
    are flushed as they come (a grid's own output is often a file).

    SIGINT/SIGTERM are forwarded to every child, which stops after writing and keeps its last checkpoint;
    nothing new starts, and the exit code is 128 + the signal."""
    todo = []
    for run in runs:
        state = read_state(run)
        if kind(run, state) in ("running", "finished"):
            print(f"skip  {run.name}: {describe(run, state)}")
        else:
            todo.append(run)
    if not todo:
        print("nothing to do: every run of the grid is finished or running")
        return 0
    received: list[int] = []
    previous = {
        s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)
    }
    active: dict[subprocess.Popen, tuple[Run, int | None, float]] = {}
    failed: list[tuple[Run, int]] = []
    free, forwarded, started = list(slots), 0, 0
    try:
        while (todo and not received) or active:
            while todo and free and not received:
                run, gpu = todo.pop(0), free.pop(0)
                cmd = command(run, read_state(run), gpu)
                started += 1
                where = f" on GPU {gpu}" if gpu is not None else ""
                print(
                    f"start {run.name}{where} ({started} of {started + len(todo)}): {run.run_dir / 'log.txt'}",
                    flush=True,
                )
                active[start_logged(cmd, run.run_dir, child_environment(gpu))] = (run, gpu, time.monotonic())
            if len(received) > forwarded:  # forwarded here, not in the handler: a child started meanwhile gets it too
                for child in active:
                    with contextlib.suppress(ProcessLookupError):
                        child.send_signal(received[-1])
                forwarded = len(received)
            for child in [c for c in active if c.poll() is not None]:
                run, gpu, since = active.pop(child)
                free.append(gpu)
                if child.returncode == 0:
                    print(f"done  {run.name} in {(time.monotonic() - since) / 60:.1f} min", flush=True)
                elif received:
                    print(f"stopped {run.name}; its last checkpoint is kept", flush=True)
                else:
                    print(f"FAIL  {run.name} ({exit_text(child.returncode)})", flush=True)
                    failed.append((run, child.returncode))
            time.sleep(POLL_SECONDS)
    finally:
        for child in active:  # only after an exception in this process: leave no child behind
            stop(child)
        for s, handler in previous.items():
            signal.signal(s, handler)
    for run, code in failed:
        print(f"failed: {run.name} ({exit_text(code)}); see {run.run_dir / 'log.txt'}", file=sys.stderr)
    if received:
        print(
            f"interrupted: every child stopped and keeps its last checkpoint; run the same command again to continue "
            f"({len(todo)} runs not started)",
            file=sys.stderr,
        )
        return 128 + received[0]
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------
# SLURM through submitit


class RunJob:
    """One run of the grid as a submitit job: the model script as a child process, resumed from its checkpoint
    when its folder holds one.

    submitit calls `checkpoint` (its checkpointing protocol, which submitit.helpers.Checkpointable implements by
    requeuing `self`) when the job is preempted or nears its time limit: the child is stopped (it keeps its last
    checkpoint) and the same call is requeued, which resumes it. Not a Checkpointable subclass: figure3 imports
    submitit only in `submit`, and the live child must not be pickled with the requeued call."""

    def __init__(self, python: str, script: str, args: Sequence[str], run_dir: str, cwd: str):
        self.python, self.script, self.args, self.run_dir, self.cwd = python, script, tuple(args), run_dir, cwd
        self.child: subprocess.Popen | None = None

    def command(self) -> list[str]:
        resume = ["--resume"] if (Path(self.cwd) / self.run_dir / "checkpoint.pt").is_file() else []
        return [self.python, self.script, *self.args, *resume]

    def __call__(self) -> str:
        os.chdir(self.cwd)  # the grid's relative paths (results, data) as at submission
        preempt_signal = signal.Signals["SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")]
        run_dir = Path(self.run_dir)
        self.child = start_logged(self.command(), run_dir, child_environment(None), ignore_signal=preempt_signal)
        # poll, not wait(): submitit's signal handler runs `checkpoint` in this thread, and a blocking wait() would
        # hold the lock that checkpoint's own wait needs
        while self.child.poll() is None:
            time.sleep(1)
        if self.child.returncode != 0:
            raise RuntimeError(f"{run_dir.name}: {exit_text(self.child.returncode)}; see {run_dir / 'log.txt'}")
        return f"{run_dir.name} finished"

    def checkpoint(self) -> DelayedSubmission:
        from submitit.helpers import DelayedSubmission

        if self.child is not None and self.child.poll() is None:
            stop(self.child)
        return DelayedSubmission(RunJob(self.python, self.script, self.args, self.run_dir, self.cwd))


def parse_time(text: str) -> int:
    """A SLURM time limit (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in whole minutes, rounded up."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise UsageError(f"--time {text!r} is not a SLURM time (minutes, HH:MM:SS or D-HH:MM:SS)")
    days, first, second, third = (int(g) if g else None for g in match.groups())
    if days is not None:
        seconds = days * 86400 + first * 3600 + (second or 0) * 60 + (third or 0)
    elif third is not None:
        seconds = first * 3600 + second * 60 + third
    else:
        seconds = first * 60 + (second or 0)
    if seconds <= 0:
        raise UsageError(f"--time {text}: the time limit must be positive")
    return math.ceil(seconds / 60)


def parse_slurm_parameters(items: Sequence[str]) -> dict[str, str]:
    parameters = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--slurm {item!r} is not KEY=VALUE (e.g. --slurm constraint=h100 --slurm mem=64G)")
        parameters[key.strip()] = value
    return parameters


def import_extra(name: str, purpose: str, otherwise: str = "") -> ModuleType:
    """An optional extra (submitit, matplotlib), imported only by what needs it; refused with the install command."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise UsageError(f"{purpose} needs {name.split('.')[0]}, an optional extra: {EXTRAS}{otherwise}") from None


def submit_grid(runs: Sequence[Run], args: argparse.Namespace) -> int:
    """One array job of the runs still to do, one GPU each; with --cluster local, waits for them."""
    submitit = import_extra("submitit", "submit")
    timeout_min = parse_time(args.time)
    slurm_parameters = parse_slurm_parameters(args.slurm)
    if args.array_parallelism is not None and args.array_parallelism < 1:
        raise UsageError(f"--array-parallelism must be at least 1 (got {args.array_parallelism})")
    if args.cluster == "slurm" and shutil.which("sbatch") is None:
        raise UsageError("submit: SLURM's sbatch is not on this machine; run it on the cluster (or --cluster local)")
    todo = []
    for run in runs:
        state = read_state(run)
        if kind(run, state) in ("running", "finished"):
            print(f"skip  {run.name}: {describe(run, state)}")
        else:
            todo.append(run)
    if not todo:
        print("nothing to submit: every run of the grid is finished or running")
        return 0
    folder = args.results_dir / REPORT_FOLDER / "submitit"
    executor = submitit.AutoExecutor(
        folder=folder,
        cluster=args.cluster,
        slurm_max_num_timeout=MAX_TIMEOUT_REQUEUES,
        local_max_num_timeout=MAX_TIMEOUT_REQUEUES,
    )
    executor.update_parameters(
        name="figure3",
        timeout_min=timeout_min,
        gpus_per_node=1,
        tasks_per_node=1,
        slurm_partition=args.partition,
        slurm_array_parallelism=args.array_parallelism,
        slurm_additional_parameters=slurm_parameters,
    )
    cwd = os.getcwd()
    jobs_of_runs = [
        RunJob(python=sys.executable, script=str(run.script), args=run.args, run_dir=str(run.run_dir), cwd=cwd)
        for run in todo
    ]
    with executor.batch():
        jobs = [executor.submit(job) for job in jobs_of_runs]
    for run, job in zip(todo, jobs):
        print(f"job {job.job_id}: {run.name} (log {run.run_dir / 'log.txt'})")
    print(f"submitted {len(jobs)} runs; submitit's logs are in {folder}")
    if args.cluster != "local":
        return 0
    failed = []
    for run, job in zip(todo, jobs):
        try:
            job.result()
            print(f"done  {run.name}")
        except Exception as error:  # submitit re-raises the job's error here, with its traceback as text
            failed.append(run)
            print(
                f"failed: {run.name} ({str(error).strip().splitlines()[-1]}); see {run.run_dir / 'log.txt'}",
                file=sys.stderr,
            )
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------
# The report: the table, report.md and the picture


@dataclass(frozen=True)
class Cell:
    """A method at a pair over seeds: the mean of the last 5 epochs' test accuracy (%) of each seed's run."""

    values: tuple[float, ...]
    epochs_done: tuple[int, ...]
    running: int  # runs still going (their folder is locked by a live process)
    unfinished: int  # runs stopped before their last epoch

    def text(self) -> str:
        if not self.values:
            return "—"
        low, high = min(self.epochs_done), max(self.epochs_done)
        notes = [f"n={len(self.values)}", f"{low} ep" if low == high else f"{low}–{high} ep"]
        notes += [f"{n} {what}" for n, what in ((self.running, "running"), (self.unfinished, "stopped")) if n]
        return f"{mean_std(self.values)} ({', '.join(notes)})"


def last_epochs_mean(accuracies: Sequence[float]) -> float:
    return statistics.fmean(accuracies[-LAST_EPOCHS:])


def mean_std(values: Sequence[float], signed: bool = False) -> str:
    sign = "+" if signed else ""
    if len(values) == 1:
        return f"{values[0]:{sign}.2f}"
    return f"{statistics.fmean(values):{sign}.2f} ± {statistics.stdev(values):.2f}"


def runs_at(runs: Sequence[Run], method: str, pair: tuple[int, int]) -> list[Run]:
    return [run for run in runs if run.method == method and run.serves(pair)]


def cell(runs: Sequence[Run], states: dict[Run, RunState], method: str, pair: tuple[int, int]) -> Cell:
    done = [run for run in runs_at(runs, method, pair) if states[run].epochs_done]
    return Cell(
        values=tuple(last_epochs_mean(states[run].accuracies) for run in done),
        epochs_done=tuple(states[run].epochs_done for run in done),
        running=sum(states[run].running_pid is not None for run in done),
        unfinished=sum(states[run].running_pid is None and not finished(run, states[run]) for run in done),
    )


def paired_differences(
    runs: Sequence[Run], states: dict[Run, RunState], method: str, other: str, pair: tuple[int, int]
) -> list[float]:
    """Per seed where both have epochs: last-5 mean of `method` minus that of `other`."""
    by_seed = {
        name: {
            run.seed: last_epochs_mean(states[run].accuracies)
            for run in runs_at(runs, name, pair)
            if states[run].epochs_done
        }
        for name in (method, other)
    }
    return [by_seed[method][seed] - by_seed[other][seed] for seed in sorted(by_seed[method]) if seed in by_seed[other]]


def published_text(runs: Sequence[Run], pair: tuple[int, int], sources: list[str]) -> str:
    """What is published for the pair: the scripts' figures ([n] = the n-th source), else the authors' words."""
    figures = []
    for method in METHODS:
        at_pair = runs_at(runs, method, pair)
        if at_pair and at_pair[0].published:
            numbers = []
            for source, value in at_pair[0].published:
                if source not in sources:
                    sources.append(source)
                numbers.append(f"{value:.1f} [{sources.index(source) + 1}]")
            figures.append(f"{METHODS[method].label} {', '.join(numbers)}")
    words = "MAXL's best pair [*]" if pair == PAIRS[-1] else "plot only [*]"
    return "; ".join([*figures, words])


def report_table(selection: Selection, runs: Sequence[Run], states: dict[Run, RunState]) -> str:
    """The markdown table (rows: pairs; columns: methods, differences, what is published) and its notes."""
    differences = [
        (method, other)
        for method in selection.methods
        for other in METHODS[method].compared_with
        if other in selection.methods
    ]
    header = [
        "pair",
        *(METHODS[m].label for m in selection.methods),
        *(f"{METHODS[m].label} − {METHODS[o].label}" for m, o in differences),
        "published",
    ]
    rows, sources = [], []
    for pair in selection.pairs:
        row = [f"{pair[0]} → {pair[1]}", *(cell(runs, states, m, pair).text() for m in selection.methods)]
        for method, other in differences:
            diffs = paired_differences(runs, states, method, other, pair)
            row.append(f"{mean_std(diffs, signed=True)} (n={len(diffs)})" if diffs else "—")
        rows.append([*row, published_text(runs, pair, sources)])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += [
        "",
        f"Test accuracy of the primary task (%), the mean of each run's last {LAST_EPOCHS} epochs, as mean ± std over "
        "seeds (n seeds, epochs done); differences are paired by seed.",
        *(f"[{i}] {source}" for i, source in enumerate(sources, 1)),
        f"[*] {AUTHORS_WORDS}.",
    ]
    reasons = sorted({reason for run in runs if states[run].epochs_done for reason in not_comparable_because(run)})
    if reasons:
        lines.append(f"Not comparable with the published figures: {', '.join(reasons)} (in some or all runs).")
    return "\n".join(lines)


def not_comparable_because(run: Run) -> list[str]:
    """The script's own reasons, from the run's metrics.json summary."""
    try:
        return json.loads((run.run_dir / "metrics.json").read_text())["summary"]["not_comparable_because"]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def curves_by_pair(selection: Selection, runs: Sequence[Run], states: dict[Run, RunState]) -> dict:
    """{pair: {method: [accuracy per epoch, one list per seed]}}: what the figure plots."""
    return {
        pair: {
            method: [list(states[run].accuracies) for run in runs_at(runs, method, pair) if states[run].epochs_done]
            for method in selection.methods
        }
        for pair in selection.pairs
    }


def make_figure(curves: dict) -> Figure:
    """One panel per pair (the layout of the paper's Figure 3): test accuracy against epoch, one line per method
    (the mean over seeds), the spread over seeds (± one standard deviation) as a band."""
    from matplotlib.figure import Figure

    columns = min(3, len(curves))
    rows = math.ceil(len(curves) / columns)
    figure = Figure(figsize=(4.2 * columns, 3.3 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, (pair, by_method) in zip(axes, curves.items()):
        for method, seed_curves in by_method.items():
            if not seed_curves:
                continue
            epochs, means, stds = mean_curve(seed_curves)
            (line,) = ax.plot(epochs, means, label=METHODS[method].label, linewidth=1.2)
            if len(seed_curves) > 1:
                ax.fill_between(
                    epochs,
                    [m - s for m, s in zip(means, stds)],
                    [m + s for m, s in zip(means, stds)],
                    color=line.get_color(),
                    alpha=0.2,
                    linewidth=0,
                )
        ax.set_title(f"primary {pair[0]}, auxiliary {pair[1]}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize="small")
    for ax in axes[len(curves) :]:
        figure.delaxes(ax)
    return figure


def mean_curve(seed_curves: Sequence[Sequence[float]]) -> tuple[list[int], list[float], list[float]]:
    """Per epoch, the mean and standard deviation over the seeds that reached it (0 where only one did)."""
    epochs, means, stds = [], [], []
    for e in range(max(len(c) for c in seed_curves)):
        values = [c[e] for c in seed_curves if len(c) > e]
        epochs.append(e + 1)
        means.append(statistics.fmean(values))
        stds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
    return epochs, means, stds


def report(selection: Selection, runs: Sequence[Run], draw: bool) -> int:
    """Print the table; write report.md and (draw) figure3.png into <results-dir>/figure3/."""
    states = {run: read_state(run) for run in runs}
    if not any(state.epochs_done for state in states.values()):
        raise UsageError(
            f"report: none of the grid's {len(runs)} runs has a finished epoch in '{selection.results_dir}' "
            f"(e.g. '{runs[0].run_dir}'); run `python figure3.py run` first, with the same selection and flags after --"
        )
    table = report_table(selection, runs, states)
    print(table)
    if draw:
        import_extra("matplotlib.figure", "the picture figure3.png", " (or --no-figure: the table and report.md only)")
    folder = selection.results_dir / REPORT_FOLDER
    check_writable(folder)
    folder.mkdir(parents=True, exist_ok=True)
    run_lines = [
        f"- `{run.name}`: {describe(run, states[run])}"
        + (
            f", last-{LAST_EPOCHS} mean {last_epochs_mean(states[run].accuracies):.2f}%"
            if states[run].epochs_done
            else ""
        )
        for run in runs
    ]
    flags = shlex.join(selection.script_flags)
    markdown = "\n".join(
        [
            "# MAXL, Figure 3: CIFAR-100 hierarchy, primary and auxiliary levels",
            "",
            f"Methods {', '.join(selection.methods)}; seeds {', '.join(map(str, selection.seeds))}; "
            f"flags after --: {flags or 'none'}.",
            "",
            table,
            "",
            *(["![Figure 3](figure3.png)", ""] if draw else []),
            "## Runs",
            "",
            *run_lines,
            "",
        ]
    )
    experiment.write_atomic(folder / "report.md", lambda tmp: Path(tmp).write_text(markdown))
    written = [folder / "report.md"]
    if draw:
        figure = make_figure(curves_by_pair(selection, runs, states))
        experiment.write_atomic(folder / "figure3.png", lambda tmp: figure.savefig(tmp, dpi=150, format="png"))
        written.append(folder / "figure3.png")
    print(f"\nwrote {' and '.join(map(str, written))}")
    return 0


# ---------------------------------------------------------------------------------------------
# Command line


SCRIPT_FLAGS_HELP = (
    "Flags after -- go to every run whose model script has them, e.g. -- --epochs 50 --meta-grad finite-difference."
)


def command_line() -> OneLineParser:
    parser = OneLineParser(
        prog="figure3.py",
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,  # a typo of one flag must not silently mean another
        epilog=SCRIPT_FLAGS_HELP,
    )
    grid = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    grid.add_argument(
        "--methods",
        default=",".join(name for name, m in METHODS.items() if m.default),
        help=f"comma list of {', '.join(METHODS)} (default: %(default)s, the paper's Figure 3)",
    )
    grid.add_argument(
        "--pairs",
        default=",".join(f"{p}-{a}" for p, a in PAIRS),
        help="comma list of primary-auxiliary level pairs (default: all six)",
    )
    grid.add_argument("--seeds", default="0", help="comma list of seeds (default: %(default)s)")
    grid.add_argument("--results-dir", type=Path, default=Path("results"), help="as the scripts' (default: results)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{plan,run,submit,report}")
    subcommand = {
        name: commands.add_parser(name, parents=[grid], allow_abbrev=False, epilog=SCRIPT_FLAGS_HELP, help=text)
        for name, text in (
            ("plan", "every run: its state and exact command"),
            ("run", "run what is missing, resume what stopped"),
            ("submit", "the same grid as a SLURM job array (submitit)"),
            ("report", "the table, report.md and figure3.png"),
        )
    }
    run = subcommand["run"]
    run.add_argument("--gpus", help="comma list of GPU numbers: one run on each at once (default: one run at a time)")
    run.add_argument("--runs-per-gpu", type=int, default=1, help="runs at once on each GPU of --gpus (default: 1)")
    submit = subcommand["submit"]
    submit.add_argument("--partition", help="SLURM partition")
    submit.add_argument("--time", required=True, help="time limit per job, as SLURM writes it (e.g. 12:00:00)")
    submit.add_argument("--array-parallelism", type=int, help="at most this many jobs of the array at once")
    submit.add_argument(
        "--slurm", action="append", default=[], metavar="KEY=VALUE", help="any other sbatch parameter (repeatable)"
    )
    submit.add_argument(
        "--cluster",
        choices=("slurm", "local"),
        default="slurm",
        help="local: submitit's local executor on this machine, waiting for the jobs (a test without a cluster)",
    )
    subcommand["report"].add_argument(
        "--no-figure", dest="figure", action="store_false", help="only the table and report.md (no matplotlib needed)"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    try:
        args = command_line().parse_args(argv[:split])
        selection = Selection(
            methods=parse_methods(args.methods),
            pairs=parse_pairs(args.pairs),
            seeds=parse_seeds(args.seeds),
            results_dir=args.results_dir,
            script_flags=tuple(argv[split + 1 :]),
        )
        runs = build_grid(selection)
        if args.command == "plan":
            print("\n".join(plan_lines(runs, [read_state(run) for run in runs])))
            code = 0
        elif args.command == "run":
            if args.gpus is not None and any(token.split("=")[0] == "--device" for token in selection.script_flags):
                raise UsageError("after --: figure3 run --gpus sets each run's --device itself")
            slots = check_gpus(args.gpus, args.runs_per_gpu)
            check_writable(selection.results_dir)
            code = run_grid(runs, slots)
        elif args.command == "submit":
            check_writable(selection.results_dir)
            code = submit_grid(runs, args)
        else:
            code = report(selection, runs, draw=args.figure)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(code)


if __name__ == "__main__":
    main()
