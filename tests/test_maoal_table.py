"""tables.py maoal: every mode of model_vgg_maoal.py on the MAOAL authors' multi-domain task (--task domains), and
Auto-Lambda on it (model_vgg_autol.py --task maoal-domains), over seeds, on the runner (runner.py): the plan and its
exact commands, refused input, the table on hand-written metrics (both measures as mean ± std, differences to SLL
paired by seed, missing and partial runs, hierarchy runs and Auto-Lambda's own task never taken), and one tiny real
run that a second `run` leaves alone."""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
from pathlib import Path

import pytest
from conftest import REPO, run_main

import experiment
import model_vgg_autol as autol
import model_vgg_maoal as maoal
import runner
import tables

# The cheapest real run: one batch of 4 images, VGG-16, one auxiliary domain, on the CPU.
TINY = ["--epochs", "1", "--limit-batches", "1", "--batch-size", "4", "--backbone", "vgg16", "--aux-domains", "0"]
TINY += ["--device", "cpu", "--workers", "0", "--no-download"]


ALL_MODES = ",".join(tables.MAOAL_MODES)
ROWS = tuple(tables.MAOAL_MODES)
SCRIPTS = {"maoal": maoal, "autol": autol}


def grid(results: Path, modes=ALL_MODES, seeds="0", flags=()) -> list[tables.DomainRun]:
    selection = tables.MaoalSelection(
        modes=tables.parse_names(modes, tuple(tables.MAOAL_MODES), "--modes", "mode"),
        seeds=runner.parse_seeds(seeds),
        results_dir=results,
        script_flags=tuple(flags),
    )
    return tables.maoal_grid(selection)


def write_metrics(run: runner.Run, accuracies: list[float], **changed) -> None:
    """A metrics.json as the script writes it: the settings it records (`changed` edited), accuracies (%) as
    fractions."""
    cfg = runner.checked_config(run.method, list(run.args), run.name)
    cfg = dataclasses.replace(cfg, **changed)
    recorded = {**experiment.settings(cfg), **SCRIPTS[run.method].derived_settings(cfg), "method": run.method}
    run.run_dir.mkdir(parents=True, exist_ok=True)
    epochs = [{"epoch": i + 1, "test_primary_acc": a / 100, "seconds": 1.0} for i, a in enumerate(accuracies)]
    summary = {"not_comparable_because": ["synthetic data"]}
    (run.run_dir / "metrics.json").write_text(json.dumps({"config": recorded, "epochs": epochs, "summary": summary}))


def printed_table(text: str) -> dict[str, dict[str, str]]:
    """The printed table as {row: {column: cell}}."""
    found, header = {}, None
    for line in text.splitlines():
        if line.startswith("| "):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if header is None:
                header = cells
            else:
                found[cells[0]] = dict(zip(header, cells))
    return found


def assert_refused(result, *phrases: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])


def mean_std(values, sign=""):
    values = list(values)
    return f"{statistics.fmean(values):{sign}.2f} ± {statistics.stdev(values):.2f}"


def test_the_rows_are_the_scripts_modes_and_auto_lambda():
    assert tuple(mode for mode in ROWS if mode not in tables.OTHER_SCRIPTS) == maoal.MODES
    assert tables.OTHER_SCRIPTS["autol"][0] == "autol" and "autol" in autol.WEIGHTINGS


def test_plan_lists_every_mode_and_seed_with_its_exact_command(tmp_path):
    plan = run_main(tables, "maoal", "plan", "--seeds", "0,1", "--results-dir", tmp_path, "--", "--epochs", "3")
    assert plan.returncode == 0, plan.stderr
    lines = plan.stdout.splitlines()
    runs = grid(tmp_path, seeds="0,1", flags=["--epochs", "3"])
    assert [run.mode for run in runs] == [*ROWS, *ROWS] and [r.seed for r in runs] == [0] * 7 + [1] * 7
    first = runs[0]
    cfg = runner.checked_config("maoal", list(first.args), first.name)
    assert (cfg.task, cfg.mode, cfg.seed, cfg.epochs, cfg.target_domain, cfg.aux_domains) == (
        "domains", "maoal", 0, 3, 14, "0-9")  # fmt: skip
    assert first.run_dir == tmp_path / experiment.run_name(cfg, maoal.run_name_stem(cfg), maoal.paper_settings(cfg))
    assert first.name.startswith("maoal-maoal-domain14-aux0-9-seed0")
    assert first.job_log == tmp_path / "tables" / "jobs" / f"{first.name}.log"
    assert lines[:2] == [
        f"{first.name}: not started",
        f"    python {os.path.relpath(REPO / 'model_vgg_maoal.py')} --task domains --mode maoal --seed 0 "
        f"--results-dir {tmp_path} --epochs 3",
    ]
    assert lines[-3].startswith("maoal-single-domain14-aux0-9-seed1") and lines[-2].endswith("--seed 1 "
           f"--results-dir {tmp_path} --epochs 3")  # fmt: skip
    assert lines[-1] == "14 runs: 14 not started"
    autol_run = next(run for run in runs if run.mode == "autol")
    cfg = runner.checked_config("autol", list(autol_run.args), autol_run.name)
    assert (cfg.task, cfg.weighting, cfg.primary_domain, cfg.aux_domains, cfg.dev_fraction, cfg.backbone) == (
        "maoal-domains", "autol", 14, "0-9", 0.05, "resnet18")  # fmt: skip
    assert (
        f"python {os.path.relpath(REPO / 'model_vgg_autol.py')} --task maoal-domains --weighting autol --seed 0 "
        in (plan.stdout)
    )
    assert not tmp_path.joinpath("tables").exists()


@pytest.mark.parametrize(
    "args, phrases",
    [
        (["plan", "--", "--task", "hierarchy"], ["tables maoal sets --task itself"]),
        (["plan", "--", "--mode", "gcs"], ["tables maoal sets --mode itself (use --modes)"]),
        (["plan", "--", "--seed=1"], ["tables maoal sets --seed itself (use --seeds)"]),
        (["plan", "--", "--results-dir", "x"], ["tables maoal sets --results-dir itself"]),
        (["plan", "--", "--run-name", "x"], ["tables maoal sets --run-name itself"]),
        (["plan", "--", "--resume"], ["tables maoal sets --resume itself"]),
        (["plan", "--", "--overwrite"], ["tables maoal sets --overwrite itself"]),
        (["plan", "--", "--smoke"], ["tables maoal sets --smoke itself"]),
        (["plan", "--", "--primary-level", "3"], ["tables maoal sets --primary-level itself (the domains task's"]),
        (["plan", "--modes", "maoal,maxl"], ["--modes: unknown mode 'maxl'; choose from maoal, equal, gcs"]),
        (["plan", "--seeds", "a"], ["--seeds 'a' is not a comma list of integers"]),
        (["plan", "--", "--psi", "5"], ["'--psi' is not a flag"]),
        (["plan", "--", "--weighting", "dwa"], ["tables maoal sets --weighting itself (use --modes)"]),
        (["plan", "--", "--primary-domain", "3"], ["tables maoal sets --primary-domain itself (use --target-domain"]),
        (["plan", "--", "--epochs", "0"], ["model_vgg_maoal.py (--task domains --mode maoal, seed 0) refused"]),
        (["run", "--gpus", "0", "--", "--device", "cpu"], ["tables maoal run --gpus sets each run's --device"]),
        (["report"], ["report: none of the grid's 7 runs has a finished epoch", "`python tables.py maoal run`"]),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, phrases):
    results = tmp_path / "results"
    assert_refused(run_main(tables, "maoal", *args[:1], "--results-dir", results, *args[1:]), *phrases)
    assert not results.exists()


def test_report_builds_the_table_with_both_measures_differences_and_missing_runs(tmp_path):
    flags = ["--epochs", "8"]
    runs = grid(tmp_path, seeds="0,1,2", flags=flags)
    written = {}
    for run in runs:
        if run.mode == "aux" or (run.mode, run.seed) == ("gcs", 2):
            continue  # AuxiLearn never started; GCS misses seed 2
        epochs = 6 if (run.mode, run.seed) == ("single", 1) else 8  # stopped at 6 of 8
        offset = {"maoal": 60.0, "equal": 57.0, "gcs": 58.0, "gcs-block": 56.0, "autol": 59.0, "single": 55.0}[run.mode]
        written[run] = [offset + 1.3 * run.seed + 0.5 * e + (e % 3) * 1.1 for e in range(epochs)]
        write_metrics(run, written[run])
    going = next(run for run in runs if (run.mode, run.seed) == ("equal", 0))
    (going.run_dir / ".lock").write_text(f"{os.getpid()}\n")
    # A hierarchy run of MAOAL (figure3's) in the same folder, at seed 0: never one of the table's.
    hierarchy = tmp_path / "maoal-maoal-pri20-aux100-seed0"
    hierarchy_cfg = maoal.check_config(maoal.Config(seed=0, epochs=8))
    record = {"config": {**dataclasses.asdict(hierarchy_cfg), "method": "maoal"}, "epochs": [{"test_primary_acc": 0.9}]}
    hierarchy.mkdir()
    (hierarchy / "metrics.json").write_text(json.dumps(record))

    def values(mode, measure):
        return {run.seed: tables.MEASURES[measure](acc) for run, acc in written.items() if run.mode == mode}

    report = run_main(tables, "maoal", "report", "--seeds", "0,1,2", "--results-dir", tmp_path)  # found as recorded
    assert report.returncode == 0, report.stderr
    assert "### CIFAR-100/20, target domain 14 (its 5 classes), auxiliary domains 0-9, ResNet-18" in report.stdout
    table = printed_table(report.stdout)
    assert list(table) == ["MAOAL", "Equal", "GCS", "GCS (per block)", "AuxiLearn", "Auto-Lambda", "SLL (single)"]
    last5, best = "last 5 epochs", "best epoch, chosen on the test set [†]"
    assert list(table["MAOAL"]) == ["mode", last5, "− SLL (last5)", best, "− SLL (best)"]
    for measure, column in (("last5", last5), ("best", best)):
        assert table["MAOAL"][column] == f"{mean_std(values('maoal', measure).values())} (n=3, 8 ep)"
        mine, theirs = values("maoal", measure), values("single", measure)
        diffs = [mine[seed] - theirs[seed] for seed in (0, 1, 2)]
        assert table["MAOAL"][f"− SLL ({measure})"] == f"{mean_std(diffs, '+')} (n=3)"
        gcs = values("gcs", measure)
        assert table["GCS"][f"− SLL ({measure})"] == f"{mean_std([gcs[s] - theirs[s] for s in (0, 1)], '+')} (n=2)"
        assert table["GCS"][column].endswith("(n=2, 8 ep)")
        assert table["Equal"][column].endswith("(n=3, 8 ep, 1 running)")
        assert table["SLL (single)"][column].endswith("(n=3, 6–8 ep, 1 stopped)")
        assert table["AuxiLearn"][column] == "—" and table["AuxiLearn"][f"− SLL ({measure})"] == "—"
        assert table["SLL (single)"][f"− SLL ({measure})"] == "(baseline)"
        assert table["Auto-Lambda"][column] == f"{mean_std(values('autol', measure).values())} (n=3, 8 ep)"
    assert table["MAOAL"][best] != table["MAOAL"][last5]
    assert "chosen on the test set, as the MAOAL authors report" in report.stdout
    assert f"Published: none for this configuration: {maoal.unpublished_because(hierarchy_cfg)}" not in report.stdout
    domains_cfg = runner.checked_config("maoal", list(runs[0].args), runs[0].name)
    assert f"Published: none for this configuration: {maoal.unpublished_because(domains_cfg)}." in report.stdout
    assert "Not comparable with the published figures: synthetic data" in report.stdout
    assert "90.00" not in report.stdout and "folders hold" not in report.stdout  # the hierarchy run is not taken

    folder = tmp_path / "tables"
    assert sorted(p.name for p in folder.iterdir()) == ["maoal.csv", "maoal.md"]  # not report.md, results.csv
    assert printed_table((folder / "maoal.md").read_text()) == table
    assert f"- `{going.name}`: running (pid {os.getpid()}), 8 of 8 epochs done" in (folder / "maoal.md").read_text()
    rows = [row.split(",") for row in (folder / "maoal.csv").read_text().splitlines()]
    assert rows[0][:8] == ["mode", "label", "n", "seeds", "epochs", "last5_mean", "last5_std", "last5_values"]
    maoal_row = dict(zip(rows[0], rows[1]))
    assert (maoal_row["mode"], maoal_row["n"], maoal_row["seeds"]) == ("maoal", "3", "0 1 2")
    assert maoal_row["best_mean"] == f"{statistics.fmean(values('maoal', 'best').values()):.4f}"
    assert maoal_row["last5_minus_single_seeds"] == "0 1 2"
    assert dict(zip(rows[0], rows[5]))["n"] == "0"  # aux: no runs

    # With the flags after --, by the folder names they give: the same table.
    named = run_main(tables, "maoal", "report", "--seeds", "0,1,2", "--results-dir", tmp_path, "--out",
                     tmp_path / "o", "--", *flags)  # fmt: skip
    assert named.returncode == 0, named.stderr
    assert printed_table(named.stdout) == table
    # figure3 and the datasets x backbones tables never take a domains run for a hierarchy one.
    domains_config = json.loads(runs[0].run_dir.joinpath("metrics.json").read_text())["config"]
    assert runner.recorded_slot(domains_config) is None and tables.domain_slot(domains_config) == runs[0].slot
    assert tables.domain_slot(record["config"]) is None
    autol_run = next(run for run in runs if run.mode == "autol")
    autol_config = json.loads(autol_run.run_dir.joinpath("metrics.json").read_text())["config"]
    assert runner.recorded_slot(autol_config) is None and tables.domain_slot(autol_config) == autol_run.slot
    # Auto-Lambda on its own authors' task is not a run of MAOAL's table, even at domain 14 with domains 0-9.
    assert tables.domain_slot({**autol_config, "task": "all-domains"}) is None


def test_a_tiny_real_run_then_a_second_run_does_nothing(data_root, tmp_path):
    flags = [*TINY, "--data-root", str(data_root)]
    select = ["--modes", "single", "--results-dir", tmp_path]
    first = run_main(tables, "maoal", "run", *select, "--", *flags)
    assert first.returncode == 0, first.stdout + first.stderr
    (run,) = grid(tmp_path, "single", flags=flags)
    assert f"start {run.name} (1 of 1): {run.job_log}" in first.stdout
    assert f"done  {run.name}" in first.stdout
    summary = json.loads((run.run_dir / "metrics.json").read_text())["summary"]
    shown = printed_table(first.stdout)["SLL (single)"]
    assert shown["last 5 epochs"] == f"{summary['last5_mean_test_primary_acc']:.2f} (n=1, 1 ep)"
    assert shown["best epoch, chosen on the test set [†]"] == (
        f"{summary['best_test_primary_acc_chosen_on_test_set']:.2f} (n=1, 1 ep)"
    )

    before = ((run.run_dir / "metrics.json").stat().st_mtime_ns, run.job_log.read_text())
    again = run_main(tables, "maoal", "run", *select, "--", *flags)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.startswith(f"skip  {run.name}: finished (1 epoch)\nnothing to do")
    assert before == ((run.run_dir / "metrics.json").stat().st_mtime_ns, run.job_log.read_text())
    report = run_main(tables, "maoal", "report", *select, "--", *flags)
    assert report.returncode == 0, report.stderr
    assert printed_table(report.stdout) == printed_table(again.stdout)
    # Without the flags, the table is the authors' auxiliary domains 0-9: a run of domain 0 alone is not one of its.
    assert_refused(run_main(tables, "maoal", "report", *select), "the grid's one run has no finished epoch")
