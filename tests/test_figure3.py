"""figure3.py: the grid and its run folders, plan / run / report end to end on synthetic data (real model-script
children), Ctrl-C and a failing run, the report's numbers and picture, submit through submitit's local executor
with a preemption, and every refused input."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, run_main

import experiment
import figure3
import model_vgg_human as human
import model_vgg_maxl as maxl
import model_vgg_single as single

# The optional extras (requirements-extras.txt; CI installs them): without them these tests are skipped.
needs_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="the picture needs matplotlib, an optional extra"
)
needs_submitit = pytest.mark.skipif(
    importlib.util.find_spec("submitit") is None, reason="submitit is an optional extra"
)

# Tiny real runs: one batch of 4 images per pass, on the CPU.
TINY = ["--limit-batches", "1", "--batch-size", "4", "--device", "cpu", "--workers", "0", "--no-download"]


def tiny(data_root: Path, epochs: int) -> list[str]:
    return [*TINY, "--epochs", str(epochs), "--data-root", str(data_root)]


def assert_refused(result, *phrases: str) -> None:
    """Exit code 2, one line on stderr starting with 'error:', containing each phrase, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])


def grid(results: Path, methods="single,human,maxl", pairs="3-10,3-20,3-100,10-20,10-100,20-100", seeds="0", flags=()):
    selection = figure3.Selection(
        methods=figure3.parse_methods(methods),
        pairs=figure3.parse_pairs(pairs),
        seeds=figure3.parse_seeds(seeds),
        results_dir=results,
        script_flags=tuple(flags),
    )
    return selection, figure3.build_grid(selection)


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def write_metrics(run: figure3.Run, accuracies: list[float], reasons=("synthetic data",)) -> None:
    """A metrics.json as the scripts write it (accuracies in %, stored as fractions)."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "config": {"method": run.method, "seed": run.seed},
        "epochs": [{"epoch": i + 1, "test_primary_acc": a / 100} for i, a in enumerate(accuracies)],
        "summary": {"not_comparable_because": list(reasons)},
    }
    (run.run_dir / "metrics.json").write_text(json.dumps(record))


def table_rows(text: str) -> dict[str, dict[str, str]]:
    """The printed markdown table as {pair: {column: cell}}."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def last5(accuracies: list[float]) -> float:
    return statistics.fmean(accuracies[-5:])


def wait_for(condition, seconds: float = 240):
    """condition()'s first truthy value, polled."""
    deadline = time.monotonic() + seconds
    while not (value := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
    return value


def pids_running(cmd: list[str]) -> list[int]:
    """The processes whose command line, after the interpreter, starts with `cmd` (read from /proc)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode().split("\0")
        except OSError:  # ended meanwhile
            continue
        if args[1 : 1 + len(cmd)] == cmd:
            pids.append(int(cmdline.parent.name))
    return pids


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def in_background(action) -> threading.Thread:
    thread = threading.Thread(target=action, daemon=True)
    thread.start()
    return thread


# --- the grid --------------------------------------------------------------------------------------


def test_the_grid_shares_single_per_primary_level_and_names_folders_as_the_scripts_do(tmp_path):
    _, runs = grid(tmp_path, flags=["--epochs", "7", "--meta-grad", "finite-difference"])
    assert len(runs) == 3 + 6 + 6
    singles = [run for run in runs if run.method == "single"]
    assert [run.primary for run in singles] == [3, 10, 20]
    for run in runs:
        module = {"single": single, "human": human, "maxl": maxl}[run.method]
        cfg = experiment.check_settings(module.METHOD, experiment.parse_config(module.METHOD, list(run.args)))
        assert run.run_dir == tmp_path / experiment.default_run_name(module.METHOD, cfg)
        assert run.epochs == cfg.epochs == 7
    maxl_run = next(run for run in runs if run.method == "maxl" and (run.primary, run.aux) == (10, 100))
    assert maxl_run.name == "maxl-finite-difference-pri10-aux100-seed0"
    assert "--meta-grad" not in singles[0].args  # only the scripts that have a flag get it
    assert [run.name for run in runs if run.serves((3, 100))] == [
        "single-pri3-seed0",
        "human-pri3-aux100-seed0",
        "maxl-finite-difference-pri3-aux100-seed0",
    ]


def test_plan_shows_each_runs_state_and_exact_command(tmp_path):
    selection, runs = grid(tmp_path, methods="single,human", pairs="3-10", flags=["--epochs", "3"])
    stopped, running = runs
    write_metrics(stopped, [40.0])
    (stopped.run_dir / "checkpoint.pt").write_bytes(b"")
    write_metrics(running, [40.0, 41.0])
    (running.run_dir / ".lock").write_text(f"{os.getpid()}\n")  # held by a live process: this one
    select = ["--methods", "single,human", "--pairs", "3-10", "--results-dir", tmp_path]
    result = run_main(figure3, "plan", *select, "--", "--epochs", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "single-pri3-seed0: stopped after epoch 1 of 3"
    assert lines[1] == (
        f"    python {os.path.relpath(REPO / 'model_vgg_single.py')} --primary-level 3 --seed 0 "
        f"--results-dir {tmp_path} --epochs 3 --resume"
    )
    assert lines[2] == f"human-pri3-aux10-seed0: running (pid {os.getpid()}), 2 of 3 epochs done"
    assert lines[-1] == "2 runs: 1 stopped, 1 running"
    write_metrics(stopped, [40.0, 41.0, 42.0])
    (running.run_dir / ".lock").unlink()
    assert [figure3.describe(run, figure3.read_state(run)) for run in runs] == [
        "finished (3 epochs)",
        "stopped after epoch 2 of 3",
    ]


def test_children_on_gpus_get_their_gpu_and_cuda(tmp_path, monkeypatch):
    _, (run,) = grid(tmp_path, methods="single", pairs="3-10")
    state = figure3.read_state(run)
    assert figure3.command(run, state, gpu=1)[-2:] == ["--device", "cuda"]
    assert "--device" not in figure3.command(run, state)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert figure3.child_environment(1)["CUDA_VISIBLE_DEVICES"] == "1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")  # numbered as this process sees them
    assert figure3.child_environment(1)["CUDA_VISIBLE_DEVICES"] == "5"
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    assert figure3.check_gpus("0,1", runs_per_gpu=2) == [0, 0, 1, 1]
    assert figure3.check_gpus(None, runs_per_gpu=1) == [None]


# --- the report, on metrics files written here -------------------------------------------------------


@needs_matplotlib
def test_report_numbers_differences_published_figures_and_picture(tmp_path):
    selection, runs = grid(tmp_path, pairs="3-10,20-100", seeds="0,1,2", flags=["--epochs", "8"])
    curves = {}
    for run in runs:
        if run.method == "human" and run.seed == 2 and run.primary == 3:
            continue  # never started: at 3 -> 10, MAXL − Human pairs seeds 0 and 1 only
        epochs = 6 if (run.method, run.seed) == ("maxl", 2) else 8  # one run still going
        offset = {"single": 0.0, "human": 2.0, "maxl": 3.5}[run.method] + 1.3 * run.seed + run.primary
        curves[run] = [offset + 0.7 * e + (e % 3) * 0.25 for e in range(epochs)]
        write_metrics(run, curves[run])
    going = next(run for run in runs if (run.method, run.seed, run.primary) == ("maxl", 2, 20))
    (going.run_dir / ".lock").write_text(f"{os.getpid()}\n")

    select = ["--pairs", "3-10,20-100", "--seeds", "0,1,2", "--results-dir", tmp_path]
    result = run_main(figure3, "report", *select, "--", "--epochs", "8")
    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout)
    assert list(rows) == ["3 → 10", "20 → 100"]

    def seeds_of(method, pair):
        """The runs' own numbers, read back from their metrics files."""
        return {
            run.seed: last5([100 * r["test_primary_acc"] for r in metrics(run.run_dir)["epochs"]])
            for run in runs
            if run.method == method and run.serves(pair) and run in curves
        }

    for pair, label in (((3, 10), "3 → 10"), ((20, 100), "20 → 100")):
        for method, column in (("single", "Single"), ("human", "Human"), ("maxl", "MAXL")):
            values = list(seeds_of(method, pair).values())
            mean_std = f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"
            assert rows[label][column].startswith(f"{mean_std} (n={len(values)}, ")
    assert rows["3 → 10"]["Human"].endswith("(n=2, 8 ep)")
    assert rows["20 → 100"]["MAXL"].endswith("(n=3, 6–8 ep, 1 running)")
    assert rows["3 → 10"]["MAXL"].endswith("(n=3, 6–8 ep, 1 stopped)")

    for pair, label in (((3, 10), "3 → 10"), ((20, 100), "20 → 100")):
        for other, column in (("human", "MAXL − Human"), ("single", "MAXL − Single")):
            mine, theirs = seeds_of("maxl", pair), seeds_of(other, pair)
            diffs = [mine[seed] - theirs[seed] for seed in sorted(mine) if seed in theirs]
            mean_std = f"{statistics.fmean(diffs):+.2f} ± {statistics.stdev(diffs):.2f}"
            assert rows[label][column] == f"{mean_std} (n={len(diffs)})"
    assert rows["3 → 10"]["MAXL − Human"].endswith("(n=2)")
    assert rows["20 → 100"]["published"] == "Human 75.7 [1], 74.6 [2]; MAXL 76.6 [1], 77.4 [2]; MAXL's best pair [*]"
    assert rows["3 → 10"]["published"] == "plot only [*]"
    assert "[1] WAMAL authors' README" in result.stdout
    assert "4 of the 6 pairs and worse on 2" in result.stdout
    assert "Not comparable with the published figures: synthetic data" in result.stdout

    report_md = (tmp_path / "figure3" / "report.md").read_text()
    assert table_rows(report_md) == rows
    assert "![Figure 3](figure3.png)" in report_md
    assert (tmp_path / "figure3" / "figure3.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    states = {run: figure3.read_state(run) for run in runs}
    figure = figure3.make_figure(figure3.curves_by_pair(selection, runs, states))
    assert [ax.get_title() for ax in figure.axes] == ["primary 3, auxiliary 10", "primary 20, auxiliary 100"]
    for ax, pair in zip(figure.axes, [(3, 10), (20, 100)]):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert list(lines) == ["Single", "Human", "MAXL"]
        for method, label in (("single", "Single"), ("human", "Human"), ("maxl", "MAXL")):
            seed_curves = [curves[run] for run in runs if run.method == method and run.serves(pair) and run in curves]
            mean_per_epoch = [statistics.fmean(c[e] for c in seed_curves if len(c) > e) for e in range(8)]
            assert list(lines[label].get_xdata()) == list(range(1, 9))
            assert lines[label].get_ydata() == pytest.approx(mean_per_epoch)
        assert len(ax.collections) == 3  # a band per method: every one has several seeds


def test_report_without_matplotlib_prints_the_table_and_refuses_the_picture(tmp_path, monkeypatch):
    _, (run,) = grid(tmp_path, methods="single", pairs="3-10")
    write_metrics(run, [50.0, 52.0])
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    args = ["report", "--methods", "single", "--pairs", "3-10", "--results-dir", tmp_path]
    result = run_main(figure3, *args)
    assert_refused(result, "the picture figure3.png needs matplotlib", "pip install -r requirements-extras.txt")
    assert table_rows(result.stdout)["3 → 10"]["Single"] == "51.00 (n=1, 2 ep, 1 stopped)"  # 2 of 200 epochs
    assert not (tmp_path / "figure3").exists()
    result = run_main(figure3, *args, "--no-figure")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "figure3").iterdir()) == ["report.md"]


def test_wamal_and_maoal_are_opt_in_columns_compared_with_human(tmp_path):
    selection, runs = grid(tmp_path, methods="human,wamal,maoal", pairs="20-100", seeds="0,1", flags=["--epochs", "5"])
    assert [run.name for run in runs if run.seed == 0] == [
        "human-pri20-aux100-seed0",
        "wamal-second-order-pri20-aux100-seed0",
        "maoal-maoal-pri20-aux100-seed0",
    ]
    level = {("human", 0): 60.0, ("human", 1): 61.0, ("wamal", 0): 63.0, ("wamal", 1): 65.0, ("maoal", 0): 61.0}
    for run in runs:
        write_metrics(run, [level.get((run.method, run.seed), 61.0)] * 5)
    result = run_main(
        figure3, "report", "--methods", "maoal,human,wamal", "--pairs", "20-100", "--seeds", "0,1",
        "--results-dir", tmp_path, "--no-figure", "--", "--epochs", "5",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    row = table_rows(result.stdout)["20 → 100"]
    assert list(row) == ["pair", "Human", "WAMAL", "MAOAL", "WAMAL − Human", "MAOAL − Human", "published"]
    assert row["WAMAL − Human"] == "+3.50 ± 0.71 (n=2)"  # differences 3 and 4
    assert row["MAOAL − Human"] == "+0.50 ± 0.71 (n=2)"  # differences 1 and 0
    assert row["published"].startswith("Human 75.7 [1], 74.6 [2]; WAMAL ")


# --- real runs ----------------------------------------------------------------------------------------


@needs_matplotlib
def test_run_plan_report_end_to_end(data_root, tmp_path):
    """Two pairs that share Single, all three methods, two epochs: five real runs. Human 3 -> 10's child is killed
    as it starts (as by the OOM killer): it fails, the others go on. Ctrl-C in MAXL 3 -> 10's second epoch stops it
    with its checkpoint and starts nothing more. The same command then runs what is missing and resumes what
    stopped, and a third time does nothing; the report's numbers are the metrics files'."""
    select = ["--pairs", "3-10,3-20", "--results-dir", tmp_path]
    flags = ["--", *tiny(data_root, epochs=2)]
    selection, runs = grid(tmp_path, pairs="3-10,3-20", flags=flags[1:])
    single3, human10, maxl10, human20, maxl20 = runs
    assert [run.name.split("-seed0")[0] for run in runs] == [
        "single-pri3",
        "human-pri3-aux10",
        "maxl-second-order-pri3-aux10",
        "human-pri3-aux20",
        "maxl-second-order-pri3-aux20",
    ]

    def interfere():
        os.kill(wait_for(lambda: pids_running([str(human10.script), *human10.args]))[0], signal.SIGKILL)
        wait_for(lambda: (maxl10.run_dir / "checkpoint.pt").exists())
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: figure3's handler runs in this process's main thread

    own_handler = signal.signal(signal.SIGINT, lambda *_: None)  # a late signal must not reach pytest
    try:
        interferer = in_background(interfere)
        result = run_main(figure3, "run", *select, *flags)
        interferer.join()
    finally:
        signal.signal(signal.SIGINT, own_handler)
    assert result.returncode == 130, result.stdout + result.stderr
    assert f"done  {single3.name}" in result.stdout
    assert f"FAIL  {human10.name} (killed by SIGKILL)" in result.stdout
    assert f"stopped {maxl10.name}" in result.stdout
    assert f"failed: {human10.name} (killed by SIGKILL); see {human10.run_dir / 'log.txt'}" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("interrupted: every child stopped and keeps its last checkpoint")
    assert "interrupted in epoch 2" in (maxl10.run_dir / "log.txt").read_text()
    assert [r["epoch"] for r in metrics(maxl10.run_dir)["epochs"]] == [1]
    assert experiment.lock_holder(maxl10.run_dir) is None
    assert not human20.run_dir.exists() and not maxl20.run_dir.exists()  # nothing started after Ctrl-C

    plan = run_main(figure3, "plan", *select, *flags).stdout.splitlines()
    assert plan[plan.index(f"{maxl10.name}: stopped after epoch 1 of 2") + 1].endswith(" --resume")
    assert plan[-1] == "5 runs: 1 finished, 3 not started, 1 stopped"
    finished_before = (single3.run_dir / "metrics.json").stat().st_mtime_ns
    again = run_main(figure3, "run", *select, *flags)  # the same command
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"skip  {single3.name}: finished (2 epochs)" in again.stdout
    assert (single3.run_dir / "metrics.json").stat().st_mtime_ns == finished_before
    assert f"resuming {maxl10.run_dir} at epoch 2" in (maxl10.run_dir / "log.txt").read_text()
    for run in runs:
        assert [r["epoch"] for r in metrics(run.run_dir)["epochs"]] == [1, 2], run.name
        assert not (run.run_dir / ".lock").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(run.name for run in runs)

    before = {run: (run.run_dir / "metrics.json").stat().st_mtime_ns for run in runs}
    logs = {run: (run.run_dir / "log.txt").read_text() for run in runs}
    third = run_main(figure3, "run", *select, *flags)
    assert third.returncode == 0 and "nothing to do" in third.stdout, third.stdout
    assert before == {run: (run.run_dir / "metrics.json").stat().st_mtime_ns for run in runs}
    assert logs == {run: (run.run_dir / "log.txt").read_text() for run in runs}

    report = run_main(figure3, "report", *select, *flags)
    assert report.returncode == 0, report.stderr
    rows = table_rows(report.stdout)
    mean = {run: statistics.fmean(100 * r["test_primary_acc"] for r in metrics(run.run_dir)["epochs"]) for run in runs}
    assert rows["3 → 10"]["Single"] == rows["3 → 20"]["Single"] == f"{mean[single3]:.2f} (n=1, 2 ep)"
    assert rows["3 → 20"]["Human"] == f"{mean[human20]:.2f} (n=1, 2 ep)"
    assert rows["3 → 10"]["MAXL − Human"] == f"{mean[maxl10] - mean[human10]:+.2f} (n=1)"
    assert rows["3 → 20"]["MAXL − Single"] == f"{mean[maxl20] - mean[single3]:+.2f} (n=1)"
    states = {run: figure3.read_state(run) for run in runs}
    figure = figure3.make_figure(figure3.curves_by_pair(selection, runs, states))
    assert [[line.get_label() for line in ax.get_lines()] for ax in figure.axes] == [["Single", "Human", "MAXL"]] * 2
    assert (tmp_path / "figure3" / "figure3.png").is_file()


def test_a_run_held_by_a_live_process_is_not_started_again_and_plan_and_run_need_no_extras(tmp_path, monkeypatch):
    for extra in ("submitit", "matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, extra, None)  # as if not installed: importing them fails
    _, (done, held) = grid(tmp_path, methods="single", pairs="3-10,10-20", flags=["--epochs", "2"])
    write_metrics(done, [30.0, 31.0])
    write_metrics(held, [30.0])
    (held.run_dir / ".lock").write_text(f"{os.getpid()}\n")
    result = run_main(
        figure3, "run", "--methods", "single", "--pairs", "3-10,10-20", "--results-dir", tmp_path, "--", "--epochs", "2"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"skip  {done.name}: finished (2 epochs)",
        f"skip  {held.name}: running (pid {os.getpid()}), 1 of 2 epochs done",
        "nothing to do: every run of the grid is finished or running",
    ]
    assert not (held.run_dir / "log.txt").exists()
    plan = run_main(figure3, "plan", "--methods", "single", "--pairs", "3-10,10-20", "--results-dir", tmp_path)
    assert plan.returncode == 0 and plan.stdout.splitlines()[-1] == "2 runs: 1 stopped, 1 running", plan.stdout


@needs_submitit
def test_submit_through_submitits_local_executor_requeues_a_preempted_job_which_resumes(
    data_root, tmp_path, monkeypatch
):
    """A run stopped after epoch 1 is submitted through submitit's local executor; the job gets submitit's
    preemption signal as soon as its child starts: figure3 stops the child, submitit requeues the same call, and
    the requeued call resumes the run from its checkpoint and finishes it."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the job process unpickles figure3.RunJob by reference
    flags = ["--", *tiny(data_root, epochs=3)]
    _, (run,) = grid(tmp_path, methods="single", pairs="3-10", flags=flags[1:])
    assert run_main(single, *run.args, "--epochs", "1").returncode == 0  # in this process: no interpreter start

    def preempt():
        child = wait_for(lambda: pids_running([str(run.script), *run.args, "--resume"]))[0]
        os.kill(parent_of(child), signal.SIGUSR2)  # to the submitit task running the job, as SLURM would

    preempter = in_background(preempt)
    args = ["submit", "--cluster", "local", "--time", "10", "--methods", "single", "--pairs", "3-10"]
    result = run_main(figure3, *args, "--results-dir", tmp_path, *flags)
    preempter.join()
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"done  {run.name}" in result.stdout
    assert [r["epoch"] for r in metrics(run.run_dir)["epochs"]] == [1, 2, 3]
    log = (run.run_dir / "log.txt").read_text()
    commands = [line for line in log.splitlines() if line.startswith("=== ")]
    assert len(commands) == 2 and all(line.endswith(" --resume") for line in commands)
    assert f"resuming {run.run_dir} at epoch 2" in log
    submitit_logs = "".join(p.read_text() for p in (tmp_path / "figure3" / "submitit").glob("*_log.*"))
    assert "Requeued job" in submitit_logs
    again = run_main(figure3, *args, "--results-dir", tmp_path, *flags)
    assert again.returncode == 0 and "nothing to submit" in again.stdout


@needs_submitit
def test_the_requeued_call_is_the_same_run_without_the_live_child(tmp_path):
    job = figure3.RunJob("python", "model_vgg_single.py", ["--seed", "0"], str(tmp_path / "run"), str(tmp_path))
    assert job.command() == ["python", "model_vgg_single.py", "--seed", "0"]
    requeued = job.checkpoint()
    assert requeued.function is not job and requeued.function.child is None
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"")
    assert requeued.function.command() == ["python", "model_vgg_single.py", "--seed", "0", "--resume"]


# --- refused input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, phrases",
    [
        (["plan", "--methods", "single,maml"], ["--methods: unknown method 'maml'"]),
        (["plan", "--pairs", "3-10,3-7"], ["'3-7' is not a pair of the hierarchy"]),
        (["plan", "--pairs", "20-10"], ["the auxiliary level 10 must be finer than the primary level 20"]),
        (["plan", "--pairs", "10-10"], ["must be finer than the primary level 10 (finer levels: 20, 100)"]),
        (["plan", "--seeds", "0,one"], ["--seeds '0,one' is not a comma list of integers"]),
        (["plan", "--methods", "single", "--", "--meta-grad", "finite-difference"], ["'--meta-grad' is not a flag"]),
        (["plan", "--", "--seed", "1"], ["figure3 sets --seed itself (use --seeds)"]),
        (["plan", "--", "--run-name", "x"], ["figure3 sets --run-name itself"]),
        (
            ["plan", "--", "--epochs", "0"],
            ["model_vgg_single.py (primary 3, seed 0) refused its flags", "--epochs must be"],
        ),
        (["plan", "--", "--lr", "fast"], ["refused its flags: argument --lr: invalid float value: 'fast'"]),
        (["plan", "--", "--epochs"], ["after --: --epochs needs a value"]),
        (["run", "--runs-per-gpu", "2"], ["--runs-per-gpu packs runs on the GPUs of --gpus"]),
        (["run", "--gpus", "0,0"], ["names a GPU twice"]),
        (["run", "--gpus", "0", "--", "--device", "cpu"], ["figure3 run --gpus sets each run's --device itself"]),
        (["submit", "--time", "soon", "--cluster", "local"], ["--time 'soon' is not a SLURM time"]),
        (["submit", "--time", "10", "--cluster", "local", "--slurm", "mem"], ["--slurm 'mem' is not KEY=VALUE"]),
        (["plan", "--method", "single"], ["unrecognized arguments: --method single"]),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, phrases):
    results = tmp_path / "results"
    assert_refused(run_main(figure3, *args[:1], "--results-dir", results, *args[1:]), *phrases)
    assert not results.exists()


def test_a_gpu_that_does_not_exist_is_refused(tmp_path):
    import torch

    missing = torch.cuda.device_count()
    result = run_main(figure3, "run", "--gpus", str(missing), "--results-dir", tmp_path / "results")
    assert_refused(result, f"--gpus {missing}: there is no GPU {missing}; this machine has")
    assert not (tmp_path / "results").exists()


def test_an_unwritable_results_folder_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    for command in (["run"], ["submit", "--time", "10", "--cluster", "local"]):
        result = run_main(figure3, *command, "--results-dir", tmp_path / "file" / "results")
        assert_refused(result, f"cannot write results to '{tmp_path / 'file' / 'results'}'")


def test_report_with_no_runs_found_is_refused(tmp_path):
    result = run_main(figure3, "report", "--results-dir", tmp_path / "results")
    assert_refused(result, "none of the grid's 15 runs has a finished epoch", "python figure3.py run")
    assert not (tmp_path / "results").exists()


def test_submit_without_submitit_names_the_extras(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)
    result = run_main(figure3, "submit", "--time", "10", "--results-dir", tmp_path / "results")
    assert_refused(result, "submit needs submitit", "pip install -r requirements-extras.txt")
    assert not (tmp_path / "results").exists()


def test_a_method_whose_script_is_missing_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(figure3, "HERE", tmp_path)
    assert_refused(run_main(figure3, "plan", "--methods", "single"), "--methods single: its script model_vgg_single.py")
