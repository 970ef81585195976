"""figure3.py: the grid and its run folders, plan / run / report end to end on synthetic data (real model-script
children), Ctrl-C and a failing run, the report's numbers and picture, submit through submitit's local executor
with a preemption, and every refused input."""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, run_main

import experiment
import figure3
import model_vgg_human as human
import model_vgg_single as single
import runner

# The optional extras (requirements-extras.txt; CI installs them): without them these tests are skipped.
needs_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="the picture needs matplotlib, an optional extra"
)
needs_submitit = pytest.mark.skipif(
    importlib.util.find_spec("submitit") is None, reason="submitit is an optional extra"
)

# Tiny real runs: one batch of 4 images per pass, on the CPU.
TINY = ["--limit-batches", "1", "--batch-size", "2", "--device", "cpu", "--workers", "0", "--no-download"]


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
        methods=runner.parse_methods(methods),
        pairs=figure3.parse_pairs(pairs),
        seeds=runner.parse_seeds(seeds),
        results_dir=results,
        script_flags=tuple(flags),
    )
    return selection, figure3.build_grid(selection)


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def recorded_config(run: runner.Run) -> dict:
    """The settings a run's metrics.json records, as its script records them."""
    module = runner.script(run.method)
    cfg = runner.checked_config(run.method, list(run.args), run.name)
    return {**experiment.settings(cfg), **module.derived_settings(cfg), "method": run.method}


def write_metrics(run: runner.Run, accuracies: list[float], reasons=("synthetic data",), seconds=None) -> None:
    """A metrics.json as the scripts write it (accuracies in %, stored as fractions)."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    epochs = [{"epoch": i + 1, "test_primary_acc": a / 100} for i, a in enumerate(accuracies)]
    for epoch in epochs if seconds is not None else ():
        epoch["seconds"] = seconds
    record = {"config": recorded_config(run), "epochs": epochs, "summary": {"not_comparable_because": list(reasons)}}
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
        module = {"single": single, "human": human, "maxl": runner.script("maxl")}[run.method]
        cfg = module.check_config(experiment.parse_flags(module.Config, list(run.args)))
        experiment.check_run_settings(cfg)
        assert run.run_dir == tmp_path / experiment.run_name(cfg, module.run_name_stem(cfg), module.paper_settings(cfg))
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
    assert [runner.describe(run, runner.read_state(run)) for run in runs] == [
        "finished (3 epochs)",
        "stopped after epoch 2 of 3",
    ]


def test_children_on_gpus_get_their_gpu_and_cuda(tmp_path, monkeypatch):
    _, (run,) = grid(tmp_path, methods="single", pairs="3-10")
    state = runner.read_state(run)
    assert runner.command(run, state, gpu=1)[-2:] == ["--device", "cuda"]
    assert "--device" not in runner.command(run, state)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert runner.child_environment(1)["CUDA_VISIBLE_DEVICES"] == "1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")  # numbered as this process sees them
    assert runner.child_environment(1)["CUDA_VISIBLE_DEVICES"] == "5"
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    assert runner.check_gpus("0,1", runs_per_gpu=2) == [0, 0, 1, 1]
    assert runner.check_gpus(None, runs_per_gpu=1) == [None]


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
    assert rows["20 → 100"]["published"] == (
        "Single 71.9 [1]; Human 75.7 [2], 74.6 [3], 75.5 [1]; MAXL 76.6 [2], 77.4 [3], 76.0 [1], 76.3 [4]; "
        "MAXL's best pair [*]"
    )
    # the rl-aux notebook's figures are marked as a reproduction, not a paper
    assert "[1] rl-aux notebook, a reproduction: one run, mean of its last 15 of 200 epochs" in result.stdout
    assert "[4] rl-aux notebook, a reproduction: its ablation of the auxiliary weight" in result.stdout
    assert rows["3 → 10"]["published"] == "plot only [*]"
    assert "[2] WAMAL authors' README" in result.stdout
    assert "4 of the 6 pairs and worse on 2" in result.stdout
    assert "Not comparable with the published figures: synthetic data" in result.stdout

    report_md = (tmp_path / "figure3" / "report.md").read_text()
    assert table_rows(report_md) == rows
    assert "![Figure 3](figure3.png)" in report_md
    assert (tmp_path / "figure3" / "figure3.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    states = {run: runner.read_state(run) for run in runs}
    figure = figure3.make_figure(figure3.figure_data(selection, runs, states))
    finals, *panels = figure.axes
    assert [ax.get_title() for ax in panels] == ["primary 3, auxiliary 10", "primary 20, auxiliary 100"]
    for ax, pair in zip(panels, [(3, 10), (20, 100)]):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert list(lines) == ["Single", "Human", "MAXL"]
        for method, label in (("single", "Single"), ("human", "Human"), ("maxl", "MAXL")):
            seed_curves = [curves[run] for run in runs if run.method == method and run.serves(pair) and run in curves]
            mean_per_epoch = [statistics.fmean(c[e] for c in seed_curves if len(c) > e) for e in range(8)]
            assert list(lines[label].get_xdata()) == list(range(1, 9))
            assert lines[label].get_ydata() == pytest.approx(mean_per_epoch)
        assert len(ax.collections) == 3  # a band per method: every one has several seeds

    # The paper's panel: per pair and method, the mean over seeds of each run's last-5 mean, ± their std as error
    # bars, and the published figures (20 -> 100 only) as stars.
    bars = {container.get_label(): container for container in finals.containers}
    assert list(bars) == ["Single", "Human", "MAXL"]
    for method, label in (("single", "Single"), ("human", "Human"), ("maxl", "MAXL")):
        points, _, (bar_lines,) = bars[label].lines
        finals_by_pair = [list(seeds_of(method, pair).values()) for pair in ((3, 10), (20, 100))]
        assert points.get_ydata() == pytest.approx([statistics.fmean(v) for v in finals_by_pair])
        half_bars = [(top[1] - bottom[1]) / 2 for bottom, top in bar_lines.get_segments()]
        assert half_bars == pytest.approx([statistics.stdev(v) for v in finals_by_pair])
        assert [round(x) for x in points.get_xdata()] == [0, 1]
    stars = [line for line in finals.get_lines() if line.get_gid() == "published"]
    papers = [float(line.get_ydata()[0]) for line in stars if line.get_marker() == "*"]
    reproductions = [float(line.get_ydata()[0]) for line in stars if line.get_marker() == "^"]
    assert sorted(papers) == [74.6, 75.7, 76.6, 77.4]
    assert sorted(reproductions) == [71.86, 75.52, 75.98, 76.28]  # the rl-aux notebook's, as triangles
    assert {round(float(line.get_xdata()[0])) for line in stars} == {1}
    assert [label.get_text() for label in finals.get_xticklabels()] == ["3 → 10", "20 → 100"]
    assert "Not comparable with the published figures: synthetic data" in figure.get_suptitle()


def figure_of(tmp_path: Path, epochs: int, seeds="0", reasons=("synthetic data",)):
    """The picture of Single, Human and MAXL at 3 -> 10 and 20 -> 100 with equal curves (as when every method
    learns nothing yet), and its data."""
    flags = ["--epochs", str(epochs)]
    selection, runs = grid(tmp_path, pairs="3-10,20-100", seeds=seeds, flags=flags)
    for run in runs:
        write_metrics(run, [30.0 + 0.1 * e + run.seed for e in range(epochs)], reasons=reasons)
    states = {run: runner.read_state(run) for run in runs}
    return figure3.make_figure(figure3.figure_data(selection, runs, states))


def drawn(figure):
    """The figure laid out as it is saved (constrained layout places the legend and the panels on drawing)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure).draw()
    return figure


@needs_matplotlib
@pytest.mark.parametrize("epochs", [1, 2, 200])
def test_the_picture_has_integer_epochs_distinct_equal_curves_and_a_legend_off_the_data(tmp_path, epochs):
    figure = drawn(figure_of(tmp_path, epochs, seeds="0,1"))
    finals, *panels = figure.axes
    assert len(finals.containers) == 3  # the paper's panel: a point with error bars per method
    for ax in panels:
        low, high = ax.get_xlim()
        ticks = [tick for tick in ax.get_xticks() if low <= tick <= high]
        assert ticks and all(float(tick).is_integer() for tick in ticks), ticks
        assert low < 1 and epochs < high  # the first and last epochs inside the panel, not on its edge
        lines = ax.get_lines()
        assert len({(line.get_marker(), str(line.get_linestyle())) for line in lines}) == len(lines) == 3
        assert len({line.get_markersize() for line in lines}) == 3  # nested: where they coincide each shows
        assert all(line.get_marker() not in ("None", "", None) for line in lines)  # one epoch is a visible point
    (legend,) = figure.legends
    box = legend.get_window_extent()
    for ax in figure.axes:
        overlap = box.intersection(box, ax.get_window_extent())
        assert overlap is None or overlap.width * overlap.height == 0, ax.get_title()
    assert [text.get_text() for text in legend.get_texts()] == [
        "Single",
        "Human",
        "MAXL",
        "published figure",
        "third-party reproduction",
    ]


@needs_matplotlib
def test_the_picture_says_on_itself_when_its_runs_are_not_comparable(tmp_path):
    reasons = ("synthetic data", "2 of the paper's 200 epochs")
    note = figure_of(tmp_path / "synthetic", 2, reasons=reasons).get_suptitle()
    assert "Not comparable with the published figures: 2 of the paper's 200 epochs, synthetic data" in note
    assert "Not comparable" not in figure_of(tmp_path / "real", 2, reasons=()).get_suptitle()
    path = tmp_path / "figure3.png"  # and it renders
    figure_of(tmp_path / "synthetic", 1).savefig(path, dpi=60, format="png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
    assert (
        row["published"]
        == "Human 75.7 [1], 74.6 [2], 75.5 [3]; WAMAL 80.2 [4], 81.5 [1], 81.3 [3]; MAXL's best pair [*]"
    )


GOOD_EPOCHS = '{"config": {"method": "single"}, "epochs": [{"epoch": 1, "test_primary_acc": 0.4}, '


@pytest.mark.parametrize(
    "text, reason",
    [
        (GOOD_EPOCHS[:-30], "truncated (the JSON stops at line 1)"),
        ("<html>not a metrics file</html>", "not JSON (Expecting value at line 1, column 1)"),
        ("", "empty"),
        (
            GOOD_EPOCHS + '{"epoch": 2, "test_primary_acc": "abc"}]}',
            'epoch 2\'s test_primary_acc is "abc", not a number',
        ),
        (
            GOOD_EPOCHS + '{"epoch": 2, "test_primary_acc": Infinity}]}',
            "epoch 2's test_primary_acc is Infinity, not a finite",
        ),
        (
            GOOD_EPOCHS + '{"epoch": 2, "test_primary_acc": NaN}]}',
            "epoch 2's test_primary_acc is NaN, not a finite number",
        ),
        (GOOD_EPOCHS + '{"epoch": 2, "test_primary_acc": 41.0}]}', "is 41.0, not a fraction between 0 and 1"),
        (GOOD_EPOCHS + '{"epoch": 2}]}', "epoch 2 has no test_primary_acc"),
        ('{"config": {}, "epochs": {"1": 0.4}}', "it holds no list of epochs"),
    ],
)
def test_damaged_metrics_are_named_in_plan_and_report_never_shown_as_numbers(tmp_path, text, reason):
    select = ["--methods", "single,human", "--pairs", "3-10", "--results-dir", tmp_path, "--", "--epochs", "2"]
    _, (damaged, healthy) = grid(tmp_path, methods="single,human", pairs="3-10", flags=["--epochs", "2"])
    write_metrics(healthy, [50.0, 52.0])
    damaged.run_dir.mkdir(parents=True)
    (damaged.run_dir / "metrics.json").write_text(text)
    (damaged.run_dir / "checkpoint.pt").write_bytes(b"")
    plan = run_main(figure3, "plan", *select)
    assert plan.returncode == 0, plan.stderr
    line = plan.stdout.splitlines()[0]
    assert line.startswith(f"{damaged.name}: metrics damaged: ") and reason in line and "not started" not in line
    assert plan.stdout.splitlines()[1].endswith("--resume")  # its checkpoint rewrites metrics.json
    assert plan.stdout.splitlines()[-1] == "2 runs: 1 damaged, 1 finished"

    report = run_main(figure3, "report", *select[:-3], "--no-figure", *select[-3:])
    assert report.returncode == 0, report.stdout + report.stderr
    row = table_rows(report.stdout)["3 → 10"]
    assert row["Single"] == "— (1 damaged)" and row["Human"] == "51.00 (n=1, 2 ep)"
    assert f"{damaged.name}: metrics damaged: " in report.stdout and reason in report.stdout
    for number in ("inf", "nan", "4100"):
        assert number not in " ".join(row.values()).lower()
    report_md = (tmp_path / "figure3" / "report.md").read_text()
    assert f"- `{damaged.name}`: metrics damaged: " in report_md


def test_a_damaged_run_without_a_checkpoint_fails_without_a_child_and_a_checkpoint_alone_is_stopped(tmp_path):
    select = ["--methods", "single", "--pairs", "3-10,10-20", "--results-dir", tmp_path, "--", "--epochs", "2"]
    _, (damaged, checkpointed) = grid(tmp_path, methods="single", pairs="3-10,10-20", flags=["--epochs", "2"])
    damaged.run_dir.mkdir(parents=True)
    (damaged.run_dir / "metrics.json").write_text('{"epochs": [')
    checkpointed.run_dir.mkdir(parents=True)
    (checkpointed.run_dir / "checkpoint.pt").write_bytes(b"")  # killed between the checkpoint and metrics.json
    plan = run_main(figure3, "plan", *select).stdout.splitlines()
    assert plan[0] == f"{damaged.name}: metrics damaged: truncated (the JSON stops at line 1) (no checkpoint.pt)"
    assert plan[2] == f"{checkpointed.name}: stopped: checkpoint.pt but no metrics.json yet (resuming writes it)"
    assert plan[3].endswith("--resume")
    report = run_main(figure3, "report", *select)
    assert_refused(
        report, "none of the grid's 2 runs has a finished epoch", f"1 run with damaged metrics ({damaged.name}"
    )

    result = run_main(figure3, "run", "--methods", "single", "--pairs", "3-10", "--results-dir", tmp_path, "--",
                      "--epochs", "2")  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.startswith(f"FAIL  {damaged.name} (metrics damaged: truncated (the JSON stops at line 1), ")
    assert "move its folder away to start it over" in result.stdout
    assert result.stderr.startswith(f"failed: {damaged.name} (metrics damaged: ")
    assert not damaged.job_log.exists()  # no child was started


def read_only(folder: Path, monkeypatch) -> None:
    """`folder` as on a read-only mount: its mode says so, and for root, whom modes do not stop, writing a file
    into it or below fails as it would there."""
    folder.chmod(0o555)
    if os.geteuid() == 0:
        make = runner.tempfile.TemporaryFile

        def temporary_file(*args, dir=None, **kwargs):
            if dir is not None and Path(dir).resolve().is_relative_to(folder.resolve()):
                raise PermissionError(13, "Permission denied")
            return make(*args, dir=dir, **kwargs)

        monkeypatch.setattr(runner.tempfile, "TemporaryFile", temporary_file)


@needs_matplotlib
def test_report_out_writes_elsewhere_and_read_only_results_name_it(tmp_path, monkeypatch):
    results, out = tmp_path / "results", tmp_path / "elsewhere" / "report"
    _, (run,) = grid(results, methods="single", pairs="3-10")
    write_metrics(run, [50.0, 52.0])
    select = ["--methods", "single", "--pairs", "3-10", "--results-dir", results]
    read_only(results, monkeypatch)
    try:
        refused = run_main(figure3, "report", *select, "--no-figure")
        assert_refused(refused, f"cannot write report.md and figure3.png into '{results / 'figure3'}'",
                       "Permission denied", "give --out DIR to write them elsewhere")  # fmt: skip
        assert table_rows(refused.stdout)["3 → 10"]["Single"].startswith("51.00")  # the table first
        assert not (results / "figure3").exists()
        written = run_main(figure3, "report", *select, "--out", out)
    finally:
        results.chmod(0o755)
    assert written.returncode == 0, written.stderr
    assert sorted(p.name for p in out.iterdir()) == ["figure3.png", "report.md"]
    assert table_rows((out / "report.md").read_text()) == table_rows(written.stdout)
    assert written.stdout.splitlines()[-1].startswith(f"wrote {out / 'report.md'}")
    assert not (results / "figure3").exists()
    (tmp_path / "file").write_text("")
    bad_out = run_main(figure3, "report", *select, "--no-figure", "--out", tmp_path / "file" / "report")
    assert_refused(bad_out, f"report --out: cannot write into '{tmp_path / 'file' / 'report'}'", "choose another --out")


def test_report_into_a_pipe_closed_early_exits_0_without_a_traceback(tmp_path):
    """`figure3.py report | head -1`: the reader goes before figure3 writes; report.md is still written."""
    _, (run,) = grid(tmp_path, methods="single", pairs="3-10")
    write_metrics(run, [50.0, 52.0])
    args = ["report", "--methods", "single", "--pairs", "3-10", "--results-dir", tmp_path, "--no-figure"]
    process = start_figure3(*args)
    process.stdout.close()  # the reader has gone before the first line
    stderr = process.stderr.read()
    assert process.wait(timeout=240) == 0, stderr
    assert stderr == ""  # no traceback, no "Exception ignored"
    assert "| pair | Single | published |" in (tmp_path / "figure3" / "report.md").read_text()


def test_run_into_a_pipe_closed_early_stops_its_children_and_exits_141(data_root, tmp_path):
    """`figure3.py run | head -1` once head has gone: the grid cannot report on, so it stops (its children keep
    their checkpoints), with the exit code of a process killed by SIGPIPE, and no traceback."""
    _, (run,) = grid(tmp_path, methods="single", pairs="3-10", flags=tiny(data_root, epochs=2))
    process = start_figure3("run", "--methods", "single", "--pairs", "3-10", "--results-dir", tmp_path, "--",
                            *tiny(data_root, epochs=2))  # fmt: skip
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=240) == 128 + signal.SIGPIPE, stderr
    assert stderr == ""
    assert run.job_log.read_text().startswith("=== ")  # its child had started, and was stopped
    assert not pids_running([str(run.script), *run.args])


def test_messages_say_1_run_and_1_epoch(tmp_path):
    select = ["--methods", "single", "--pairs", "3-10", "--results-dir", tmp_path, "--", "--epochs", "1"]
    _, (run,) = grid(tmp_path, methods="single", pairs="3-10", flags=["--epochs", "1"])
    assert_refused(run_main(figure3, "report", *select), "the grid's one run has no finished epoch")
    write_metrics(run, [40.0])
    plan = run_main(figure3, "plan", *select).stdout.splitlines()
    assert (plan[0], plan[-1]) == (f"{run.name}: finished (1 epoch)", "1 run: 1 finished")
    (run.run_dir / ".lock").write_text(f"{os.getpid()}\n")
    state = runner.read_state(run)
    assert runner.describe(run, state) == f"running (pid {os.getpid()}), 1 of 1 epoch done"
    assert runner.describe(run, state, elsewhere=True) == f"running elsewhere (pid {os.getpid()}), 1 of 1 epoch done"


def test_report_finds_runs_by_their_recorded_settings(tmp_path):
    """After `run ... -- --batch-size 20`, a plain report finds those runs by what their metrics.json records.
    Several folders at one place of the grid: one line names them and how they differ; the one the flags name is
    used (none when the flags name none of them); flags after -- choose exactly, as the folder names they give."""
    select = ["--methods", "single,human", "--pairs", "3-10", "--results-dir", tmp_path, "--no-figure"]
    _, (single20, human20) = grid(tmp_path, methods="single,human", pairs="3-10", flags=["--batch-size", "20"])
    write_metrics(single20, [40.0, 42.0])
    write_metrics(human20, [45.0, 47.0])
    plain = run_main(figure3, "report", *select)
    assert plain.returncode == 0, plain.stderr
    row = table_rows(plain.stdout)["3 → 10"]
    assert row["Single"] == "41.00 (n=1, 2 ep, 1 stopped)" and row["Human"] == "46.00 (n=1, 2 ep, 1 stopped)"
    assert "folders hold" not in plain.stdout

    _, (single50,) = grid(tmp_path, methods="single", pairs="3-10", flags=["--batch-size", "50", "--lr", "0.1"])
    write_metrics(single50, [30.0])
    two = run_main(figure3, "report", *select)
    assert two.returncode == 0, two.stderr
    note = next(line for line in two.stdout.splitlines() if "folders hold" in line)
    assert note == (
        f"2 folders hold Single primary 3, seed 0, with different settings: {single20.name} (--batch-size 20 --lr "
        f"0.01), {single50.name} (--batch-size 50 --lr 0.1); none of them is reported; to report another, repeat "
        "after -- the flags it was run with"
    )
    assert table_rows(two.stdout)["3 → 10"]["Single"] == "—"

    _, (paper,) = grid(tmp_path, methods="single", pairs="3-10")
    write_metrics(paper, [60.0] * 200)
    three = run_main(figure3, "report", *select)
    note = next(line for line in three.stdout.splitlines() if "folders hold" in line)
    assert note.startswith(f"3 folders hold Single primary 3, seed 0, with different settings: {paper.name} ")
    assert f"the report uses {paper.name}, the grid's own name for it" in note
    assert table_rows(three.stdout)["3 → 10"]["Single"] == "60.00 (n=1, 200 ep)"
    assert note in (tmp_path / "figure3" / "report.md").read_text()

    chosen = run_main(figure3, "report", *select, "--", "--batch-size", "50", "--lr", "0.1")
    assert "folders hold" not in chosen.stdout
    assert table_rows(chosen.stdout)["3 → 10"]["Single"] == "30.00 (n=1, 1 ep, 1 stopped)"


def test_time_left_shares_the_work_left_between_the_slots():
    _, (single, human) = grid(Path("results"), methods="single,human", pairs="3-10", flags=["--epochs", "10"])
    left = [(single, 5), (human, 0)]
    assert runner.time_left(left, {}, 1) == "time left: not known until an epoch has ended"
    assert runner.time_left(left, {"single": 6.0}, 1) == "at least 30 s left (no human epoch timed yet)"
    assert runner.time_left(left, {"single": 6.0, "human": 60.0}, 1) == "about 10 min left"  # 30 s + 600 s
    assert runner.time_left(left, {"single": 6.0, "human": 60.0}, 2) == "about 10 min left"  # its longest run
    assert runner.time_left([(single, 10)], {"single": 6.0}, 1) == "no epoch left"
    assert runner.seconds_per_epoch({}) == {}


# --- real runs ----------------------------------------------------------------------------------------


@needs_matplotlib
def test_run_plan_report_end_to_end(data_root, tmp_path, monkeypatch):
    """Three pairs, two of them sharing Single 3; Single and Human (children that start quickly; MAXL's are the same
    children with another script), two epochs: five real runs. Human 3 -> 10's child is killed as it starts (as by
    the OOM killer): it fails, the others go on. Ctrl-C in Human 3 -> 20's second epoch stops it with its checkpoint
    and starts nothing more. Its metrics.json is then truncated: plan names the damage, and the same command runs
    what is missing and resumes what stopped (rewriting that file), with a progress line per ended epoch and the
    results table at the end; a third time it does nothing. The report's numbers are the metrics files', and a plain
    report, without the flags, finds the same runs by their recorded settings."""
    monkeypatch.setattr(runner, "PROGRESS_SECONDS", 0)  # a line at every ended epoch: tiny epochs are quick
    select = ["--methods", "single,human", "--pairs", "3-10,3-20,10-20", "--results-dir", tmp_path]
    flags = ["--", *tiny(data_root, epochs=2)]
    selection, runs = grid(tmp_path, methods="single,human", pairs="3-10,3-20,10-20", flags=flags[1:])
    single3, human10, human20, single10, human10_20 = runs
    assert [run.name.split("-seed0")[0] for run in runs] == [
        "single-pri3",
        "human-pri3-aux10",
        "human-pri3-aux20",
        "single-pri10",
        "human-pri10-aux20",
    ]

    def interfere():
        os.kill(wait_for(lambda: pids_running([str(human10.script), *human10.args]))[0], signal.SIGKILL)
        wait_for(lambda: (human20.run_dir / "checkpoint.pt").exists())
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: figure3's handler runs in this process's main thread

    own_handler = signal.signal(signal.SIGINT, lambda *_: None)  # a late signal must not reach pytest
    try:
        interferer = in_background(interfere)
        result = run_main(figure3, "run", *select, *flags)
        interferer.join()
    finally:
        signal.signal(signal.SIGINT, own_handler)
    assert result.returncode == 130, result.stdout + result.stderr
    assert f"start {single3.name} (1 of 5): {single3.job_log}" in result.stdout
    assert f"done  {single3.name}" in result.stdout
    assert f"FAIL  {human10.name} (killed by SIGKILL)" in result.stdout
    assert f"stopped {human20.name}" in result.stdout
    assert f"failed: {human10.name} (killed by SIGKILL); see {human10.job_log}" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("interrupted: every child stopped and keeps its last checkpoint")
    assert result.stderr.splitlines()[-1].endswith("(2 runs not started)")
    assert "interrupted" in human20.job_log.read_text()
    assert [r["epoch"] for r in metrics(human20.run_dir)["epochs"]] == [1]
    assert experiment.lock_holder(human20.run_dir) is None
    assert not single10.run_dir.exists() and not human10_20.run_dir.exists()  # nothing started after Ctrl-C

    text = (human20.run_dir / "metrics.json").read_text()
    (human20.run_dir / "metrics.json").write_text(text[: len(text) // 2])  # as a full disk might leave it
    plan = run_main(figure3, "plan", *select, *flags).stdout.splitlines()
    damaged = f"{human20.name}: metrics damaged: truncated (the JSON stops at line "
    (line,) = [line for line in plan if line.startswith(damaged)]
    assert line.endswith("(checkpoint.pt kept)")
    assert plan[plan.index(line) + 1].endswith(" --resume")
    assert plan[-1] == "5 runs: 1 finished, 3 not started, 1 damaged"
    finished_before = (single3.run_dir / "metrics.json").stat().st_mtime_ns
    again = run_main(figure3, "run", *select, *flags)  # the same command
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"skip  {single3.name}: finished (2 epochs)" in again.stdout
    assert (single3.run_dir / "metrics.json").stat().st_mtime_ns == finished_before
    assert f"resuming {human20.run_dir} at epoch 2" in human20.job_log.read_text()
    for run in runs:
        assert [r["epoch"] for r in metrics(run.run_dir)["epochs"]] == [1, 2], run.name
        assert not (run.run_dir / ".lock").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["figure3", *(run.name for run in runs)])
    assert sorted(p.name for p in (tmp_path / "figure3" / "jobs").iterdir()) == sorted(f"{r.name}.log" for r in runs)
    # Progress: a line when an epoch has ended, naming the running job's epoch of epochs and the grid's time left.
    progress = [line for line in again.stdout.splitlines() if line.startswith("going ")]
    assert 1 <= len(progress) <= 7, again.stdout  # 7 epochs to do: never more lines than ended epochs
    names = "|".join(run.name for run in runs)
    for line in progress:
        assert re.fullmatch(rf"going ({names}) epoch [12] of 2; grid: ((about|at least) \d+ s|no epoch) left.*", line)
    # At the end, the table report prints.
    assert table_rows(again.stdout)["3 → 10"]["Single"].endswith("(n=1, 2 ep)")

    before = {run: (run.run_dir / "metrics.json").stat().st_mtime_ns for run in runs}
    logs = {run: run.job_log.read_text() for run in runs}
    third = run_main(figure3, "run", *select, *flags)
    assert third.returncode == 0 and "nothing to do" in third.stdout, third.stdout
    assert before == {run: (run.run_dir / "metrics.json").stat().st_mtime_ns for run in runs}
    assert logs == {run: run.job_log.read_text() for run in runs}

    report = run_main(figure3, "report", *select, *flags)
    assert report.returncode == 0, report.stderr
    rows = table_rows(report.stdout)
    mean = {run: statistics.fmean(100 * r["test_primary_acc"] for r in metrics(run.run_dir)["epochs"]) for run in runs}
    assert rows["3 → 10"]["Single"] == rows["3 → 20"]["Single"] == f"{mean[single3]:.2f} (n=1, 2 ep)"
    assert rows["3 → 20"]["Human"] == f"{mean[human20]:.2f} (n=1, 2 ep)"
    assert rows["10 → 20"]["Single"] == f"{mean[single10]:.2f} (n=1, 2 ep)"
    assert rows["10 → 20"]["Human"] == f"{mean[human10_20]:.2f} (n=1, 2 ep)"
    assert table_rows(third.stdout) == rows  # `run` ends with the same table
    states = {run: runner.read_state(run) for run in runs}
    figure = figure3.make_figure(figure3.figure_data(selection, runs, states))
    assert [[line.get_label() for line in ax.get_lines()] for ax in figure.axes[1:]] == [["Single", "Human"]] * 3
    assert (tmp_path / "figure3" / "figure3.png").is_file()

    # The runs' names carry a hash of --batch-size 2 and -limit1: a plain report finds them by their settings.
    plain = run_main(figure3, "report", *select, "--no-figure")
    assert plain.returncode == 0, plain.stderr
    assert table_rows(plain.stdout) == rows


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
    assert result.stdout.splitlines()[:4] == [
        f"skip  {done.name}: finished (2 epochs)",
        f"skip  {held.name}: running elsewhere (pid {os.getpid()}), 1 of 2 epochs done",
        "nothing to do: every run of the grid is finished or running",
        "",
    ]
    assert table_rows(result.stdout)["3 → 10"]["Single"] == "30.50 (n=1, 2 ep)"  # then the table, as report's
    assert table_rows(result.stdout)["10 → 20"]["Single"] == "30.00 (n=1, 1 ep, 1 running)"
    assert not held.job_log.exists()
    plan = run_main(figure3, "plan", "--methods", "single", "--pairs", "3-10,10-20", "--results-dir", tmp_path)
    assert plan.returncode == 0 and plan.stdout.splitlines()[-1] == "2 runs: 1 stopped, 1 running", plan.stdout


def start_figure3(*args) -> subprocess.Popen:
    """`python figure3.py ARGS` from the repository root, as a user runs it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "figure3.py"), *map(str, args)]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_runs_at_once_share_the_grid(data_root, tmp_path):
    """Two `figure3.py run` on one grid at once: each run is started once, by one of them; the other skips it as
    running elsewhere (or finished). Neither fails, and no job log holds two processes' output. The second is this
    process (no second interpreter start-up), started once the first has started a run."""
    args = ["run", "--methods", "single", "--pairs", "3-10,10-20", "--results-dir", tmp_path, "--"]
    _, runs = grid(tmp_path, methods="single", pairs="3-10,10-20", flags=tiny(data_root, epochs=2))
    first = start_figure3(*args, *tiny(data_root, epochs=2))
    wait_for(lambda: any(run.job_log.exists() for run in runs) or first.poll() is not None)
    second = run_main(figure3, *args, *tiny(data_root, epochs=2))
    outputs = [first.communicate(timeout=600), (second.stdout, second.stderr)]
    for returncode, (stdout, stderr) in zip((first.returncode, second.returncode), outputs):
        assert returncode == 0, stdout + stderr
        assert "FAIL" not in stdout and "Traceback" not in stderr, stdout + stderr
    both = outputs[0][0] + outputs[1][0]
    for run in runs:
        assert both.count(f"done  {run.name} ") == 1, both
        assert [r["epoch"] for r in metrics(run.run_dir)["epochs"]] == [1, 2]
        log = run.job_log.read_text()
        assert [line.startswith("=== ") for line in log.splitlines()].count(True) == 1, log  # one child wrote it
        assert "error:" not in log, log
    for stdout, _ in outputs:  # each says what it did with every run: done it, or skipped it
        for run in runs:
            assert f"done  {run.name} " in stdout or f"skip  {run.name}: " in stdout, stdout


def test_a_run_going_elsewhere_is_skipped_not_failed(data_root, tmp_path):
    """The races `run` can lose, as another process starts a run first: its folder's lock taken by a run whose
    holder this host cannot see (another node), so that the child started here exits 2 with the scripts' line;
    and its job log held by another figure3 (here, this test), so that nothing is started. Both are running
    elsewhere, not failures: exit code 0."""
    flags = tiny(data_root, epochs=1)
    _, (remote, local) = grid(tmp_path, methods="single", pairs="3-10,10-20", flags=flags)
    remote.run_dir.mkdir(parents=True)
    with open(remote.run_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write("4242 node17\n")
        lock.flush()
        held_log = runner.open_job_log(local.job_log)
        try:
            result = run_main(figure3, "run", "--methods", "single", "--pairs", "3-10,10-20", "--results-dir",
                              tmp_path, "--", *flags)  # fmt: skip
        finally:
            held_log.close()
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert f"skip  {remote.name}: running elsewhere (pid 4242 on node17)" in lines
    assert f"skip  {local.name}: running elsewhere (another process holds its job log {local.job_log})" in lines
    assert "FAIL" not in result.stdout and result.stderr == ""
    log = remote.job_log.read_text().splitlines()
    assert log[0].startswith("=== ") and "is in use by another run (pid 4242 on node17)" in log[-1]
    assert local.job_log.read_text() == ""  # this test's own lock: no figure3 wrote into it
    assert not (local.run_dir).exists()


def test_a_child_refused_for_its_locked_folder_is_found_running_elsewhere_by_the_lock_not_its_message(
    data_root, tmp_path, monkeypatch
):
    """A child that exits with code 2 is running elsewhere when the folder's lock is held by somebody else, as
    experiment.locked_by finds by trying the lock (here: this test holds the flock, its lock file naming another
    host); a child that exits with code 2 for another reason (a folder holding foreign files) failed. The runner
    never reads the child's message to tell the two apart."""
    flags = tiny(data_root, epochs=1)
    _, (held, foreign) = grid(tmp_path, methods="single", pairs="3-10,10-20", flags=flags)
    asked = []

    def locked_by(run_dir):
        asked.append(Path(run_dir))
        return real_locked_by(run_dir)

    real_locked_by = experiment.locked_by
    monkeypatch.setattr(experiment, "locked_by", locked_by)
    held.run_dir.mkdir(parents=True)
    foreign.run_dir.mkdir(parents=True)
    (foreign.run_dir / "notes.txt").write_text("not a run's file\n")  # the script refuses the folder: exit code 2
    with open(held.run_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write("4242 node17\n")
        lock.flush()
        result = run_main(figure3, "run", "--methods", "single", "--pairs", "3-10,10-20", "--results-dir", tmp_path,
                          "--", *flags)  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert f"skip  {held.name}: running elsewhere (pid 4242 on node17)" in lines
    assert f"FAIL  {foreign.name} (exit code 2)" in lines
    assert "holds files no run of this project wrote" in foreign.job_log.read_text()
    assert sorted(asked) == sorted([held.run_dir, foreign.run_dir])  # asked of the lock, for each exit code 2
    for name in ("runner.py", "figure3.py", "tables.py"):  # no message of the scripts is matched
        assert "in use by another run" not in (REPO / name).read_text(), name


@needs_submitit
def test_submit_through_submitits_local_executor_requeues_a_preempted_job_which_resumes(
    data_root, tmp_path, monkeypatch
):
    """A run stopped after epoch 1 is submitted through submitit's local executor; the job gets submitit's
    preemption signal as soon as its child starts: figure3 stops the child, submitit requeues the same call, and
    the requeued call resumes the run from its checkpoint and finishes it."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the job process unpickles runner.RunJob by reference
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
    log = run.job_log.read_text()
    commands = [line for line in log.splitlines() if line.startswith("=== ")]
    assert len(commands) == 2 and all(line.endswith(" --resume") for line in commands)
    assert f"resuming {run.run_dir} at epoch 2" in log
    submitit_logs = "".join(p.read_text() for p in (tmp_path / "figure3" / "submitit").glob("*_log.*"))
    assert "Requeued job" in submitit_logs
    again = run_main(figure3, *args, "--results-dir", tmp_path, *flags)
    assert again.returncode == 0 and "nothing to submit" in again.stdout


@needs_submitit
def test_the_requeued_call_is_the_same_run_without_the_live_child(tmp_path):
    job_log = str(tmp_path / "figure3" / "jobs" / "run.log")
    job = runner.RunJob("python", "model_vgg_single.py", ["--seed", "0"], str(tmp_path / "run"), job_log, str(tmp_path))
    assert job.command() == ["python", "model_vgg_single.py", "--seed", "0"]
    requeued = job.checkpoint()
    assert requeued.function is not job and requeued.function.child is None
    assert requeued.function.job_log == job_log
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
    monkeypatch.setattr(runner, "HERE", tmp_path)
    assert_refused(run_main(figure3, "plan", "--methods", "single"), "--methods single: its script model_vgg_single.py")
