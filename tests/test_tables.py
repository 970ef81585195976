"""tables.py: the datasets x backbones x methods grid and its run folders, the tables' numbers (mean ± std over
seeds, differences, published figures, missing and partial runs), a real run on synthetic CIFAR-10 that resumes and
then has nothing to do, submit's folders, runs kept apart from figure3's, and every refused input."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import REPO, run_main

import experiment
import figure3
import model_vgg_single as single
import runner
import tables
from create_dataset import make_synthetic

# Tiny real runs: one batch of 4 images per pass, on the CPU.
TINY = ["--limit-batches", "1", "--batch-size", "4", "--device", "cpu", "--workers", "0", "--no-download"]


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory) -> Path:
    """A synthetic CIFAR-10 in the real archive's format: 40 train and 20 test images."""
    return make_synthetic("cifar10", tmp_path_factory.mktemp("cifar10") / "data", n_train=40, n_test=20, seed=0)


def grid(
    results: Path, datasets="cifar10", backbones="vgg16", methods="single,maxl,wamal", seeds="0", flags=(), weights="1"
):
    selection = tables.TableSelection(
        datasets=tables.parse_names(datasets, tables.DATASETS, "--datasets", "dataset"),
        backbones=tables.parse_names(backbones, tables.BACKBONES, "--backbones", "backbone"),
        methods=runner.parse_methods(methods),
        seeds=runner.parse_seeds(seeds),
        results_dir=results,
        script_flags=tuple(flags),
        aux_weights=tables.parse_weights(weights),
    )
    return selection, tables.build_tables(selection)


def checked(run: runner.Run):
    return runner.script(run.method), runner.checked_config(run.method, list(run.args), run.name)


def write_metrics(run: runner.Run, accuracies: list[float], reasons=("synthetic data",), config=None) -> None:
    """A metrics.json as the scripts write it: the settings they record, accuracies (in %) stored as fractions."""
    module, cfg = checked(run)
    recorded = {**experiment.settings(cfg), **module.derived_settings(cfg), "method": run.method}
    run.run_dir.mkdir(parents=True, exist_ok=True)
    epochs = [{"epoch": i + 1, "test_primary_acc": a / 100, "seconds": 1.0} for i, a in enumerate(accuracies)]
    record = {"config": config or recorded, "epochs": epochs, "summary": {"not_comparable_because": list(reasons)}}
    (run.run_dir / "metrics.json").write_text(json.dumps(record))


def printed_tables(text: str) -> dict[str, dict[str, dict[str, str]]]:
    """The printed tables as {backbone title: {row: {column: cell}}}."""
    found, title, header = {}, None, None
    for line in text.splitlines():
        if line.startswith("### "):
            title, header = line[4:], None
            found[title] = {}
        elif line.startswith("| ") and title is not None:
            cells = [c.strip() for c in line.strip("|").split("|")]
            if header is None:
                header = cells
            else:
                found[title][cells[0]] = dict(zip(header, cells))
    return found


def assert_refused(result, *phrases: str) -> None:
    """Exit code 2, one line on stderr starting with 'error:', containing each phrase, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])


def last5(values: list[float]) -> float:
    return statistics.fmean(values[-5:])


def mean_std(values: list[float], sign: str = "") -> str:
    return f"{statistics.fmean(values):{sign}.2f} ± {statistics.stdev(values):.2f}"


# --- the grid ----------------------------------------------------------------------------------------


def test_the_grid_is_the_scripts_own_runs_and_human_runs_on_cifar100_only(tmp_path):
    selection, result = grid(
        tmp_path, "cifar10,cifar100", "vgg16,resnet18", "single,human,maxl", "0,1", ["--epochs", "3", "--meta-grad",
        "finite-difference"],
    )  # fmt: skip
    runs = result.runs
    assert len(runs) == 2 * 2 * (2 + 1 + 2)  # seeds x backbones x (Single, MAXL on both; Human on cifar100)
    assert {place for place in result.not_run} == {("human", "cifar10", "vgg16"), ("human", "cifar10", "resnet18")}
    for run in runs:
        module, cfg = checked(run)
        assert run.run_dir == tmp_path / experiment.run_name(cfg, module.run_name_stem(cfg), module.paper_settings(cfg))
        assert (cfg.dataset, cfg.backbone, cfg.seed, cfg.epochs) == (run.dataset, run.backbone, run.seed, 3)
        assert run.job_log == tmp_path / "tables" / "jobs" / f"{run.name}.log"
        assert ("--meta-grad" in run.args) == (run.method == "maxl")  # only the scripts that have a flag get it
    first = [run.name.split("-seed")[0] for run in runs if run.seed == 0 and run.backbone == "vgg16"]
    assert first == ["single-pri10", "maxl-finite-difference-pri10-aux50", "single-pri20", "human-pri20-aux100",
                     "maxl-finite-difference-pri20-aux100"]  # fmt: skip
    cifar100_maxl = next(run for run in runs if (run.method, run.dataset) == ("maxl", "cifar100"))
    assert (cifar100_maxl.primary, cifar100_maxl.aux) == (20, 100)
    assert next(run for run in runs if run.backbone == "resnet18").name == "single-pri10-seed0-cifar10-resnet18"


def test_aux_weights_sweep_the_methods_that_have_one_and_compare_wamal_with_every_maxl(tmp_path):
    """--aux-weights 1,4: Human, MAXL and WAMAL at both weights (their own runs, named by the scripts), Single once;
    the rows and differences at each weight, WAMAL against MAXL at 4, and the rl-aux ablation's figure for MAXL."""
    selection, result = grid(tmp_path, "cifar100", methods="single,human,maxl,wamal", seeds="0,1", weights="1,4")
    names = [run.name for run in result.runs if run.seed == 0]
    assert names == [
        "single-pri20-seed0",
        "human-pri20-aux100-seed0",
        "human-pri20-aux100-auxw4-seed0",
        "maxl-second-order-pri20-aux100-seed0",
        "maxl-second-order-pri20-aux100-auxw4-seed0",
        "wamal-second-order-pri20-aux100-seed0",
        "wamal-second-order-pri20-aux100-auxw4-seed0",
    ]
    for run in result.runs:
        assert getattr(checked(run)[1], "aux_weight", 1.0) == run.aux_weight == (4.0 if "auxw4" in run.name else 1.0)
    level = {"single": 70.0, "human": 72.0, "maxl": 73.0, "wamal": 75.0}
    for run in result.runs:
        write_metrics(run, [level[run.method] + 3 * (run.aux_weight == 4) + run.seed] * 5)
    select = [
        "--datasets",
        "cifar100",
        "--methods",
        "single,human,maxl,wamal",
        "--seeds",
        "0,1",
        "--aux-weights",
        "1,4",
    ]
    report = run_main(tables, "report", *select, "--results-dir", tmp_path)
    assert report.returncode == 0, report.stderr
    (table,) = printed_tables(report.stdout).values()
    column = "CIFAR-100 (20 classes)"
    cells = {row: cells[column] for row, cells in table.items()}
    assert cells["MAXL (aux weight 4)"] == "76.50 ± 0.71 (n=2, 5 ep, 2 stopped); published 79.1 [4]"
    assert "[4] rl-aux notebook, a reproduction: its ablation of the auxiliary weight" in report.stdout
    assert cells["WAMAL (aux weight 4)"] == "78.50 ± 0.71 (n=2, 5 ep, 2 stopped)"  # WAMAL is published at 1 only
    assert cells["MAXL (aux weight 4) − Single"] == "+6.00 ± 0.00 (n=2)"
    assert cells["WAMAL (aux weight 4) − MAXL (aux weight 4)"] == "+2.00 ± 0.00 (n=2)"
    assert cells["WAMAL − MAXL"] == "+2.00 ± 0.00 (n=2)"
    assert cells["WAMAL − MAXL (aux weight 4)"] == "-1.00 ± 0.00 (n=2)"
    assert "Single (aux weight 4)" not in cells
    assert "auxiliary weights 1, 4" in (tmp_path / "tables" / "report.md").read_text()
    csv = (tmp_path / "tables" / "results.csv").read_text().splitlines()
    assert [row.split(",")[2] + "@" + row.split(",")[-1] for row in csv[1:]] == [
        "single@1.0", "human@1.0", "human@4.0", "maxl@1.0", "maxl@4.0", "wamal@1.0", "wamal@4.0"
    ]  # fmt: skip


@pytest.mark.parametrize(
    "weights, phrase", [("1,x", "is not a comma list of numbers"), ("1,-2", "finite number >= 0"), ("inf", ">= 0")]
)
def test_bad_aux_weights_are_refused(tmp_path, weights, phrase):
    assert_refused(
        run_main(tables, "plan", "--aux-weights", weights, "--results-dir", tmp_path), "--aux-weights", phrase
    )
    result = run_main(tables, "plan", "--results-dir", tmp_path, "--", "--aux-weight", "2")
    assert_refused(result, "tables sets --aux-weight itself (use --aux-weights)")


def test_plan_shows_each_runs_state_its_command_and_what_is_not_run(tmp_path):
    _, result = grid(tmp_path, "cifar10,cifar100", "vgg16", "single,human", flags=["--epochs", "3"])
    stopped, running, human = result.runs
    write_metrics(stopped, [40.0])
    (stopped.run_dir / "checkpoint.pt").write_bytes(b"")
    write_metrics(running, [40.0, 41.0])
    (running.run_dir / ".lock").write_text(f"{os.getpid()}\n")  # held by a live process: this one
    select = ["--datasets", "cifar10,cifar100", "--methods", "single,human", "--results-dir", tmp_path]
    plan = run_main(tables, "plan", *select, "--", "--epochs", "3")
    assert plan.returncode == 0, plan.stderr
    lines = plan.stdout.splitlines()
    assert lines[0] == f"{stopped.name}: stopped after epoch 1 of 3"
    assert lines[1] == (
        f"    python {os.path.relpath(REPO / 'model_vgg_single.py')} --dataset cifar10 --backbone vgg16 --seed 0 "
        f"--results-dir {tmp_path} --epochs 3 --resume"
    )
    assert lines[2] == f"{running.name}: running (pid {os.getpid()}), 2 of 3 epochs done"
    assert lines[4:6] == [
        f"{human.name}: not started",
        f"    python {os.path.relpath(human.script)} --dataset cifar100 --backbone vgg16 --seed 0 --results-dir "
        f"{tmp_path} --epochs 3",
    ]
    assert lines[-2] == "3 runs: 1 stopped, 1 running, 1 not started"
    assert lines[-1].startswith("not run: Human is not run on cifar10: it runs on cifar100 only (")


# --- the tables, on metrics files written here ----------------------------------------------------


def test_report_builds_the_tables_with_mean_std_differences_published_figures_and_missing_runs(tmp_path):
    flags = ["--epochs", "8"]
    selection, result = grid(tmp_path, "cifar10,cifar100", "vgg16,resnet18", "single,human,maxl", "0,1,2", flags)
    written = {}
    for run in result.runs:
        if (run.method, run.dataset, run.backbone, run.seed) == ("maxl", "cifar10", "vgg16", 2):
            continue  # never started: MAXL − Single pairs seeds 0 and 1 only
        if run.backbone == "resnet18" and run.dataset == "cifar100":
            continue  # a whole column missing
        epochs = 6 if (run.method, run.dataset, run.seed) == ("single", "cifar100", 1) else 8  # stopped at 6 of 8
        offset = {"single": 30.0, "human": 33.0, "maxl": 35.0}[run.method] + 1.7 * run.seed
        offset += 10 * (run.dataset == "cifar10") + 5 * (run.backbone == "resnet18")
        written[run] = [offset + 0.5 * e + (e % 3) * 0.3 for e in range(epochs)]
        write_metrics(run, written[run])
    going = next(run for run in result.runs if (run.method, run.dataset, run.backbone, run.seed) == ("maxl",
                 "cifar100", "vgg16", 0))  # fmt: skip
    (going.run_dir / ".lock").write_text(f"{os.getpid()}\n")

    select = ["--datasets", "cifar10,cifar100", "--backbones", "vgg16,resnet18", "--methods", "single,human,maxl"]
    report = run_main(tables, "report", *select, "--seeds", "0,1,2", "--results-dir", tmp_path, "--", *flags)
    assert report.returncode == 0, report.stderr
    found = printed_tables(report.stdout)
    assert list(found) == ["VGG-16", "ResNet-18"]
    vgg = found["VGG-16"]
    assert list(vgg) == ["Single", "Human", "MAXL", "Human − Single", "MAXL − Single", "MAXL − Human"]
    assert list(vgg["Single"]) == ["method", "CIFAR-10", "CIFAR-100 (20 classes)"]

    def finals(method, dataset, backbone):
        return {
            run.seed: last5(values)
            for run, values in written.items()
            if (run.method, run.dataset, run.backbone) == (method, dataset, backbone)
        }

    for backbone, title in (("vgg16", "VGG-16"), ("resnet18", "ResNet-18")):
        for method, row in (("single", "Single"), ("maxl", "MAXL")):
            values = list(finals(method, "cifar10", backbone).values())
            assert found[title][row]["CIFAR-10"].startswith(f"{mean_std(values)} (n={len(values)}, ")
        assert found[title]["Human"]["CIFAR-10"] == "n/a"
        assert found[title]["Human − Single"]["CIFAR-10"] == "n/a"
    single10 = f"{mean_std(list(finals('single', 'cifar10', 'vgg16').values()))} (n=3, 8 ep)"
    assert vgg["Single"]["CIFAR-10"] == single10 + "; published 86.0 [1]"  # the rl-aux notebook's, 80 epochs
    assert vgg["MAXL"]["CIFAR-10"].endswith("(n=2, 8 ep); published 89.9 [1]")
    assert vgg["Single"]["CIFAR-100 (20 classes)"].endswith("(n=3, 6–8 ep, 1 stopped); published 71.9 [2]")
    human, maxl = vgg["Human"]["CIFAR-100 (20 classes)"], vgg["MAXL"]["CIFAR-100 (20 classes)"]
    assert human.endswith("(n=3, 8 ep); published 75.7 [3], 74.6 [4], 75.5 [2]")
    assert maxl.endswith("(n=3, 8 ep, 1 running); published 76.6 [3], 77.4 [4], 76.0 [2], 76.3 [5]")
    mine, theirs = finals("maxl", "cifar10", "vgg16"), finals("single", "cifar10", "vgg16")
    diffs = [mine[seed] - theirs[seed] for seed in sorted(mine)]
    assert vgg["MAXL − Single"]["CIFAR-10"] == f"{mean_std(diffs, '+')} (n=2)"
    resnet = found["ResNet-18"]
    assert resnet["Single"]["CIFAR-100 (20 classes)"] == "—"  # not started: no numbers, nothing invented
    assert resnet["MAXL − Single"]["CIFAR-100 (20 classes)"] == "—"
    assert "[1] rl-aux notebook, a reproduction: one run, mean of its last 15 of 80 epochs" in report.stdout
    assert "[3] WAMAL authors' README" in report.stdout
    assert "n/a: Human is not run on cifar10: it runs on cifar100 only (" in report.stdout
    assert "Not comparable with the published figures: synthetic data" in report.stdout

    folder = tmp_path / "tables"
    assert printed_tables((folder / "report.md").read_text()) == found
    assert f"- `{going.name}`: running (pid {os.getpid()}), 8 of 8 epochs done" in (folder / "report.md").read_text()
    rows = (folder / "results.csv").read_text().splitlines()
    assert rows[0] == "backbone,dataset,method,n,mean,std,seeds,last5_means,epochs,published,aux_weight"
    single10 = next(row for row in rows if row.startswith("vgg16,cifar10,single,"))
    values = finals("single", "cifar10", "vgg16")
    assert single10.split(",")[3:7] == [
        "3",
        f"{statistics.fmean(values.values()):.4f}",
        f"{statistics.stdev(values.values()):.4f}",
        "0 1 2",
    ]
    assert not any(row.startswith("vgg16,cifar10,human,") for row in rows)

    # The same report without the flags finds each run by the settings its metrics.json records.
    plain = run_main(tables, "report", *select, "--seeds", "0,1,2", "--results-dir", tmp_path, "--out", tmp_path / "o")
    assert plain.returncode == 0, plain.stderr
    assert printed_tables(plain.stdout) == found
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["report.md", "results.csv"]


def test_runs_of_figure3_and_of_the_tables_are_kept_apart_and_old_runs_are_cifar100_vgg16(tmp_path):
    """A results folder holding figure3's CIFAR-100 runs (one recorded before --dataset existed) and the tables'
    CIFAR-10 ones: each report takes its own, though Single at primary 10 is a run of both kinds."""
    (cifar10_single,) = grid(tmp_path, methods="single")[1].runs
    _, figure3_runs = figure3_grid(tmp_path)
    figure3_single = next(run for run in figure3_runs if run.method == "single")
    write_metrics(cifar10_single, [70.0])
    _, cfg = checked(figure3_single)
    old = {k: v for k, v in experiment.settings(cfg).items() if k not in runner.RECORDED_DEFAULTS}
    write_metrics(figure3_single, [20.0], config={**old, "method": "single", "aux_classes": 0})
    table = run_main(tables, "report", "--methods", "single", "--results-dir", tmp_path)
    assert table.returncode == 0, table.stderr
    assert (
        printed_tables(table.stdout)["VGG-16"]["Single"]["CIFAR-10"]
        == "70.00 (n=1, 1 ep, 1 stopped); published 86.0 [1]"
    )
    picture = run_main(figure3, "report", "--methods", "single", "--pairs", "10-20", "--results-dir", tmp_path,
                       "--no-figure")  # fmt: skip
    assert picture.returncode == 0, picture.stderr
    assert "| 10 → 20 | 20.00 (n=1, 1 ep, 1 stopped) | plot only [*] |" in picture.stdout
    assert "folders hold" not in table.stdout + picture.stdout


def test_figure3_leaves_other_datasets_to_the_tables(tmp_path):
    result = run_main(figure3, "plan", "--results-dir", tmp_path / "results", "--", "--dataset", "cifar10")
    assert_refused(result, "figure3 sets --dataset itself (Figure 3 is CIFAR-100's hierarchy; tables.py runs")


def test_time_left_is_estimated_per_method_dataset_and_backbone(tmp_path):
    _, result = grid(tmp_path, "cifar10,svhn", "vgg16", "single", flags=["--epochs", "10"])
    cifar10_run, svhn_run = result.runs
    write_metrics(cifar10_run, [50.0] * 5)  # 1 s an epoch
    states = {run: runner.read_state(run) for run in result.runs}
    per_epoch = runner.seconds_per_epoch(states)
    assert per_epoch == {"single on cifar10 with vgg16": 1.0}
    left = [(cifar10_run, 5), (svhn_run, 0)]
    assert runner.time_left(left, per_epoch, 1) == "at least 5 s left (no single on svhn with vgg16 epoch timed yet)"


def figure3_grid(results: Path):
    selection = figure3.Selection(("single",), ((10, 20),), (0,), results, ())
    return selection, figure3.build_grid(selection)


# --- a real run ----------------------------------------------------------------------------------


def test_run_on_synthetic_cifar10_resumes_what_stopped_and_then_has_nothing_to_do(cifar10, tmp_path):
    flags = [*TINY, "--data-root", str(cifar10), "--epochs", "2"]
    select = ["--methods", "single", "--results-dir", tmp_path]
    _, result = grid(tmp_path, methods="single", flags=flags)
    (run,) = result.runs
    first = run_main(single, *run.args, "--epochs", "1")  # in this process: no interpreter start
    assert first.returncode == 0, first.stderr
    resumed = run_main(tables, "run", *select, "--", *flags)  # its child resumes at epoch 2
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"start {run.name} (1 of 1): {run.job_log}" in resumed.stdout
    assert f"done  {run.name}" in resumed.stdout
    assert f"resuming {run.run_dir} at epoch 2" in run.job_log.read_text()
    epochs = json.loads((run.run_dir / "metrics.json").read_text())["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    mean = statistics.fmean(100 * e["test_primary_acc"] for e in epochs)
    assert (
        printed_tables(resumed.stdout)["VGG-16"]["Single"]["CIFAR-10"] == f"{mean:.2f} (n=1, 2 ep); published 86.0 [1]"
    )

    before = ((run.run_dir / "metrics.json").stat().st_mtime_ns, run.job_log.read_text())
    again = run_main(tables, "run", *select, "--", *flags)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.startswith(f"skip  {run.name}: finished (2 epochs)\nnothing to do")
    assert before == ((run.run_dir / "metrics.json").stat().st_mtime_ns, run.job_log.read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([run.name, "tables"])
    report = run_main(tables, "report", *select)  # without the flags: found by its recorded settings
    assert report.returncode == 0, report.stderr
    assert printed_tables(report.stdout) == printed_tables(again.stdout)


def test_submit_makes_the_array_in_the_tables_folder(tmp_path, monkeypatch):
    """submit is the runner's: the runs still to do as one job array, logged in <results-dir>/tables/."""
    made = {}

    class Executor:
        def __init__(self, folder, cluster, **kwargs):
            made.update(folder=folder, cluster=cluster)

        def update_parameters(self, **parameters):
            made.update(parameters)

        @contextlib.contextmanager
        def batch(self):
            yield

        def submit(self, job):
            made.setdefault("jobs", []).append(job)
            return SimpleNamespace(job_id=str(len(made["jobs"])))

    monkeypatch.setitem(sys.modules, "submitit", SimpleNamespace(AutoExecutor=Executor))
    monkeypatch.setattr(runner.shutil, "which", lambda name: f"/usr/bin/{name}")
    _, result = grid(tmp_path, methods="single,maxl", flags=["--epochs", "2"])
    write_metrics(result.runs[0], [50.0, 51.0])  # finished: not submitted
    args = ["submit", "--methods", "single,maxl", "--time", "1:00:00", "--results-dir", tmp_path, "--", "--epochs", "2"]
    submitted = run_main(tables, *args)
    assert submitted.returncode == 0, submitted.stderr
    maxl_run = result.runs[1]
    assert submitted.stdout.splitlines()[1:] == [
        f"job 1: {maxl_run.name} (log {maxl_run.job_log})",
        f"submitted 1 run; submitit's logs are in {tmp_path / 'tables' / 'submitit'}",
    ]
    assert (made["folder"], made["name"], made["timeout_min"]) == (tmp_path / "tables" / "submitit", "tables", 60)
    (job,) = made["jobs"]
    assert (job.job_log, job.args) == (str(maxl_run.job_log), maxl_run.args)


# --- refused input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, phrases",
    [
        (["plan", "--datasets", "cifar10,imagenet"], ["--datasets: unknown dataset 'imagenet'; choose from cifar100"]),
        (["plan", "--backbones", "vgg19"], ["--backbones: unknown backbone 'vgg19'"]),
        (["plan", "--methods", "single,maml"], ["--methods: unknown method 'maml'"]),
        (["plan", "--seeds", "0,one"], ["--seeds '0,one' is not a comma list of integers"]),
        (
            ["plan", "--methods", "human", "--datasets", "cifar10,svhn"],
            ["--methods human: Human runs on cifar100 only (", "add cifar100 to --datasets"],
        ),
        (["plan", "--", "--dataset", "svhn"], ["tables sets --dataset itself (use --datasets)"]),
        (["plan", "--", "--backbone=resnet18"], ["tables sets --backbone itself (use --backbones)"]),
        (["plan", "--", "--seed", "1"], ["tables sets --seed itself (use --seeds)"]),
        (["plan", "--", "--run-name", "x"], ["tables sets --run-name itself"]),
        (["plan", "--", "--primary-level", "3"], ["tables sets --primary-level itself (the primary task is the"]),
        (["plan", "--", "--results-dir", "x"], ["tables sets --results-dir itself"]),
        (["plan", "--methods", "single", "--", "--meta-grad", "x"], ["'--meta-grad' is not a flag"]),
        (
            ["plan", "--", "--epochs", "0"],
            ["model_vgg_single.py (cifar10, vgg16, seed 0) refused its flags", "--epochs must be"],
        ),
        (["plan", "--backbones", "vgg16", "--", "--pretrained"], ["(cifar10, vgg16, seed 0) refused its flags"]),
        (["run", "--runs-per-gpu", "2"], ["--runs-per-gpu packs runs on the GPUs of --gpus"]),
        (["run", "--gpus", "0", "--", "--device", "cpu"], ["tables run --gpus sets each run's --device itself"]),
        (["submit", "--time", "soon", "--cluster", "local"], ["--time 'soon' is not a SLURM time"]),
        (["report"], ["report: none of the grid's 3 runs has a finished epoch", "run `python tables.py run` first"]),
        (["plan", "--dataset", "cifar10"], ["unrecognized arguments: --dataset cifar10"]),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, phrases):
    results = tmp_path / "results"
    assert_refused(run_main(tables, *args[:1], "--results-dir", results, *args[1:]), *phrases)
    assert not results.exists()


def test_the_report_folder_is_reserved_from_run_names():
    assert tables.TABLES_FOLDER in experiment.RESERVED_RUN_NAMES, "experiment.RESERVED_RUN_NAMES needs 'tables'"
