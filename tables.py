"""Results tables: every method on every dataset and backbone, run, resumed and reported as a paper's table.

The grid: each method on each dataset with each backbone, for each seed; every run is the model script's own
default run for that dataset, backbone and seed (plus the flags after `--`), in its own folder
<results-dir>/<run-name>/, the name the script itself chooses. The table: rows the methods (then their
differences, paired by seed), columns the datasets, one table per backbone; a cell is the mean ± std over seeds of
each run's mean test accuracy of the primary task over its last 5 epochs, with the figure published for that
configuration beside it where there is one.

    python tables.py plan                                   # cifar10, vgg16: single, maxl, wamal, seed 0
    python tables.py run --datasets cifar10,svhn --backbones vgg16,resnet18 --seeds 0,1,2 --gpus 0,1
    python tables.py run --gpus 0,1,2,3 --runs-per-gpu 2 -- --epochs 50
    python tables.py submit --partition gpu --time 12:00:00      # the same grid on SLURM (submitit)
    python tables.py report                                 # the tables, results/tables/report.md and results.csv
    python tables.py report --out /tmp/tables               # the same, written elsewhere (read-only results)
    python tables.py maoal run --seeds 0,1,2 --gpus 0,1     # the MAOAL table: every mode on --task domains
    python tables.py maoal report                           # results/tables/maoal.md and maoal.csv

Human and MAOAL learn from CIFAR-100's finer labels: on the other datasets their cells are n/a (not run), and a
selection where one of them could run nowhere is refused. Everything else is figure3.py's runner, shared: the
job pool (--gpus, --runs-per-gpu), job logs (<results-dir>/tables/jobs/<run-name>.log), runs another process holds
skipped as running elsewhere, Ctrl-C keeping every checkpoint, submit through submitit, and `report` without flags
after -- finding each run by the settings its metrics.json records.

`tables.py maoal {plan,run,submit,report}` is the MAOAL table on the same runner: every --modes of
model_vgg_maoal.py on the MAOAL authors' CIFAR-100/20 multi-domain task (--task domains), for each seed; rows the
modes, columns the last-5-epoch mean and the best epoch's test accuracy (chosen on the test set, as the authors
report), each with its difference to SLL (--mode single) paired by seed.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import experiment
import figure3
import model_vgg_maoal
from experiment import OneLineParser, UsageError
from figure3 import METHODS, SCRIPTS, Run, RunState

TABLES_FOLDER = "tables"  # inside --results-dir: report.md, results.csv, jobs/, submitit/
DATASETS, BACKBONES, DATASET_TITLES = experiment.DATASETS, experiment.BACKBONES, experiment.DATASET_NAMES
BACKBONE_TITLES = {"vgg16": "VGG-16", "resnet18": "ResNet-18", "resnet50": "ResNet-50", "vit_b_16": "ViT-B/16"}
DEFAULTS = {"datasets": "cifar10", "backbones": "vgg16", "methods": "single,maxl,wamal", "seeds": "0"}
# The differences shown below the methods, paired by seed, where both are selected: each against Single, and the
# comparisons the successors' papers make.
COMPARISONS = (
    ("human", "single"),
    ("maxl", "single"),
    ("wamal", "single"),
    ("maoal", "single"),
    ("maxl", "human"),
    ("wamal", "maxl"),
)
LEVELS_ARE_FIGURE3S = "the primary task is the dataset's classes (CIFAR-100's 20 superclasses); figure3.py runs the "
LEVELS_ARE_FIGURE3S += "other levels of CIFAR-100's hierarchy"
# Script flags tables.py sets itself, and what to use instead.
TABLES_SETS = {
    "dataset": "use --datasets",
    "backbone": "use --backbones",
    "primary_level": LEVELS_ARE_FIGURE3S,
    "aux_level": LEVELS_ARE_FIGURE3S,
    "seed": "use --seeds",
    "results_dir": "use tables' --results-dir, before --",
    "run_name": "tables finds every run by its default name",
    "resume": "tables resumes what stopped and never redoes a finished run",
    "overwrite": "tables never redoes a finished run; remove its folder to start it over",
    "smoke": "the grid's runs are real runs",
    "help": "see python model_vgg_<method>.py --help",
}
SCRIPT_FLAGS_HELP = "Flags after -- go to every run whose model script has them, e.g. -- --epochs 50 --image-size 64."
MAOAL_TABLE_HELP = "The MAOAL table (every mode on --task domains): python tables.py maoal {plan,run,submit,report}."


# ---------------------------------------------------------------------------------------------
# The grid: which runs, with which flags, in which folders (each script's METHOD decides, as in the script)


@dataclass(frozen=True)
class Selection:
    datasets: tuple[str, ...]  # the columns, in the order given
    backbones: tuple[str, ...]  # one table each, in the order given
    methods: tuple[str, ...]  # the rows, in figure3.METHODS' order
    seeds: tuple[int, ...]
    results_dir: Path
    script_flags: tuple[str, ...]  # everything after `--`


@dataclass(frozen=True)
class Grid:
    runs: tuple[Run, ...]
    not_run: dict[tuple[str, str, str], str]  # (method, dataset, backbone) -> why that cell has no runs


def parse_names(text: str, known: Sequence[str], option: str, noun: str) -> tuple[str, ...]:
    """A comma list of known names, each once, in the order given."""
    names = [name.strip() for name in text.split(",")]
    for name in names:
        if name not in known:
            raise UsageError(f"{option}: unknown {noun} {name!r}; choose from {', '.join(known)}")
    return tuple(dict.fromkeys(names))


def not_run_because(method: str, dataset: str, backbone: str) -> str | None:
    """Why the method does not run on this dataset with this backbone (None: it does), as its script says: a
    phrase after the method's name ("runs on cifar100 only (...)")."""
    module = SCRIPTS[method]
    if dataset != "cifar100" and module.METHOD.cifar100_only:
        return f"runs on cifar100 only ({module.METHOD.cifar100_only})"
    try:  # the backbone in the script's default task, checked as a run checks it
        experiment.check_method(module.METHOD, module.Config(backbone=backbone))
    except UsageError as error:
        return f"refuses --backbone {backbone} ({str(error).removeprefix(f'--backbone {backbone}: ')})"
    return None


def build_grid(selection: Selection) -> Grid:
    """Every run of the selected grid, seed by seed, backbone by backbone, dataset by dataset; the cells a method
    cannot run in are named with the reason, and a method that could run in none of them is refused."""
    not_run = {
        (method, dataset, backbone): reason
        for method in selection.methods
        for dataset in selection.datasets
        for backbone in selection.backbones
        if (reason := not_run_because(method, dataset, backbone)) is not None
    }
    for method in selection.methods:
        places = [(method, dataset, backbone) for dataset in selection.datasets for backbone in selection.backbones]
        if all(place in not_run for place in places):
            reasons = " and ".join(sorted({not_run[place] for place in places}))
            hint = "add cifar100 to --datasets" if "cifar100 only" in reasons else "choose other --backbones"
            label = METHODS[method].label
            raise UsageError(f"--methods {method}: {label} {reasons}; {hint}, or drop {method} from --methods")
    spellings = {method: figure3.flag_spellings(SCRIPTS[method]) for method in selection.methods}
    known = {flag: spec for method in selection.methods for flag, spec in spellings[method].items()}
    groups = figure3.split_script_flags(selection.script_flags, known, TABLES_SETS, who="tables")
    runs = []
    for seed in selection.seeds:
        for backbone in selection.backbones:
            for dataset in selection.datasets:
                for method in selection.methods:
                    if (method, dataset, backbone) in not_run:
                        continue
                    own_flags = [
                        token for group in groups if group[0].split("=", 1)[0] in spellings[method] for token in group
                    ]
                    args = ["--dataset", dataset, "--backbone", backbone, "--seed", str(seed)]
                    args += ["--results-dir", str(selection.results_dir), *own_flags]
                    module, script = SCRIPTS[method], figure3.script_path(method)
                    cfg = figure3.checked_config(module, args, f"{script.name} ({dataset}, {backbone}, seed {seed})")
                    runs.append(
                        Run(
                            method=method,
                            primary=cfg.primary_level,
                            aux=getattr(cfg, "aux_level", None) if METHODS[method].takes_aux else None,
                            seed=seed,
                            script=script,
                            args=tuple(args),
                            epochs=cfg.epochs,
                            run_dir=selection.results_dir / experiment.default_run_name(module.METHOD, cfg),
                            published=tuple(module.METHOD.published_accuracy(cfg).items()),
                            dataset=dataset,
                            backbone=backbone,
                            folder=TABLES_FOLDER,
                        )
                    )
    return Grid(tuple(runs), not_run)


def not_run_lines(selection: Selection, grid: Grid) -> list[str]:
    """One line per method and reason: the places it leaves without runs (a dataset alone: with every backbone)."""
    by_reason: dict[tuple[str, str], dict[str, list[str]]] = {}
    for (method, dataset, backbone), reason in grid.not_run.items():
        by_reason.setdefault((method, reason), {}).setdefault(dataset, []).append(backbone)
    lines = []
    for (method, reason), datasets in by_reason.items():
        places = [
            dataset if len(backbones) == len(selection.backbones) else f"{dataset} with {', '.join(backbones)}"
            for dataset, backbones in datasets.items()
        ]
        separator = "; " if any("," in place for place in places) else ", "
        lines.append(f"{METHODS[method].label} is not run on {separator.join(places)}: it {reason}")
    return lines


# ---------------------------------------------------------------------------------------------
# The tables


def runs_at(runs: Sequence[Run], method: str, dataset: str, backbone: str) -> list[Run]:
    return [run for run in runs if (run.method, run.dataset, run.backbone) == (method, dataset, backbone)]


def comparisons(selection: Selection) -> list[tuple[str, str]]:
    return [(m, o) for m, o in COMPARISONS if m in selection.methods and o in selection.methods]


def column_title(dataset: str, runs: Sequence[Run]) -> str:
    title = DATASET_TITLES.get(dataset, dataset)
    primaries = sorted({run.primary for run in runs if run.dataset == dataset})
    if dataset == "cifar100" and len(primaries) == 1:
        return f"{title} ({primaries[0]} classes)"  # the paper's primary task: the 20 superclasses
    return title


def published_text(at: Sequence[Run], sources: list[str]) -> str:
    """The figures published for this cell's configuration ([n] = the n-th source), or ""."""
    numbers = []
    for source, value in at[0].published if at else ():
        if source not in sources:
            sources.append(source)
        numbers.append(f"{value:.1f} [{sources.index(source) + 1}]")
    return ", ".join(numbers)


def cell_text(grid: Grid, runs, states, method: str, dataset: str, backbone: str, sources: list[str]) -> str:
    if (method, dataset, backbone) in grid.not_run:
        return "n/a"
    at = runs_at(runs, method, dataset, backbone)
    published = published_text(at, sources)
    return figure3.cell_of(at, states).text() + (f"; published {published}" if published else "")


def difference_text(grid: Grid, runs, states, method: str, other: str, dataset: str, backbone: str) -> str:
    if (method, dataset, backbone) in grid.not_run or (other, dataset, backbone) in grid.not_run:
        return "n/a"
    diffs = figure3.differences_by_seed(
        runs_at(runs, method, dataset, backbone), runs_at(runs, other, dataset, backbone), states
    )
    return f"{figure3.mean_std(diffs, signed=True)} (n={len(diffs)})" if diffs else "—"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def report_tables(
    selection: Selection, grid: Grid, runs: Sequence[Run], states: dict[Run, RunState], notes: Sequence[str] = ()
) -> str:
    """One markdown table per backbone (rows: methods, then differences; columns: datasets), then the notes."""
    sources: list[str] = []
    lines: list[str] = []
    for backbone in selection.backbones:
        header = ["method", *(column_title(dataset, runs) for dataset in selection.datasets)]
        rows = [
            [METHODS[method].label]
            + [cell_text(grid, runs, states, method, dataset, backbone, sources) for dataset in selection.datasets]
            for method in selection.methods
        ]
        rows += [
            [f"{METHODS[method].label} − {METHODS[other].label}"]
            + [difference_text(grid, runs, states, method, other, dataset, backbone) for dataset in selection.datasets]
            for method, other in comparisons(selection)
        ]
        lines += [f"### {BACKBONE_TITLES.get(backbone, backbone)}", "", *markdown_table(header, rows), ""]
    lines += [
        f"Test accuracy of the primary task (%), the mean of each run's last {figure3.LAST_EPOCHS} epochs, as mean ± "
        "std over seeds (n seeds, epochs done); differences are paired by seed; published: the figure published "
        "for the configuration ([n]: its source).",
        *(f"[{i}] {source}" for i, source in enumerate(sources, 1)),
        *(f"n/a: {line}." for line in not_run_lines(selection, grid)),
    ]
    reasons = figure3.not_comparable_reasons(runs, states)
    if reasons:
        lines.append(f"Not comparable with the published figures: {', '.join(reasons)} (in some or all runs).")
    lines += [f"{run.name}: metrics damaged: {states[run].damaged}; left out." for run in runs if states[run].damaged]
    lines += notes
    return "\n".join(lines)


def results_csv(selection: Selection, grid: Grid, runs: Sequence[Run], states: dict[Run, RunState]) -> str:
    """Every cell as a row, for a spreadsheet or a paper's own table: the per-seed numbers, their mean and std."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        ["backbone", "dataset", "method", "n", "mean", "std", "seeds", "last5_means", "epochs", "published"]
    )
    for backbone in selection.backbones:
        for dataset in selection.datasets:
            for method in selection.methods:
                if (method, dataset, backbone) in grid.not_run:
                    continue
                at = runs_at(runs, method, dataset, backbone)
                done = [run for run in at if states[run].epochs_done]
                values = [figure3.last_epochs_mean(states[run].accuracies) for run in done]
                writer.writerow(
                    [
                        backbone,
                        dataset,
                        method,
                        len(values),
                        f"{statistics.fmean(values):.4f}" if values else "",
                        f"{statistics.stdev(values):.4f}" if len(values) > 1 else "",
                        " ".join(str(run.seed) for run in done),
                        " ".join(f"{value:.4f}" for value in values),
                        " ".join(str(states[run].epochs_done) for run in done),
                        "; ".join(f"{value} ({source})" for source, value in (at[0].published if at else ())),
                    ]
                )
    return out.getvalue()


def write_texts(folder: Path, files: dict[str, str]) -> None:
    """Each report file into `folder`, atomically; then say where they are."""
    for name, text in files.items():
        experiment.write_atomic(folder / name, lambda tmp, text=text: Path(tmp).write_text(text))
    figure3.show(f"\nwrote {' and '.join(str(folder / name) for name in files)}")


def report_markdown(selection: Selection, runs: Sequence[Run], states: dict[Run, RunState], tables: str) -> str:
    run_lines = figure3.run_list(runs, states)
    flags = figure3.flags_text(selection.script_flags)
    return "\n".join(
        [
            "# Results: test accuracy of the primary task",
            "",
            f"Datasets {', '.join(selection.datasets)}; backbones {', '.join(selection.backbones)}; methods "
            f"{', '.join(selection.methods)}; seeds {', '.join(map(str, selection.seeds))}; flags after --: {flags}.",
            "",
            tables,
            "",
            "## Runs",
            "",
            *run_lines,
            "",
        ]
    )


def report(selection: Selection, grid: Grid, out: Path | None = None) -> int:
    """Print the tables; write report.md and results.csv into `out`, by default <results-dir>/tables/. Without flags
    after --, each run is found by the settings its metrics.json records."""
    runs, states, notes = figure3.runs_and_states(grid.runs, selection.script_flags)
    if not any(state.epochs_done for state in states.values()):
        for note in notes:
            figure3.show(note)
        raise UsageError(figure3.nothing_to_report(selection.results_dir, runs, states, len(grid.runs), "tables.py"))
    tables = report_tables(selection, grid, runs, states, notes)
    figure3.show(tables)
    folder = figure3.report_folder(out, selection.results_dir / TABLES_FOLDER, "report.md and results.csv")
    files = {
        "report.md": report_markdown(selection, runs, states, tables),
        "results.csv": results_csv(selection, grid, runs, states),
    }
    write_texts(folder, files)
    return 0


# ---------------------------------------------------------------------------------------------
# Command line


def command_line() -> OneLineParser:
    parser = OneLineParser(
        prog="tables.py",
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,  # a typo of one flag must not silently mean another
        epilog=f"{SCRIPT_FLAGS_HELP} {MAOAL_TABLE_HELP}",
    )
    grid = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    grid.add_argument(
        "--datasets",
        default=DEFAULTS["datasets"],
        help=f"comma list of {', '.join(DATASETS)}: the columns, in this order (default: %(default)s)",
    )
    grid.add_argument(
        "--backbones",
        default=DEFAULTS["backbones"],
        help=f"comma list of {', '.join(BACKBONES)}: one table each (default: %(default)s)",
    )
    grid.add_argument(
        "--methods",
        default=DEFAULTS["methods"],
        help=f"comma list of {', '.join(METHODS)}: the rows (default: %(default)s; human and maoal: cifar100 only)",
    )
    grid.add_argument("--seeds", default=DEFAULTS["seeds"], help="comma list of seeds (default: %(default)s)")
    grid.add_argument("--results-dir", type=Path, default=Path("results"), help="as the scripts' (default: results)")
    figure3.runner_subcommands(
        parser, grid, SCRIPT_FLAGS_HELP, "report.md and results.csv", TABLES_FOLDER, table="the tables"
    )
    return parser


def selection_of(args: argparse.Namespace, script_flags: tuple[str, ...]) -> Selection:
    return Selection(
        datasets=parse_names(args.datasets, DATASETS, "--datasets", "dataset"),
        backbones=parse_names(args.backbones, BACKBONES, "--backbones", "backbone"),
        methods=figure3.parse_methods(args.methods),
        seeds=figure3.parse_seeds(args.seeds),
        results_dir=args.results_dir,
        script_flags=script_flags,
    )


def dispatch(args: argparse.Namespace, selection: Selection) -> int:
    """The subcommand's work; returns its exit code."""
    grid = build_grid(selection)
    if args.command == "plan":
        lines = figure3.plan_lines(grid.runs, [figure3.read_state(run) for run in grid.runs])
        print("\n".join([*lines, *(f"not run: {line}" for line in not_run_lines(selection, grid))]))
        return 0
    if args.command in ("run", "submit"):
        table = lambda runs, states: report_tables(selection, grid, runs, states)
        return figure3.run_or_submit(args, grid.runs, selection.script_flags, table, who="tables")
    return report(selection, grid, out=args.out)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    if argv[:1] == ["maoal"]:  # `tables.py maoal ...`: the MAOAL table
        figure3.runner_main(argv[1:], maoal_command_line, maoal_selection_of, maoal_dispatch)
    figure3.runner_main(argv, command_line, selection_of, dispatch)


# ---------------------------------------------------------------------------------------------
# The MAOAL table: every mode of model_vgg_maoal.py on the MAOAL authors' multi-domain task (`tables.py maoal`)

# The modes (model_vgg_maoal.MODES) and their rows' labels, in that order.
MAOAL_MODES = {
    "maoal": "MAOAL",
    "equal": "Equal",
    "gcs": "GCS",
    "gcs-block": "GCS (per block)",
    "aux": "AuxiLearn",
    "single": "SLL (single)",
}
MAOAL_BASELINE = "single"  # every other mode's difference, paired by seed, is against this one
MAOAL_FILES = ("maoal.md", "maoal.csv")  # in <results-dir>/tables/, beside the datasets x backbones report
MAOAL_DEFAULTS = {"modes": ",".join(MAOAL_MODES), "seeds": "0"}
NOT_THE_HIERARCHY = "the domains task's primary task is --target-domain's 5 classes, its auxiliary ones --aux-domains"
# Script flags `tables.py maoal` sets itself, and what to use instead.
MAOAL_SETS = {
    "task": "the MAOAL table is the domains task; figure3.py --methods maoal runs the hierarchy",
    "mode": "use --modes",
    "seed": "use --seeds",
    "results_dir": "use --results-dir, before --",
    "run_name": "tables finds every run by its default name",
    "resume": "tables resumes what stopped and never redoes a finished run",
    "overwrite": "tables never redoes a finished run; remove its folder to start it over",
    "smoke": "the table's runs are real runs",
    "primary_level": NOT_THE_HIERARCHY,
    "aux_level": NOT_THE_HIERARCHY,
    "help": "see python model_vgg_maoal.py --help",
}
MAOAL_FLAGS_HELP = (
    "Flags after -- go to every run (model_vgg_maoal.py --task domains), e.g. -- --epochs 50 --backbone vgg16."
)
# The two measures, from a run's test accuracy (%) per epoch: this project's, and the MAOAL authors'.
MEASURES = {"last5": figure3.last_epochs_mean, "best": max}
MEASURE_TITLES = {
    "last5": f"last {figure3.LAST_EPOCHS} epochs",
    "best": "best epoch, chosen on the test set [†]",
}


@dataclass(frozen=True)
class DomainRun(Run):
    """A run of model_vgg_maoal.py --task domains: its place in the table is its mode, domains and seed."""

    mode: str = "maoal"
    target_domain: int = 14
    aux_domains: tuple[int, ...] = ()
    unpublished: str = ""  # the script's unpublished_because, where it publishes no figure

    @property
    def slot(self) -> tuple:
        """As domain_slot reads it from a metrics.json: (method, task, mode, target, auxiliary domains, seed)."""
        return self.method, "domains", self.mode, self.target_domain, self.aux_domains, self.seed

    @property
    def place(self) -> str:
        return f"--mode {self.mode} on domain {self.target_domain} (auxiliary {domains_text(self.aux_domains)})"

    @property
    def timed_as(self) -> str:
        return f"maoal --mode {self.mode} on the domains task with {self.backbone}"


@dataclass(frozen=True)
class MaoalSelection:
    modes: tuple[str, ...]  # the rows, in the order given
    seeds: tuple[int, ...]
    results_dir: Path
    script_flags: tuple[str, ...]  # everything after `--`


def domains_text(domains: Sequence[int]) -> str:
    """0-9 for a range, else 0,3,5."""
    if len(domains) > 1 and list(domains) == list(range(domains[0], domains[0] + len(domains))):
        return f"{domains[0]}-{domains[-1]}"
    return ",".join(map(str, domains))


def domain_slot(config: dict) -> tuple | None:
    """The place in the MAOAL table of a run with these recorded settings (DomainRun.slot), or None: a run of another
    method, of the hierarchy task (or recorded before --task existed: the hierarchy), or with settings unreadable."""
    if config.get("method") != "maoal" or config.get("task") != "domains":
        return None
    mode, target, seed, aux = (config.get(name) for name in ("mode", "target_domain", "seed", "aux_domains"))
    if mode not in MAOAL_MODES or not (figure3.is_int(target) and figure3.is_int(seed) and isinstance(aux, str)):
        return None
    try:
        domains = model_vgg_maoal.aux_domain_list(aux)
    except ValueError:
        return None
    return "maoal", "domains", mode, target, domains, seed


def maoal_grid(selection: MaoalSelection) -> list[DomainRun]:
    """Every run of the table, seed by seed, mode by mode: the script's own default run of --task domains with that
    mode and seed, plus the flags after --, in the folder the script names."""
    module = model_vgg_maoal
    spellings = figure3.flag_spellings(module)
    groups = figure3.split_script_flags(selection.script_flags, spellings, MAOAL_SETS, who="tables maoal")
    flags = [token for group in groups for token in group]
    runs = []
    for seed in selection.seeds:
        for mode in selection.modes:
            args = ["--task", "domains", "--mode", mode, "--seed", str(seed)]
            args += ["--results-dir", str(selection.results_dir), *flags]
            cfg = figure3.checked_config(
                module, args, f"model_vgg_maoal.py (--task domains --mode {mode}, seed {seed})"
            )
            published = module.METHOD.published_accuracy(cfg)
            runs.append(
                DomainRun(
                    method="maoal",
                    primary=5,  # the target domain's 5 classes
                    aux=None,
                    seed=seed,
                    script=figure3.script_path("maoal"),
                    args=tuple(args),
                    epochs=cfg.epochs,
                    run_dir=selection.results_dir / experiment.default_run_name(module.METHOD, cfg),
                    published=tuple(published.items()),
                    dataset=cfg.dataset,
                    backbone=cfg.backbone,
                    folder=TABLES_FOLDER,
                    mode=mode,
                    target_domain=cfg.target_domain,
                    aux_domains=module.aux_domain_list(cfg.aux_domains),
                    unpublished="" if published else module.METHOD.unpublished_because(cfg),
                )
            )
    return runs


def mode_runs(runs: Sequence[DomainRun], mode: str) -> list[DomainRun]:
    return [run for run in runs if run.mode == mode]


def measure_cell(runs: Sequence[Run], states: dict[Run, RunState], measure: str) -> figure3.Cell:
    """figure3's cell of these runs (one per seed), its values each run's `measure` (MEASURES)."""
    cell = figure3.cell_of(runs, states)
    done = [run for run in runs if states[run].epochs_done]
    return dataclasses.replace(cell, values=tuple(MEASURES[measure](states[run].accuracies) for run in done))


def paired_by_seed(
    mine: Sequence[Run], theirs: Sequence[Run], states: dict[Run, RunState], measure: str
) -> dict[int, float]:
    """Per seed where both have epochs, in seed order: `measure` of the run in `mine` minus that in `theirs`."""
    by_seed = [
        {run.seed: MEASURES[measure](states[run].accuracies) for run in group if states[run].epochs_done}
        for group in (mine, theirs)
    ]
    return {seed: by_seed[0][seed] - by_seed[1][seed] for seed in sorted(by_seed[0]) if seed in by_seed[1]}


def maoal_difference_text(selection: MaoalSelection, runs, states, mode: str, measure: str) -> str:
    if mode == MAOAL_BASELINE:
        return "(baseline)"
    diffs = list(paired_by_seed(mode_runs(runs, mode), mode_runs(runs, MAOAL_BASELINE), states, measure).values())
    return f"{figure3.mean_std(diffs, signed=True)} (n={len(diffs)})" if diffs else "—"


def task_title(runs: Sequence[DomainRun]) -> str:
    run = runs[0]
    networks = ", ".join(sorted({BACKBONE_TITLES.get(r.backbone, r.backbone) for r in runs}))
    return (
        f"CIFAR-100/20, target domain {run.target_domain} (its 5 classes), auxiliary domains "
        f"{domains_text(run.aux_domains)}, {networks}"
    )


def maoal_table(
    selection: MaoalSelection, runs: Sequence[DomainRun], states: dict[Run, RunState], notes: Sequence[str] = ()
) -> str:
    """The markdown table (rows: modes; columns: both measures, each with its difference to SLL) and its notes."""
    baseline = MAOAL_BASELINE in selection.modes
    baseline_label = MAOAL_MODES[MAOAL_BASELINE].split(" ")[0]
    header = ["mode"]
    for measure in MEASURES:
        header += [MEASURE_TITLES[measure], *([f"− {baseline_label} ({measure})"] if baseline else [])]
    sources: list[str] = []
    any_published = any(run.published for run in runs)
    header += ["published"] if any_published else []
    rows = []
    for mode in selection.modes:
        at = mode_runs(runs, mode)
        row = [MAOAL_MODES[mode]]
        for measure in MEASURES:
            row.append(measure_cell(at, states, measure).text())
            if baseline:
                row.append(maoal_difference_text(selection, runs, states, mode, measure))
        if any_published:
            row.append(published_text(at, sources) or "none")
        rows.append(row)
    lines = [f"### {task_title(runs)}", "", *markdown_table(header, rows), ""] if runs else []
    lines += [
        "Test accuracy of the primary task (%), as mean ± std over seeds (n seeds, epochs done). "
        f"last {figure3.LAST_EPOCHS} epochs: the mean of each run's last {figure3.LAST_EPOCHS} epochs (this "
        "project's measure). [†] best epoch: each run's best epoch's test accuracy, chosen on the test set, as the "
        "MAOAL authors report (optimistic: the test set picks the epoch)."
        + (f" − {baseline_label}: the mode minus {MAOAL_MODES[MAOAL_BASELINE]}, paired by seed." if baseline else ""),
        *(f"[{i}] {source}" for i, source in enumerate(sources, 1)),
    ]
    unpublished = sorted({run.unpublished for run in runs if run.unpublished})
    lines += [f"Published: none for this configuration: {because}." for because in unpublished]
    reasons = figure3.not_comparable_reasons(runs, states)
    if reasons:
        lines.append(f"Not comparable with the published figures: {', '.join(reasons)} (in some or all runs).")
    lines += [f"{run.name}: metrics damaged: {states[run].damaged}; left out." for run in runs if states[run].damaged]
    lines += notes
    return "\n".join(lines)


def maoal_csv(selection: MaoalSelection, runs: Sequence[DomainRun], states: dict[Run, RunState]) -> str:
    """Every mode as a row: the per-seed numbers of both measures, their means and stds, the paired differences."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    header = ["mode", "label", "n", "seeds", "epochs"]
    for measure in MEASURES:
        header += [f"{measure}_mean", f"{measure}_std", f"{measure}_values"]
        header += [f"{measure}_minus_{MAOAL_BASELINE}_seeds", f"{measure}_minus_{MAOAL_BASELINE}"]
    writer.writerow([*header, "published"])
    baseline = mode_runs(runs, MAOAL_BASELINE) if MAOAL_BASELINE in selection.modes else []
    for mode in selection.modes:
        at = mode_runs(runs, mode)
        done = [run for run in at if states[run].epochs_done]
        row = [mode, MAOAL_MODES[mode], len(done), " ".join(str(run.seed) for run in done)]
        row.append(" ".join(str(states[run].epochs_done) for run in done))
        for measure in MEASURES:
            values = [MEASURES[measure](states[run].accuracies) for run in done]
            row += [
                f"{statistics.fmean(values):.4f}" if values else "",
                f"{statistics.stdev(values):.4f}" if len(values) > 1 else "",
            ]
            row.append(" ".join(f"{value:.4f}" for value in values))
            diffs = paired_by_seed(at, baseline, states, measure) if baseline and mode != MAOAL_BASELINE else {}
            row += [" ".join(map(str, diffs)), " ".join(f"{value:.4f}" for value in diffs.values())]
        row.append("; ".join(f"{value} ({source})" for source, value in (at[0].published if at else ())))
        writer.writerow(row)
    return out.getvalue()


def maoal_markdown(
    selection: MaoalSelection, runs: Sequence[DomainRun], states: dict[Run, RunState], table: str
) -> str:
    run_lines = figure3.run_list(runs, states, best=True)
    flags = figure3.flags_text(selection.script_flags)
    return "\n".join(
        [
            "# MAOAL's multi-domain table: every mode on CIFAR-100/20 (model_vgg_maoal.py --task domains)",
            "",
            f"Modes {', '.join(selection.modes)}; seeds {', '.join(map(str, selection.seeds))}; "
            f"flags after --: {flags}.",
            "",
            table,
            "",
            "## Runs",
            "",
            *run_lines,
            "",
        ]
    )


def maoal_report(selection: MaoalSelection, grid: Sequence[DomainRun], out: Path | None = None) -> int:
    """Print the table; write maoal.md and maoal.csv into `out`, by default <results-dir>/tables/. Without flags
    after --, each run is found by the settings its metrics.json records (domain_slot: never a hierarchy run)."""
    runs, states, notes = figure3.runs_and_states(grid, selection.script_flags, slot_of=domain_slot)
    if not any(state.epochs_done for state in states.values()):
        for note in notes:
            figure3.show(note)
        raise UsageError(figure3.nothing_to_report(selection.results_dir, runs, states, len(grid), "tables.py maoal"))
    table = maoal_table(selection, runs, states, notes)
    figure3.show(table)
    folder = figure3.report_folder(out, selection.results_dir / TABLES_FOLDER, " and ".join(MAOAL_FILES))
    files = dict(zip(MAOAL_FILES, (maoal_markdown(selection, runs, states, table), maoal_csv(selection, runs, states))))
    write_texts(folder, files)
    return 0


def maoal_command_line() -> OneLineParser:
    parser = OneLineParser(
        prog="tables.py maoal",
        description="The MAOAL table: every mode of model_vgg_maoal.py on the MAOAL authors' CIFAR-100/20 "
        "multi-domain task (--task domains), over seeds.",
        allow_abbrev=False,
        epilog=MAOAL_FLAGS_HELP,
    )
    grid = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    grid.add_argument(
        "--modes",
        default=MAOAL_DEFAULTS["modes"],
        help=f"comma list of {', '.join(MAOAL_MODES)}: the rows, in this order (default: all)",
    )
    grid.add_argument("--seeds", default=MAOAL_DEFAULTS["seeds"], help="comma list of seeds (default: %(default)s)")
    grid.add_argument("--results-dir", type=Path, default=Path("results"), help="as the scripts' (default: results)")
    figure3.runner_subcommands(
        parser, grid, MAOAL_FLAGS_HELP, " and ".join(MAOAL_FILES), TABLES_FOLDER, table="the MAOAL table"
    )
    return parser


def maoal_selection_of(args: argparse.Namespace, script_flags: tuple[str, ...]) -> MaoalSelection:
    return MaoalSelection(
        modes=parse_names(args.modes, tuple(MAOAL_MODES), "--modes", "mode"),
        seeds=figure3.parse_seeds(args.seeds),
        results_dir=args.results_dir,
        script_flags=script_flags,
    )


def maoal_dispatch(args: argparse.Namespace, selection: MaoalSelection) -> int:
    """`tables.py maoal`'s subcommand's work; returns its exit code."""
    runs = maoal_grid(selection)
    if args.command == "plan":
        print("\n".join(figure3.plan_lines(runs, [figure3.read_state(run) for run in runs])))
        return 0
    if args.command in ("run", "submit"):
        table = lambda runs, states: maoal_table(selection, runs, states)
        return figure3.run_or_submit(args, runs, selection.script_flags, table, who="tables maoal")
    return maoal_report(selection, runs, out=args.out)


if __name__ == "__main__":
    main()
