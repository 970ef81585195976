"""The MAXL paper's Figure 3 in one command: Single, Human and MAXL on every pair of the CIFAR-100 hierarchy.

The grid: Single at primary levels 3, 10 and 20 (one run per level, shared by the pairs with that primary
level), Human and MAXL at the six (primary, auxiliary) pairs 3-10, 3-20, 3-100, 10-20, 10-100, 20-100, for
each seed. Every run is a model script, run as itself in its own folder <results-dir>/<run-name>/ (the
name the script itself chooses; the script writes its own log.txt there). What a child prints goes to its
job log, <results-dir>/figure3/jobs/<run-name>.log.

    python figure3.py plan                                  # every run: its state and exact command
    python figure3.py run                                   # runs what is missing, resumes what stopped
    python figure3.py run --gpus 0,1,2,3 --runs-per-gpu 2 --seeds 0,1,2 -- --meta-grad finite-difference
    python figure3.py submit --partition gpu --time 12:00:00      # the same grid on SLURM (submitit)
    python figure3.py report                                # the table, results/figure3/report.md and .png
    python figure3.py report --out /tmp/figure3             # the same, written elsewhere (read-only results)

--methods, --pairs and --seeds select part of the grid (wamal and maoal are opt-in). Flags after `--` go
to every run whose script has them (`-- --epochs 50`); a flag none of the selected scripts has is refused.
`report` without flags after `--` finds each run by the settings its metrics.json records; with them, by
the folder names those flags give. Two `run`s (or a `run` and a `submit`) may share one grid: a run that
another process holds is skipped as running elsewhere. plan, run and report need only what the model
scripts need; submit and the picture need the extras (pip install -r requirements-extras.txt).

Cost, projected from benchmarks/README.md (one H100, 200 epochs: about 6 minutes for Single or Human, 31 for
MAXL): about 4 hours per seed for the 15 runs one at a time; --gpus and --runs-per-gpu run several at once.

The runner (a grid's runs read from their folders, plan, run with its job pool and job logs, submit, the runs
found by their recorded settings, the cells' numbers) is this module's; tables.py, the datasets x backbones
tables, is the same runner on another grid.
"""

from __future__ import annotations

import argparse
import contextlib
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
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, TextIO

import experiment
import model_vgg_human
import model_vgg_maoal
import model_vgg_maxl
import model_vgg_single
import model_vgg_wamal
from experiment import OneLineParser, UsageError, plural

if TYPE_CHECKING:  # the optional extras, for annotations only: imported where used
    from matplotlib.axes import Axes
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
REPORT_FOLDER = "figure3"  # inside --results-dir: report.md, figure3.png, jobs/, submitit/
JOBS_FOLDER = "jobs"  # inside REPORT_FOLDER: <run-name>.log, what the children of that run printed
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
    "dataset": "Figure 3 is CIFAR-100's hierarchy; tables.py runs the other datasets",
    "seed": "use --seeds",
    "results_dir": "use figure3's --results-dir, before --",
    "run_name": "figure3 finds every run by its default name",
    "resume": "figure3 resumes what stopped and never redoes a finished run",
    "overwrite": "figure3 never redoes a finished run; remove its folder to start it over",
    "smoke": "the grid's runs are real runs",
    "help": "see python model_vgg_<method>.py --help",
}
POLL_SECONDS = 0.1  # how often `run` looks at its children
PROGRESS_SECONDS = 5.0  # `run` prints a progress line at most this often, and only when an epoch has ended
STOP_WAIT_SECONDS = 60  # how long a stopped child may take to finish writing before it is killed
MAX_TIMEOUT_REQUEUES = 20  # a run longer than --time goes on in further jobs, each resuming the last one's checkpoint
# The one line a model script prints (exit code 2) when another process holds its run folder's lock.
IN_USE = re.compile(r"^error: '.*' is in use by another run \((?P<holder>[^)]*)\)", re.MULTILINE)
# Recorded settings that say where a run was written, not what it computed: not shown as a difference.
BOOKKEEPING = {"run_name", "results_dir", "resume", "overwrite", "smoke", "download", "workers", "tensorboard"}
# The data and network settings as a run recorded before they existed ran them: the paper's.
RECORDED_DEFAULTS = {"dataset": "cifar100", "backbone": "vgg16", "stem": None, "pretrained": False}
RECORDED_DEFAULTS |= {"image_size": 32, "train_fraction": 1.0}


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
    dataset: str = "cifar100"  # its recorded --dataset and --backbone (figure3's grid: the paper's, or -- --backbone)
    backbone: str = "vgg16"
    folder: str = REPORT_FOLDER  # the grid's own folder in --results-dir, which holds the job logs

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def slot(self) -> tuple[str, str, str, int, int | None, int]:
        """Its place in a grid, whatever its other settings: (method, dataset, backbone, primary level, auxiliary
        level, seed), as its metrics.json records them (recorded_slot)."""
        return self.method, self.dataset, self.backbone, self.primary, self.aux, self.seed

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
        """Whose epochs its time left is estimated from: its method's, on the same data and network (an epoch of
        Food-101 at 224 pixels takes many of CIFAR-10's)."""
        if (self.dataset, self.backbone) == ("cifar100", "vgg16"):
            return self.method
        return f"{self.method} on {self.dataset} with {self.backbone}"

    @property
    def job_log(self) -> Path:
        return self.run_dir.parent / self.folder / JOBS_FOLDER / f"{self.name}.log"

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


def split_script_flags(
    tokens: Sequence[str], spellings: dict[str, tuple[str, bool]], sets: dict[str, str] = FIGURE3_SETS, who="figure3"
) -> list[list[str]]:
    """The flags after `--`, one group of tokens per flag (`--lr 0.1`, `--lr=0.1`, `--amp`); a flag the runner `who`
    sets itself (`sets`: its field -> what to use instead) is refused."""
    groups, i = [], 0
    while i < len(tokens):
        flag = tokens[i].split("=", 1)[0]
        if flag not in spellings:
            hint = "flags of the model scripts start with --" if not flag.startswith("-") else "see their --help"
            raise UsageError(f"after --: {flag!r} is not a flag of the selected model scripts ({hint})")
        field, takes_value = spellings[flag]
        if field in sets:
            raise UsageError(f"after --: {who} sets {flag} itself ({sets[field]})")
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
                    **data_and_network(cfg),
                )
    return list(runs.values())


def data_and_network(cfg) -> dict[str, str]:
    """A checked config's dataset and backbone (a script without those settings runs the paper's)."""
    return {name: getattr(cfg, name, RECORDED_DEFAULTS[name]) for name in ("dataset", "backbone")}


# ---------------------------------------------------------------------------------------------
# The state of a run, read from its folder


@dataclass(frozen=True)
class Metrics:
    """What figure3 takes from a run's metrics.json. A file it cannot use (truncated, not JSON, an accuracy that
    is not a finite fraction) is `damaged`, with the reason: no number of it is used."""

    accuracies: tuple[float, ...] = ()  # test primary accuracy (%) of every epoch done
    epoch_seconds: tuple[float, ...] = ()  # each epoch's time, where recorded: the grid's time left
    not_comparable_because: tuple[str, ...] = ()  # the script's reasons, from the summary
    config: dict | None = None  # the run's recorded settings
    damaged: str | None = None


def read_metrics(path: Path) -> Metrics | None:
    """The metrics file at `path`, checked; None when there is none."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as error:
        return Metrics(damaged=f"unreadable ({error.strerror or error})")
    except UnicodeDecodeError:
        return Metrics(damaged="not text")
    try:
        record = json.loads(text)  # Python reads a hand-written Infinity or NaN too: checked below
    except json.JSONDecodeError as error:
        return Metrics(damaged=json_damage(text, error))
    config = record.get("config") if isinstance(record, dict) else None
    config = config if isinstance(config, dict) else None  # kept with damaged numbers: it still finds the run
    try:
        accuracies = epoch_accuracies(record)
    except ValueError as error:
        return Metrics(config=config, damaged=str(error))
    summary = record.get("summary")
    reasons = summary.get("not_comparable_because") if isinstance(summary, dict) else None
    return Metrics(
        accuracies=accuracies,
        epoch_seconds=tuple(e["seconds"] for e in record["epochs"] if is_number(e.get("seconds"))),
        not_comparable_because=tuple(r for r in reasons if isinstance(r, str)) if isinstance(reasons, list) else (),
        config=config,
    )


def json_damage(text: str, error: json.JSONDecodeError) -> str:
    if not text.strip():
        return "empty"
    if error.pos >= len(text.rstrip()) or error.msg.startswith("Unterminated string"):
        return f"truncated (the JSON stops at line {error.lineno})"
    return f"not JSON ({error.msg} at line {error.lineno}, column {error.colno})"


def is_number(value) -> bool:
    """A finite int or float (JSON's true and false are Python ints, and are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def epoch_accuracies(record) -> tuple[float, ...]:
    """Every epoch's test_primary_acc (a fraction) in %; ValueError naming the first epoch that has none."""
    epochs = record.get("epochs") if isinstance(record, dict) else None
    if not isinstance(epochs, list):
        raise ValueError("it holds no list of epochs")
    if not epochs:
        raise ValueError("it records no epoch")
    accuracies = []
    for number, entry in enumerate(epochs, 1):
        value = entry.get("test_primary_acc") if isinstance(entry, dict) else None
        if value is None:
            raise ValueError(f"epoch {number} has no test_primary_acc")
        shown_value = json.dumps(value)[:40]  # as the file spells it: Infinity, "abc"
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"epoch {number}'s test_primary_acc is {shown_value}, not a number")
        if not math.isfinite(value):
            raise ValueError(f"epoch {number}'s test_primary_acc is {shown_value}, not a finite number")
        if not 0 <= value <= 1:
            raise ValueError(f"epoch {number}'s test_primary_acc is {shown_value}, not a fraction between 0 and 1")
        accuracies.append(100 * value)
    return tuple(accuracies)


@dataclass(frozen=True)
class RunState:
    metrics: Metrics | None  # None: no metrics.json
    has_checkpoint: bool
    running_pid: int | None  # the live process holding the run folder's lock

    @property
    def damaged(self) -> str | None:
        return self.metrics.damaged if self.metrics else None

    @property
    def accuracies(self) -> tuple[float, ...]:
        return self.metrics.accuracies if self.metrics else ()

    @property
    def epochs_done(self) -> int:
        return len(self.accuracies)


def read_state(run: Run) -> RunState:
    return RunState(
        metrics=read_metrics(run.run_dir / "metrics.json"),
        has_checkpoint=(run.run_dir / "checkpoint.pt").is_file(),
        running_pid=experiment.lock_holder(run.run_dir),
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


def progress_text(run: Run, state: RunState) -> str:
    return f"{state.epochs_done} of {plural(run.epochs, 'epoch')} done"


def describe(run: Run, state: RunState) -> str:
    what = kind(run, state)
    if what == "running":
        return f"running (pid {state.running_pid}), {progress_text(run, state)}"
    if what == "damaged":
        kept = "checkpoint.pt kept" if state.has_checkpoint else "no checkpoint.pt"
        return f"metrics damaged: {state.damaged} ({kept})"
    if what == "finished":
        return f"finished ({plural(state.epochs_done, 'epoch')})"
    if what == "stopped" and not state.epochs_done:  # killed between writing the checkpoint and metrics.json
        return "stopped: checkpoint.pt but no metrics.json yet (resuming writes it)"
    if what == "stopped":
        return f"stopped after epoch {state.epochs_done} of {run.epochs}"
    return "not started"


def elsewhere(run: Run, state: RunState) -> str:
    """A run whose folder another live process holds, as `run` and `submit` skip it."""
    return f"running elsewhere (pid {state.running_pid}), {progress_text(run, state)}"


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
    lines.append(f"{plural(len(runs), 'run')}: " + ", ".join(f"{n} {what}" for what, n in counts.items()))
    return lines


def sort_out(runs: Sequence[Run]) -> tuple[list[Run], list[tuple[Run, str]]]:
    """The runs `run` and `submit` start, in order, and those they refuse with the reason; the skipped ones (finished,
    running elsewhere) are printed. Damaged metrics with a checkpoint are started: resuming rewrites them."""
    todo, refused = [], []
    for run in runs:
        state = read_state(run)
        what = kind(run, state)
        if what == "running":
            print(f"skip  {run.name}: {elsewhere(run, state)}")
        elif what == "finished":
            print(f"skip  {run.name}: {describe(run, state)}")
        elif what == "damaged" and not state.has_checkpoint:
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

    The child started with it as its output inherits the open file, and with it the lock, which so lasts until
    the child (and whatever it started) has ended, even if this process dies first. So two processes never
    write one job log at once, and a second figure3 learns that the run is going elsewhere."""
    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "a")
    try:
        fcntl.flock(log.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.close()
        return None
    return log


def start_logged(
    cmd: list[str], job_log: Path, env: dict[str, str], ignore_signal: int | None = None
) -> tuple[subprocess.Popen, int] | None:
    """Start `cmd` in its own session (a terminal's Ctrl-C reaches the parent only, which forwards it once), its
    output appended to its job log after a line naming the command. Returns the child and the offset in the log
    where its output begins; None, starting nothing, when another process holds the log."""
    log = open_job_log(job_log)
    if log is None:
        return None
    with log:  # closed here once the child has its own copy, which holds the lock from now on
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
        log.flush()
        output_from = os.fstat(log.fileno()).st_size  # before the child can write
        child = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            # An ignored signal stays ignored across exec: the child does not die of its parent's signal.
            preexec_fn=(lambda: signal.signal(ignore_signal, signal.SIG_IGN)) if ignore_signal else None,
        )
        return child, output_from


def lock_refusal(job_log: Path, offset: int) -> str | None:
    """The holder ('pid N on HOST') that a child exiting with code 2 named when it found its run folder locked
    (the race where another process started the run too), read from the child's part of its job log; None when
    the child stopped for another reason."""
    try:
        with open(job_log, "rb") as log:
            log.seek(offset)
            match = IN_USE.search(log.read().decode(errors="replace"))
    except OSError:
        return None
    return match["holder"] if match else None


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
    for gpu in gpus:
        if not 0 <= gpu < devices:
            have = (
                f"{devices} CUDA device(s), numbered from 0"
                if devices
                else f"no CUDA device (torch {torch.__version__})"
            )
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


def check_writable(folder: Path) -> None:
    """Refuse a results folder this process cannot create or write into."""
    reason = unwritable_because(folder)
    if reason:
        raise UsageError(f"cannot write results to '{folder}' ({reason}); choose another --results-dir")


# ---------------------------------------------------------------------------------------------
# `run`: the grid on this machine, with its progress


@dataclass
class Job:
    run: Run
    child: subprocess.Popen
    output_from: int  # where the child's output begins in its job log
    gpu: int | None
    since: float  # time.monotonic() at its start


def seconds_per_epoch(states: dict[Run, RunState]) -> dict[str, float]:
    """Per kind of run (Run.timed_as: the method, and the data and network where not the paper's), the mean time of
    the epochs its runs have finished (their metrics record each epoch's)."""
    by_kind: dict[str, list[float]] = {}
    for run, state in states.items():
        by_kind.setdefault(run.timed_as, []).extend(state.metrics.epoch_seconds if state.metrics else ())
    return {kind: statistics.fmean(seconds) for kind, seconds in by_kind.items() if seconds}


def duration_text(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def time_left(remaining: Sequence[tuple[Run, int]], per_epoch: dict[str, float], parallel: int) -> str:
    """The grid's time left, from (run, epochs done) of every run still to finish: the work of its epochs left, shared
    by `parallel` slots, and never less than its longest run's. Kinds of run (Run.timed_as, as `per_epoch` is keyed)
    with no epoch timed yet are named."""
    left = [(run, max(0, run.epochs - done)) for run, done in remaining]
    left = [(run, epochs) for run, epochs in left if epochs]
    timed = [epochs * per_epoch[run.timed_as] for run, epochs in left if run.timed_as in per_epoch]
    order = {run.timed_as: (list(METHODS).index(run.method), run.timed_as) for run, _ in left}
    untimed = sorted({run.timed_as for run, _ in left if run.timed_as not in per_epoch}, key=order.get)
    if not left:
        return "no epoch left"
    if not timed:
        return "time left: not known until an epoch has ended"
    estimate = duration_text(max(sum(timed) / max(1, min(parallel, len(left))), max(timed)))
    if untimed:
        return f"at least {estimate} left (no {', '.join(untimed)} epoch timed yet)"
    return f"about {estimate} left"


class GridRun:
    """One `figure3.py run`: starts the runs to do as slots free up, each re-checked just before it starts (another
    process may have started or finished it meanwhile); prints each start and end, and a progress line when an
    epoch has ended, at most every PROGRESS_SECONDS.

    SIGINT/SIGTERM are forwarded to every child, which stops after writing and keeps its last checkpoint; nothing
    new starts. Progress lines are flushed as they come (a grid's own output is often a file)."""

    def __init__(self, runs: Sequence[Run], todo: Sequence[Run], slots: list[int | None]):
        self.states = {run: read_state(run) for run in runs}
        self.todo = list(todo)
        self.free = list(slots)
        self.parallel = len(slots)
        self.jobs: list[Job] = []
        self.failed: list[tuple[Run, str]] = []
        self.received: list[int] = []
        self.started = 0
        self.progress_checked = -math.inf

    def go(self) -> None:
        previous = {
            s: signal.signal(s, lambda signum, frame: self.received.append(signum))
            for s in (signal.SIGINT, signal.SIGTERM)
        }
        forwarded = 0
        try:
            while (self.todo and not self.received) or self.jobs:
                while self.todo and self.free and not self.received:
                    self.start(self.todo.pop(0), self.free.pop(0))
                if len(self.received) > forwarded:  # forwarded here, not in the handler: a child started meanwhile too
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
        if kind(run, state) in ("running", "finished"):  # since the grid was first read
            print(
                f"skip  {run.name}: {elsewhere(run, state) if state.running_pid else describe(run, state)}", flush=True
            )
            self.free.append(gpu)
            return
        started = start_logged(command(run, state, gpu), run.job_log, child_environment(gpu))
        if started is None:
            holder = experiment.lock_holder(run.run_dir)
            who = f"pid {holder}" if holder else f"another process holds its job log {run.job_log}"
            print(f"skip  {run.name}: running elsewhere ({who})", flush=True)
            self.free.append(gpu)
            return
        child, output_from = started
        self.jobs.append(Job(run, child, output_from, gpu, time.monotonic()))  # first: a failing print stops it too
        self.states[run] = state  # what its progress is measured from
        self.started += 1
        where = f" on GPU {gpu}" if gpu is not None else ""
        total = self.started + len(self.todo)
        print(f"start {run.name}{where} ({self.started} of {total}): {run.job_log}", flush=True)

    def conclude(self, job: Job) -> None:
        run, code = job.run, job.child.returncode
        self.states[run] = state = read_state(run)
        holder = lock_refusal(run.job_log, job.output_from) if code == 2 else None
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
        """A line when a job's epoch has ended since the last look, which is at most every PROGRESS_SECONDS (its
        metrics.json is read no more often either): a line per epoch, or fewer lines when epochs are quick."""
        if time.monotonic() - self.progress_checked < PROGRESS_SECONDS or not self.jobs:
            return
        self.progress_checked = time.monotonic()
        before = {job.run: self.states[job.run].epochs_done for job in self.jobs}
        for job in self.jobs:
            self.states[job.run] = read_state(job.run)
        if any(self.states[run].epochs_done > done for run, done in before.items()):
            print(self.progress_line(), flush=True)

    def progress_line(self) -> str:
        going = ", ".join(
            f"{job.run.name} epoch {self.states[job.run].epochs_done} of {job.run.epochs}" for job in self.jobs
        )
        remaining = [(run, self.states[run].epochs_done) for run in [job.run for job in self.jobs] + self.todo]
        return f"going {going}; grid: {time_left(remaining, seconds_per_epoch(self.states), self.parallel)}"


# A grid's results table of its runs as they are: (runs, their states) -> the table and its notes.
ResultsTable = Callable[[Sequence[Run], dict[Run, RunState]], str]


def run_grid(runs: Sequence[Run], slots: list[int | None], table: ResultsTable) -> int:
    """Run what is missing and resume what stopped, len(slots) at a time, then print the results table; returns the
    exit code: 0 when no run failed (a run going elsewhere is no failure), 1 when one did, 128 + the signal when
    interrupted."""
    todo, refused = sort_out(runs)
    if not todo:
        if not refused:
            print("nothing to do: every run of the grid is finished or running")
        grid = None
    else:
        grid = GridRun(runs, todo, slots)
        grid.go()
    print_results(runs, table)
    failed = [(run, reason, run.run_dir / "metrics.json") for run, reason in refused]
    failed += [(run, reason, run.job_log) for run, reason in (grid.failed if grid else [])]
    for run, reason, see in failed:
        print(f"failed: {run.name} ({reason}); see {see}", file=sys.stderr)
    if grid and grid.received:
        print(
            f"interrupted: every child stopped and keeps its last checkpoint; run the same command again to continue "
            f"({plural(len(grid.todo), 'run')} not started)",
            file=sys.stderr,
        )
        return 128 + grid.received[0]
    return 1 if failed else 0


def print_results(runs: Sequence[Run], table: ResultsTable) -> None:
    """The results table, as `report` prints it, once some run has an epoch."""
    states = {run: read_state(run) for run in runs}
    if any(state.epochs_done for state in states.values()):
        print(f"\n{table(runs, states)}", flush=True)


# ---------------------------------------------------------------------------------------------
# SLURM through submitit


class RunJob:
    """One run of the grid as a submitit job: the model script as a child process, resumed from its checkpoint
    when its folder holds one, its output appended to the run's job log.

    submitit calls `checkpoint` (its checkpointing protocol, which submitit.helpers.Checkpointable implements by
    requeuing `self`) when the job is preempted or nears its time limit: the child is stopped (it keeps its last
    checkpoint) and the same call is requeued, which resumes it. Not a Checkpointable subclass: figure3 imports
    submitit only in `submit`, and the live child must not be pickled with the requeued call."""

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
        started = start_logged(self.command(), job_log, child_environment(None), ignore_signal=preempt_signal)
        if started is None:
            return f"skip  {name}: running elsewhere (another process holds its job log {job_log})"
        self.child, output_from = started
        # poll, not wait(): submitit's signal handler runs `checkpoint` in this thread, and a blocking wait() would
        # hold the lock that checkpoint's own wait needs
        while self.child.poll() is None:
            time.sleep(1)
        code = self.child.returncode
        holder = lock_refusal(job_log, output_from) if code == 2 else None
        if holder is not None:
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


def submit_grid(runs: Sequence[Run], args: argparse.Namespace, folder_name: str = REPORT_FOLDER) -> int:
    """One array job of the runs still to do, one GPU each, named and logged (submitit's logs) as the grid's folder
    `folder_name`; with --cluster local, waits for them."""
    submitit = import_extra("submitit", "submit")
    timeout_min = parse_time(args.time)
    slurm_parameters = parse_slurm_parameters(args.slurm)
    if args.array_parallelism is not None and args.array_parallelism < 1:
        raise UsageError(f"--array-parallelism must be at least 1 (got {args.array_parallelism})")
    if args.cluster == "slurm" and shutil.which("sbatch") is None:
        raise UsageError("submit: SLURM's sbatch is not on this machine; run it on the cluster (or --cluster local)")
    todo, refused = sort_out(runs)
    for run, reason in refused:
        print(f"failed: {run.name} ({reason}); see {run.run_dir / 'metrics.json'}", file=sys.stderr)
    if not todo:
        if not refused:
            print("nothing to submit: every run of the grid is finished or running")
        return 1 if refused else 0
    folder = args.results_dir / folder_name / "submitit"
    executor = submitit.AutoExecutor(
        folder=folder,
        cluster=args.cluster,
        slurm_max_num_timeout=MAX_TIMEOUT_REQUEUES,
        local_max_num_timeout=MAX_TIMEOUT_REQUEUES,
    )
    executor.update_parameters(
        name=folder_name,
        timeout_min=timeout_min,
        gpus_per_node=1,
        tasks_per_node=1,
        slurm_partition=args.partition,
        slurm_array_parallelism=args.array_parallelism,
        slurm_additional_parameters=slurm_parameters,
    )
    cwd = os.getcwd()
    jobs_of_runs = [
        RunJob(sys.executable, str(run.script), run.args, str(run.run_dir), str(run.job_log), cwd) for run in todo
    ]
    with executor.batch():
        jobs = [executor.submit(job) for job in jobs_of_runs]
    for run, job in zip(todo, jobs):
        print(f"job {job.job_id}: {run.name} (log {run.job_log})")
    print(f"submitted {plural(len(jobs), 'run')}; submitit's logs are in {folder}")
    if args.cluster != "local":
        return 1 if refused else 0
    failed = []
    for run, job in zip(todo, jobs):
        try:
            print(job.result())
        except Exception as error:  # submitit re-raises the job's error here, with its traceback as text
            failed.append(run)
            print(
                f"failed: {run.name} ({str(error).strip().splitlines()[-1]}); see {run.job_log}",
                file=sys.stderr,
            )
    return 1 if failed or refused else 0


# ---------------------------------------------------------------------------------------------
# Runs found by their recorded settings (`report` without flags after --)


@dataclass(frozen=True)
class Recorded:
    """A run folder and the settings its metrics.json records (None: none readable)."""

    folder: Path
    config: dict | None


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def recorded(config: dict, name: str):
    """A recorded setting; one a run recorded before the setting existed ran as RECORDED_DEFAULTS says."""
    return config.get(name, RECORDED_DEFAULTS.get(name))


def recorded_slot(config: dict) -> tuple[str, str, str, int, int | None, int] | None:
    """The place in a grid of a run with these recorded settings (method, dataset, backbone, levels, seed), as
    Run.slot, or None. The auxiliary level of a method that takes one may be None: a dataset without a hierarchy."""
    method = config.get("method")
    if method not in METHODS:
        return None
    if config.get("task", "hierarchy") != "hierarchy":  # MAOAL's --task domains: tables.py maoal's runs, not these
        return None
    primary, aux, seed = config.get("primary_level"), config.get("aux_level"), config.get("seed")
    dataset, backbone = recorded(config, "dataset"), recorded(config, "backbone")
    if not (is_int(primary) and is_int(seed) and isinstance(dataset, str) and isinstance(backbone, str)):
        return None
    if METHODS[method].takes_aux and not (is_int(aux) or aux is None):
        return None
    return method, dataset, backbone, primary, aux if METHODS[method].takes_aux else None, seed


def recorded_folders(
    results_dir: Path, slot_of: Callable[[dict], tuple | None] = recorded_slot
) -> dict[tuple, list[Recorded]]:
    """Every run folder in results_dir whose metrics.json records its settings, by its place in the grid (`slot_of`
    its recorded settings, as the grid's Run.slot; None: no place of this grid)."""
    found: dict[tuple, list[Recorded]] = {}
    for path in sorted(results_dir.glob("*/metrics.json")):
        metrics = read_metrics(path)
        slot = slot_of(metrics.config) if metrics and metrics.config else None
        if slot is not None:
            found.setdefault(slot, []).append(Recorded(path.parent, metrics.config))
    return found


def holds_results(folder: Path) -> bool:
    return (folder / "metrics.json").exists() or (folder / "checkpoint.pt").exists()


def runs_as_recorded(
    runs: Sequence[Run], slot_of: Callable[[dict], tuple | None] = recorded_slot
) -> tuple[list[Run], list[str]]:
    """The grid's runs where the results folder holds them, found by the settings each metrics.json records: a run
    that other flags named (`run ... -- --batch-size 20`, then a plain `report`) is found too. Where several folders
    hold one place of the grid, a note names them and the settings they differ in, and the one the grid's own
    flags name is used if it is among them, else none: the table never mixes settings unasked."""
    found = recorded_folders(runs[0].run_dir.parent, slot_of) if runs else {}
    chosen, notes = [], []
    for run in runs:
        candidates = found.get(run.slot, [])
        named = next((c for c in candidates if c.folder.name == run.name), None)
        if named is None and holds_results(run.run_dir):  # its metrics unreadable: found by its name alone
            named = Recorded(run.run_dir, None)
            candidates = [named, *candidates]
        if len(candidates) > 1:
            notes.append(ambiguity_note(run, candidates, named))
        pick = candidates[0] if len(candidates) == 1 else named
        if pick is not None:
            chosen.append(as_recorded(run, pick))
        elif not candidates:
            chosen.append(run)  # not started
    return chosen, notes


def as_recorded(run: Run, recorded: Recorded) -> Run:
    """The grid's run in the folder found, asking for the epochs it was run with. Its args stay the grid's: report
    reads a run, it never starts one."""
    epochs = recorded.config.get("epochs") if recorded.config else None
    return dataclasses.replace(
        run, run_dir=recorded.folder, epochs=epochs if is_int(epochs) and epochs >= 1 else run.epochs
    )


def differing_settings(method: str, configs: Sequence[dict]) -> list[str]:
    """The script's settings (in its order) whose recorded values differ between these runs."""
    names = [f.name for f in dataclasses.fields(SCRIPTS[method].Config) if f.name not in BOOKKEEPING]
    return [name for name in names if len({json.dumps(recorded(c, name), sort_keys=True) for c in configs}) > 1]


def setting_flag(name: str, value) -> str:
    if isinstance(value, bool):
        return "--" + ("" if value else "no-") + name.replace("_", "-")
    return experiment.flag(name, "none" if value is None else value)


def ambiguity_note(run: Run, candidates: Sequence[Recorded], named: Recorded | None) -> str:
    where = run.place
    names = differing_settings(run.method, [c.config for c in candidates if c.config])

    def settings(config: dict | None) -> str:
        if config is None:
            return "settings unreadable"
        return " ".join(setting_flag(name, recorded(config, name)) for name in names) or "the same settings"

    folders = ", ".join(f"{c.folder.name} ({settings(c.config)})" for c in candidates)
    used = f"the report uses {named.folder.name}, the grid's own name for it" if named else "none of them is reported"
    return (
        f"{len(candidates)} folders hold {METHODS[run.method].label} {where}, seed {run.seed}, with different "
        f"settings: {folders}; {used}; to report another, repeat after -- the flags it was run with"
    )


# ---------------------------------------------------------------------------------------------
# The report: the table, report.md and the picture


@dataclass(frozen=True)
class Cell:
    """A method at a pair over seeds: the mean of the last 5 epochs' test accuracy (%) of each seed's run."""

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
        notes += [f"{n} {what}" for n, what in counts if n]
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
    return cell_of(runs_at(runs, method, pair), states)


def cell_of(runs: Sequence[Run], states: dict[Run, RunState]) -> Cell:
    """The cell of these runs (one place of a grid, one run per seed)."""
    done = [run for run in runs if states[run].epochs_done]  # a damaged run has no epochs to use
    return Cell(
        values=tuple(last_epochs_mean(states[run].accuracies) for run in done),
        epochs_done=tuple(states[run].epochs_done for run in done),
        running=sum(states[run].running_pid is not None for run in done),
        unfinished=sum(states[run].running_pid is None and not finished(run, states[run]) for run in done),
        damaged=sum(states[run].damaged is not None for run in runs),
    )


def paired_differences(
    runs: Sequence[Run], states: dict[Run, RunState], method: str, other: str, pair: tuple[int, int]
) -> list[float]:
    """Per seed where both have epochs: last-5 mean of `method` minus that of `other`."""
    return differences_by_seed(runs_at(runs, method, pair), runs_at(runs, other, pair), states)


def differences_by_seed(mine: Sequence[Run], theirs: Sequence[Run], states: dict[Run, RunState]) -> list[float]:
    """Per seed where both have epochs, in seed order: the last-5 mean of the run in `mine` minus that in `theirs`."""
    by_seed = [
        {run.seed: last_epochs_mean(states[run].accuracies) for run in group if states[run].epochs_done}
        for group in (mine, theirs)
    ]
    return [by_seed[0][seed] - by_seed[1][seed] for seed in sorted(by_seed[0]) if seed in by_seed[1]]


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


def not_comparable_reasons(runs: Sequence[Run], states: dict[Run, RunState]) -> list[str]:
    """The scripts' own reasons (their metrics.json summaries), over the runs with epochs."""
    return sorted(
        {reason for run in runs if states[run].epochs_done for reason in states[run].metrics.not_comparable_because}
    )


def report_table(
    selection: Selection, runs: Sequence[Run], states: dict[Run, RunState], notes: Sequence[str] = ()
) -> str:
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
    reasons = not_comparable_reasons(runs, states)
    if reasons:
        lines.append(f"Not comparable with the published figures: {', '.join(reasons)} (in some or all runs).")
    lines += [f"{run.name}: metrics damaged: {states[run].damaged}; left out." for run in runs if states[run].damaged]
    lines += notes
    return "\n".join(lines)


def curves_by_pair(selection: Selection, runs: Sequence[Run], states: dict[Run, RunState]) -> dict:
    """{pair: {method: [accuracy per epoch, one list per seed]}}: what the figure plots."""
    return {
        pair: {
            method: [list(states[run].accuracies) for run in runs_at(runs, method, pair) if states[run].epochs_done]
            for method in selection.methods
        }
        for pair in selection.pairs
    }


# ---------------------------------------------------------------------------------------------
# The picture


@dataclass(frozen=True)
class FigureData:
    """What figure3.png shows."""

    curves: dict  # {pair: {method: [accuracy (%) per epoch, one list per seed]}}, as curves_by_pair
    published: dict  # {pair: {method: ((source, %), ...)}}: the scripts' published figures
    note: str = ""  # why the numbers cannot be set beside the published ones ("": they can)


# Per method a colour, a marker and a line style, so that equal curves stay apart.
METHOD_STYLES = {
    "single": ("tab:blue", "o", "-"),
    "human": ("tab:orange", "s", "--"),
    "maxl": ("tab:green", "^", "-."),
    "wamal": ("tab:red", "D", ":"),
    "maoal": ("tab:purple", "v", (0, (5, 1, 1, 1))),
}
MARKED_POINTS = 12  # markers per curve at most: 200 epochs of markers would be a smear


def figure_data(selection: Selection, runs: Sequence[Run], states: dict[Run, RunState]) -> FigureData:
    published = {
        pair: {method: at_pair[0].published for method in selection.methods if (at_pair := runs_at(runs, method, pair))}
        for pair in selection.pairs
    }
    return FigureData(curves_by_pair(selection, runs, states), published, figure_note(runs, states))


def figure_note(runs: Sequence[Run], states: dict[Run, RunState]) -> str:
    notes = []
    reasons = not_comparable_reasons(runs, states)
    if reasons:
        notes.append(f"Not comparable with the published figures: {', '.join(reasons)} (in some or all runs)")
    damaged = [run.name for run in runs if states[run].damaged]
    if damaged:
        notes.append(f"Left out, metrics damaged: {', '.join(damaged)}")
    return ". ".join(notes)


def nested(index: int) -> dict:
    """Hollow markers and lines that shrink from method to method, each drawn over the last: where curves
    coincide, each still shows, as a rim around the next."""
    sizes, widths = (12, 8.5, 5.5, 4, 3), (3.2, 2, 1.3, 0.9, 0.6)  # one per method, METHODS' five at most
    return dict(markersize=sizes[index], linewidth=widths[index], markerfacecolor="none")


def make_figure(data: FigureData) -> Figure:
    """Left, the final accuracy of each method at each pair (the paper's number: the mean of the last 5 epochs;
    ± one std over seeds as error bars; the published figures as stars). Right, one panel per pair of the curves
    (test accuracy against epoch, the mean over seeds, ± one std as a band). One legend below all panels; the
    note on comparability in the title, in red."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    pairs = list(data.curves)
    methods = [m for m in METHODS if any(data.curves[pair].get(m) for pair in pairs)]
    columns = min(3, len(pairs))
    rows = math.ceil(len(pairs) / columns)
    figure = Figure(figsize=(3.9 * columns + 4.6, 3.1 * rows + 1.7), layout="constrained")
    grid = figure.add_gridspec(rows, columns + 1, width_ratios=[1.4] + [1] * columns)
    draw_finals(figure.add_subplot(grid[:, 0]), data, methods)
    for i, pair in enumerate(pairs):
        draw_curves(figure.add_subplot(grid[i // columns, 1 + i % columns]), pair, data.curves[pair], methods)
    handles = [
        Line2D([], [], color=color, marker=marker, linestyle=linestyle, label=METHODS[method].label, **nested(i))
        for i, (method, (color, marker, linestyle)) in enumerate((m, METHOD_STYLES[m]) for m in methods)
    ]
    if any(data.published[pair].get(m) for pair in pairs for m in methods):
        handles.append(Line2D([], [], color="black", marker="*", markersize=11, linestyle="none",
                              markerfacecolor="none", label="published figure"))  # fmt: skip
    figure.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
    title = "MAXL, Figure 3: test accuracy of the primary task, CIFAR-100 hierarchy"
    if data.note:
        characters = int(9 * figure.get_figwidth())  # what a line of the title's font holds
        figure.suptitle(f"{title}\n{textwrap.fill(data.note, width=characters)}", color="firebrick")
    else:
        figure.suptitle(title)
    return figure


def draw_finals(ax: Axes, data: FigureData, methods: Sequence[str]) -> None:
    """Per pair a point per method, its published figures beside it as stars."""
    pairs = list(data.curves)
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        color, marker, _ = METHOD_STYLES[method]
        x_of = {pair: j + (i - (len(methods) - 1) / 2) * width for j, pair in enumerate(pairs)}
        finals = {pair: [last_epochs_mean(c) for c in data.curves[pair].get(method) or []] for pair in pairs}
        shown_pairs = [pair for pair in pairs if finals[pair]]
        ax.errorbar(
            [x_of[pair] for pair in shown_pairs],
            [statistics.fmean(finals[pair]) for pair in shown_pairs],
            # one seed has no spread: NaN draws no bar (0 would draw its caps across the point)
            yerr=[statistics.stdev(finals[pair]) if len(finals[pair]) > 1 else math.nan for pair in shown_pairs],
            color=color,
            marker=marker,
            linestyle="none",
            capsize=3,
            markersize=7,
            markerfacecolor="none",
            label=METHODS[method].label,
        )
        for pair in pairs:
            for _, value in data.published[pair].get(method, ()):
                ax.plot(x_of[pair], value, marker="*", markersize=11, color=color, markerfacecolor="none",
                        linestyle="none", gid="published")  # fmt: skip
    ax.set_xticks(range(len(pairs)), [f"{p} → {a}" for p, a in pairs])
    ax.set_xlim(-0.5, len(pairs) - 0.5)
    ax.set_title(f"final: mean of the last {LAST_EPOCHS} epochs, ± std over seeds", fontsize="medium")
    ax.set_xlabel("primary → auxiliary level")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(axis="y", alpha=0.3)


def draw_curves(ax: Axes, pair: tuple[int, int], by_method: dict, methods: Sequence[str]) -> None:
    """The mean curve of each method over seeds, the spread over seeds (± one std) as a band; integer epochs."""
    from matplotlib.ticker import MaxNLocator

    longest = 1
    for i, method in enumerate(methods):
        seed_curves = by_method.get(method) or []
        if not seed_curves:
            continue
        color, marker, linestyle = METHOD_STYLES[method]
        epochs, means, stds = mean_curve(seed_curves)
        longest = max(longest, len(epochs))
        every = math.ceil(len(epochs) / MARKED_POINTS)  # staggered from method to method, when not every epoch
        ax.plot(epochs, means, color=color, marker=marker, linestyle=linestyle, label=METHODS[method].label,
                markevery=((i * every) // len(methods), every), **nested(i))  # fmt: skip
        if len(seed_curves) > 1:
            ax.fill_between(
                epochs,
                [m - s for m, s in zip(means, stds)],
                [m + s for m, s in zip(means, stds)],
                color=color,
                alpha=0.15,
                linewidth=0,
            )
    margin = max(0.5, 0.03 * longest)  # a single epoch is a marker in the middle of its panel
    ax.set_xlim(1 - margin, longest + margin)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # 1 or 2 epochs: no epoch 1.5
    ax.set_title(f"primary {pair[0]}, auxiliary {pair[1]}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)


def mean_curve(seed_curves: Sequence[Sequence[float]]) -> tuple[list[int], list[float], list[float]]:
    """Per epoch, the mean and standard deviation over the seeds that reached it (0 where only one did)."""
    epochs, means, stds = [], [], []
    for e in range(max(len(c) for c in seed_curves)):
        values = [c[e] for c in seed_curves if len(c) > e]
        epochs.append(e + 1)
        means.append(statistics.fmean(values))
        stds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
    return epochs, means, stds


# ---------------------------------------------------------------------------------------------
# `report`


def report(selection: Selection, runs: Sequence[Run], draw: bool, out: Path | None = None) -> int:
    """Print the table; write report.md and (draw) figure3.png into `out`, by default <results-dir>/figure3/.
    Without flags after --, each run is found by the settings its metrics.json records."""
    grid_size = len(runs)
    runs, states, notes = runs_and_states(runs, selection.script_flags)
    if not any(state.epochs_done for state in states.values()):
        for note in notes:
            show(note)
        raise UsageError(nothing_to_report(selection.results_dir, runs, states, grid_size))
    table = report_table(selection, runs, states, notes)
    show(table)
    if draw:
        import_extra("matplotlib.figure", "the picture figure3.png", " (or --no-figure: the table and report.md only)")
    folder = report_folder(out, selection.results_dir / REPORT_FOLDER, "report.md and figure3.png")
    markdown = report_markdown(selection, runs, states, table, draw)
    experiment.write_atomic(folder / "report.md", lambda tmp: Path(tmp).write_text(markdown))
    written = [folder / "report.md"]
    if draw:
        figure = make_figure(figure_data(selection, runs, states))
        experiment.write_atomic(folder / "figure3.png", lambda tmp: figure.savefig(tmp, dpi=150, format="png"))
        written.append(folder / "figure3.png")
    show(f"\nwrote {' and '.join(map(str, written))}")
    return 0


def report_folder(out: Path | None, default: Path, files: str) -> Path:
    """The folder `report` writes `files` into (--out, else `default`), created; refused in one line when this
    process cannot write there."""
    folder = out if out is not None else default
    reason = unwritable_because(folder)
    if reason and out is None:
        raise UsageError(
            f"report: cannot write {files} into '{folder}' ({reason}); give --out DIR to write them elsewhere"
        )
    if reason:
        raise UsageError(f"report --out: cannot write into '{folder}' ({reason}); choose another --out")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def runs_and_states(
    runs: Sequence[Run], script_flags: Sequence[str], slot_of: Callable[[dict], tuple | None] = recorded_slot
) -> tuple[list[Run], dict[Run, RunState], list[str]]:
    """What `report` reports: without flags after --, the runs found by their recorded settings (`slot_of`: their
    place in the grid) and the notes on places several folders hold; with them, the runs they name."""
    notes: list[str] = []
    if not script_flags:
        runs, notes = runs_as_recorded(runs, slot_of)
    return list(runs), {run: read_state(run) for run in runs}, notes


def show(text: str) -> None:
    """Print for `report`, whose work is its files: a reader that has gone (`report | head -1`) stops none of it."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        silence_stdout()


def silence_stdout() -> None:
    """Point stdout at /dev/null: what is still to be printed, and the interpreter's last flush, go nowhere."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def nothing_to_report(
    results_dir: Path, runs: Sequence[Run], states: dict[Run, RunState], grid_size: int, program: str = "figure3.py"
) -> str:
    example = f" (e.g. '{runs[0].run_dir}')" if runs else ""
    damaged = [run for run in runs if states[run].damaged]
    if damaged:
        first = damaged[0]
        example += f"; {plural(len(damaged), 'run')} with damaged metrics ({first.name}: {states[first].damaged})"
    none = f"none of the grid's {grid_size} runs has a" if grid_size > 1 else "the grid's one run has no"
    return (
        f"report: {none} finished epoch in '{results_dir}'{example}; "
        f"run `python {program} run` first, with the same selection and flags after --"
    )


def run_list(runs: Sequence[Run], states: dict[Run, RunState], best: bool = False) -> list[str]:
    """A report's list of runs, one markdown line each: its state, and where it has epochs the mean of its last
    LAST_EPOCHS (and, with `best`, its best epoch's accuracy)."""
    lines = []
    for run in runs:
        line = f"- `{run.name}`: {describe(run, states[run])}"
        if states[run].epochs_done:
            accuracies = states[run].accuracies
            line += f", last-{LAST_EPOCHS} mean {last_epochs_mean(accuracies):.2f}%"
            line += f", best {max(accuracies):.2f}%" if best else ""
        lines.append(line)
    return lines


def flags_text(script_flags: Sequence[str]) -> str:
    """The flags after `--` as a report states them."""
    return shlex.join(script_flags) or "none (each run found by the settings its metrics.json records)"


def report_markdown(
    selection: Selection, runs: Sequence[Run], states: dict[Run, RunState], table: str, draw: bool
) -> str:
    run_lines = run_list(runs, states)
    flags = flags_text(selection.script_flags)
    return "\n".join(
        [
            "# MAXL, Figure 3: CIFAR-100 hierarchy, primary and auxiliary levels",
            "",
            f"Methods {', '.join(selection.methods)}; seeds {', '.join(map(str, selection.seeds))}; "
            f"flags after --: {flags}.",
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
    subcommand = runner_subcommands(parser, grid, SCRIPT_FLAGS_HELP, "report.md and figure3.png", REPORT_FOLDER)
    subcommand["report"].add_argument(
        "--no-figure", dest="figure", action="store_false", help="only the table and report.md (no matplotlib needed)"
    )
    return parser


def runner_subcommands(
    parser: argparse.ArgumentParser,
    grid: argparse.ArgumentParser,
    epilog: str,
    report_files: str,
    folder: str,
    table: str = "the table",
) -> dict[str, argparse.ArgumentParser]:
    """The runner's subcommands plan, run, submit and report, each with the grid's selection flags (`grid`) and its
    own: run's GPUs, submit's SLURM settings, report's --out (where `report_files` go instead of
    <results-dir>/`folder`)."""
    commands = parser.add_subparsers(dest="command", required=True, metavar="{plan,run,submit,report}")
    subcommand = {
        name: commands.add_parser(name, parents=[grid], allow_abbrev=False, epilog=epilog, help=text)
        for name, text in (
            ("plan", "every run: its state and exact command"),
            ("run", "run what is missing, resume what stopped"),
            ("submit", "the same grid as a SLURM job array (submitit)"),
            ("report", f"{table}, {report_files}"),
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
        "--out", type=Path, metavar="DIR", help=f"write {report_files} here (default: <results-dir>/{folder})"
    )
    return subcommand


def main(argv: list[str] | None = None) -> None:
    runner_main(argv, command_line, selection_of, dispatch)


def selection_of(args: argparse.Namespace, script_flags: tuple[str, ...]) -> Selection:
    return Selection(
        methods=parse_methods(args.methods),
        pairs=parse_pairs(args.pairs),
        seeds=parse_seeds(args.seeds),
        results_dir=args.results_dir,
        script_flags=script_flags,
    )


def runner_main(argv: list[str] | None, command_line: Callable, selection_of: Callable, dispatch: Callable) -> None:
    """A runner's command line: its flags, then after `--` the scripts'; `selection_of(args, script_flags)` makes the
    grid's selection and `dispatch(args, selection)` does the subcommand's work and returns its exit code. A refusal
    is one line on stderr, exit code 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = None
    try:
        args = command_line().parse_args(argv[:split])
        selection = selection_of(args, tuple(argv[split + 1 :]))
        code = dispatch(args, selection)
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


def dispatch(args: argparse.Namespace, selection: Selection) -> int:
    """The subcommand's work; returns its exit code."""
    runs = build_grid(selection)
    if args.command == "plan":
        print("\n".join(plan_lines(runs, [read_state(run) for run in runs])))
        return 0
    if args.command in ("run", "submit"):
        table = lambda runs, states: report_table(selection, runs, states)
        return run_or_submit(args, runs, selection.script_flags, table)
    return report(selection, runs, draw=args.figure, out=args.out)


def run_or_submit(
    args: argparse.Namespace, runs: Sequence[Run], script_flags: Sequence[str], table: ResultsTable, who="figure3"
) -> int:
    """`run` (the runs on this machine, then the results `table`) or `submit` (SLURM), into args.results_dir; the
    grid's own folder there is the runs' Run.folder."""
    folder = runs[0].folder if runs else REPORT_FOLDER
    if args.command == "run":
        if args.gpus is not None and any(token.split("=")[0] == "--device" for token in script_flags):
            raise UsageError(f"after --: {who} run --gpus sets each run's --device itself")
        slots = check_gpus(args.gpus, args.runs_per_gpu)
        check_writable(args.results_dir)
        return run_grid(runs, slots, table)
    check_writable(args.results_dir)
    return submit_grid(runs, args, folder)


if __name__ == "__main__":
    main()
