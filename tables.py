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
    python tables.py run --datasets cifar100 --methods single,maxl,wamal --aux-weights 1,4    # + MAXL, WAMAL at 4
    python tables.py maoal run --seeds 0,1,2 --gpus 0,1     # the MAOAL table: every mode on --task domains
    python tables.py maoal report                           # results/tables/maoal.md and maoal.csv

--aux-weights sweeps the auxiliary loss's weight (the scripts' --aux-weight) of the methods that have one (Human,
MAXL, WAMAL): a row per method and weight, with the differences at each weight and WAMAL's against MAXL at every
other weight (does WAMAL's gain survive a tuned weight for MAXL?). Human and MAOAL learn from CIFAR-100's finer
labels: on the other datasets their cells are n/a (not run), and a
selection where one of them could run nowhere is refused. Everything else is runner.py's, as for figure3.py: the job
pool (--gpus, --runs-per-gpu), job logs (<results-dir>/tables/jobs/<run-name>.log), runs another process holds
skipped as running elsewhere, Ctrl-C keeping every checkpoint, submit through submitit, and `report` without flags
after -- finding each run by the settings its metrics.json records.

`tables.py maoal {plan,run,submit,report}` is the MAOAL table on the same runner: every --modes of
model_vgg_maoal.py on the MAOAL authors' CIFAR-100/20 multi-domain task (--task domains), and Auto-Lambda on the same
task and images (model_vgg_autol.py --task maoal-domains), for each seed; rows the modes, columns the last-5-epoch mean
and the best epoch's test accuracy (chosen on the test set, as the authors report), each with its difference to SLL
(--mode single) paired by seed.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import experiment
import runner
from create_dataset import DATASET_NAMES, DATASETS
from experiment import BACKBONES, UsageError
from runner import LAST_EPOCHS, METHODS, Run, last_epochs_mean

TABLES_FOLDER = "tables"  # inside --results-dir: report.md, results.csv, maoal.md, maoal.csv, jobs/, submitit/
TABLES_FILES = "report.md and results.csv"
BACKBONE_TITLES = {"vgg16": "VGG-16", "resnet18": "ResNet-18", "resnet50": "ResNet-50", "vit_b_16": "ViT-B/16"}
# The differences shown below the methods, paired by seed, where both are selected: each against Single, and the
# comparisons the successors' papers make.
COMPARISONS = (("human", "single"), ("maxl", "single"), ("wamal", "single"), ("maoal", "single"))
COMPARISONS += (("maxl", "human"), ("wamal", "maxl"))
LEVELS_ARE_FIGURE3S = "the primary task is the dataset's classes (CIFAR-100's 20 superclasses); figure3.py runs the "
LEVELS_ARE_FIGURE3S += "other levels of CIFAR-100's hierarchy"
# Script flags tables.py sets itself, and what to use instead.
TABLES_SETS = {"dataset": "use --datasets", "backbone": "use --backbones", **runner.sets_itself("tables", "tables' ")}
TABLES_SETS |= {
    "primary_level": LEVELS_ARE_FIGURE3S,
    "aux_level": LEVELS_ARE_FIGURE3S,
    "aux_weight": "use --aux-weights",
}
TABLES_FLAGS_HELP = "Flags after -- go to every run whose model script has them, e.g. -- --epochs 50 --image-size 64."
MAOAL_TABLE_HELP = "The MAOAL table (every mode on --task domains): python tables.py maoal {plan,run,submit,report}."


# ---------------------------------------------------------------------------------------------
# The grid: which runs, with which flags, in which folders (each script decides, as in the script)


@dataclass(frozen=True)
class TableSelection:
    datasets: tuple[str, ...]  # the columns, in the order given
    backbones: tuple[str, ...]  # one table each, in the order given
    methods: tuple[str, ...]  # the rows, in runner.METHODS' order
    seeds: tuple[int, ...]
    results_dir: Path
    script_flags: tuple[str, ...]  # everything after `--`
    aux_weights: tuple[float, ...] = (1.0,)  # --aux-weight of the methods that have one: a row each

    def variants(self) -> list[tuple[str, float]]:
        """The rows: (method, its auxiliary weight), each method at every weight where it has the setting."""
        return [(m, w) for m in self.methods for w in (self.aux_weights if weighted(m) else (1.0,))]


@functools.cache
def weighted(method: str) -> bool:
    """Whether the method's script weighs its auxiliary loss by --aux-weight."""
    return any(f.name == "aux_weight" for f in experiment.fields(runner.script(method).Config))


def variant_label(method: str, weight: float) -> str:
    return METHODS[method] + (f" (aux weight {weight:g})" if weight != 1 else "")


def parse_weights(text: str) -> tuple[float, ...]:
    """--aux-weights: a comma list of numbers >= 0, each once, in the order given."""
    try:
        weights = [float(value) for value in text.split(",")]
    except ValueError:
        raise UsageError(f"--aux-weights: {text!r} is not a comma list of numbers, e.g. 1,0.25,4") from None
    if not all(0 <= w < float("inf") for w in weights):
        raise UsageError(f"--aux-weights: {text!r}: each weight must be a finite number >= 0")
    return tuple(dict.fromkeys(weights))


@dataclass(frozen=True)
class TableGrid:
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
    module = runner.script(method)
    if dataset != "cifar100" and getattr(module, "CIFAR100_ONLY", ""):
        return f"runs on cifar100 only ({module.CIFAR100_ONLY})"
    try:  # the backbone in the script's default task, checked as a run checks it
        module.check_config(module.Config(backbone=backbone))
    except UsageError as error:
        return f"refuses --backbone {backbone} ({str(error).removeprefix(f'--backbone {backbone}: ')})"
    return None


def build_tables(selection: TableSelection) -> TableGrid:
    """Every run of the selected grid, seed by seed, backbone by backbone, dataset by dataset; the cells a method
    cannot run in are named with the reason, and a method that could run in none of them is refused."""
    places = [(dataset, backbone) for dataset in selection.datasets for backbone in selection.backbones]
    not_run = {}
    for method in selection.methods:
        reasons = {(method, *place): reason for place in places if (reason := not_run_because(method, *place))}
        if len(reasons) == len(places):
            because = " and ".join(sorted(set(reasons.values())))
            hint = "add cifar100 to --datasets" if "cifar100 only" in because else "choose other --backbones"
            label = METHODS[method]
            raise UsageError(f"--methods {method}: {label} {because}; {hint}, or drop {method} from --methods")
        not_run |= reasons
    flags = runner.script_flags(selection.script_flags, selection.methods, TABLES_SETS, "tables")
    runs = []
    for seed in selection.seeds:
        for backbone in selection.backbones:
            for dataset in selection.datasets:
                for method, weight in selection.variants():
                    if (method, dataset, backbone) in not_run:
                        continue
                    args = ["--dataset", dataset, "--backbone", backbone, "--seed", str(seed)]
                    args += ["--aux-weight", f"{weight:g}"] if weight != 1 else []
                    args += ["--results-dir", str(selection.results_dir), *flags[method]]
                    weighed = f", aux weight {weight:g}" if weight != 1 else ""
                    who = f"{runner.script_path(method).name} ({dataset}, {backbone}, seed {seed}{weighed})"
                    cfg = runner.checked_config(method, args, who)
                    runs.append(runner.run_of(method, cfg, args, TABLES_FOLDER))
    return TableGrid(tuple(runs), not_run)


def not_run_lines(selection: TableSelection, grid: TableGrid) -> list[str]:
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
        lines.append(f"{METHODS[method]} is not run on {separator.join(places)}: it {reason}")
    return lines


# ---------------------------------------------------------------------------------------------
# The tables


def in_cell(runs: Sequence[Run], method: str, dataset: str, backbone: str, weight: float = 1.0) -> list[Run]:
    place = (method, dataset, backbone, weight)
    return [run for run in runs if (run.method, run.dataset, run.backbone, run.aux_weight) == place]


def differences(selection: TableSelection) -> list[tuple[tuple[str, float], tuple[str, float]]]:
    """The difference rows, (variant, variant it is compared with): COMPARISONS at each weight (against Single, which
    has none, at every weight), then WAMAL at weight 1 against MAXL at each other weight."""
    variants = selection.variants()
    pairs = [
        ((m, w), (other, w if weighted(other) else 1.0))
        for method, other in COMPARISONS
        for m, w in variants
        if m == method
    ]
    if "wamal" in selection.methods:
        pairs += [(("wamal", 1.0), v) for v in variants if v[0] == "maxl" and v[1] != 1]
    return [(mine, theirs) for mine, theirs in pairs if theirs in variants]


def column_title(dataset: str, runs: Sequence[Run]) -> str:
    title = DATASET_NAMES.get(dataset, dataset)
    primaries = sorted({run.primary for run in runs if run.dataset == dataset})
    if dataset == "cifar100" and len(primaries) == 1:
        return f"{title} ({primaries[0]} classes)"  # the paper's primary task: the 20 superclasses
    return title


def report_tables(selection: TableSelection, grid: TableGrid, runs, states, notes: Sequence[str] = ()) -> str:
    """One markdown table per backbone (rows: methods, then differences; columns: datasets), then the notes."""
    sources: list[str] = []

    def cell(method: str, weight: float, dataset: str, backbone: str) -> str:
        if (method, dataset, backbone) in grid.not_run:
            return "n/a"
        at = in_cell(runs, method, dataset, backbone, weight)
        published = runner.cited(at, sources)
        return runner.cell_of(at, states).text() + (f"; published {published}" if published else "")

    def difference(mine: tuple[str, float], theirs: tuple[str, float], dataset: str, backbone: str) -> str:
        if (mine[0], dataset, backbone) in grid.not_run or (theirs[0], dataset, backbone) in grid.not_run:
            return "n/a"
        at_mine, at_theirs = (in_cell(runs, m, dataset, backbone, w) for m, w in (mine, theirs))
        return runner.difference_text(at_mine, at_theirs, states)

    lines: list[str] = []
    for backbone in selection.backbones:
        header = ["method", *(column_title(dataset, runs) for dataset in selection.datasets)]
        rows = [[variant_label(*v), *(cell(*v, d, backbone) for d in selection.datasets)] for v in selection.variants()]
        rows += [
            [f"{variant_label(*m)} − {variant_label(*o)}", *(difference(m, o, d, backbone) for d in selection.datasets)]
            for m, o in differences(selection)
        ]
        lines += [f"### {BACKBONE_TITLES.get(backbone, backbone)}", "", *runner.markdown_table(header, rows), ""]
    lines += [
        f"Test accuracy of the primary task (%), the mean of each run's last {LAST_EPOCHS} epochs, as mean ± "
        "std over seeds (n seeds, epochs done); differences are paired by seed; published: the figure published "
        "for the configuration ([n]: its source).",
        *(f"[{i}] {source}" for i, source in enumerate(sources, 1)),
        *(f"n/a: {line}." for line in not_run_lines(selection, grid)),
    ]
    return "\n".join(lines + runner.table_notes(runs, states, notes))


def tables_files(selection: TableSelection, grid: TableGrid, runs, states, tables: str) -> dict[str, str]:
    """report.md, and results.csv: every cell as a row, for a spreadsheet or a paper's own table (the per-seed
    numbers, their mean and std)."""
    header = ["backbone", "dataset", "method", "n", "mean", "std", "seeds", "last5_means", "epochs", "published"]
    rows = [[*header, "aux_weight"]]
    for backbone in selection.backbones:
        for dataset in selection.datasets:
            for method, weight in selection.variants():
                if (method, dataset, backbone) in grid.not_run:
                    continue
                at = in_cell(runs, method, dataset, backbone, weight)
                done = [run for run in at if states[run].epochs_done]
                mean, std, values = runner.csv_numbers([last_epochs_mean(states[run].accuracies) for run in done])
                seeds = " ".join(str(run.seed) for run in done)
                epochs = " ".join(str(states[run].epochs_done) for run in done)
                published = "; ".join(f"{value} ({source})" for source, value in (at[0].published if at else ()))
                rows.append([backbone, dataset, method, len(done), mean, std, seeds, values, epochs, published, weight])
    chosen = f"Datasets {', '.join(selection.datasets)}; backbones {', '.join(selection.backbones)}; methods "
    chosen += f"{', '.join(selection.methods)}; seeds {', '.join(map(str, selection.seeds))}"
    if selection.aux_weights != (1.0,):
        chosen += f"; auxiliary weights {', '.join(f'{w:g}' for w in selection.aux_weights)}"
    title = "Results: test accuracy of the primary task"
    markdown = runner.report_markdown(title, chosen, selection.script_flags, tables, runs, states)
    return {"report.md": markdown, "results.csv": runner.csv_text(rows)}


def tables_parser() -> runner.OneLineParser:
    columns = f"comma list of {', '.join(DATASETS)}: the columns, in this order (default: %(default)s)"
    tables = f"comma list of {', '.join(BACKBONES)}: one table each (default: %(default)s)"
    rows = f"comma list of {', '.join(METHODS)}: the rows (default: %(default)s; human and maoal: cifar100 only)"
    selection = {"--datasets": ("cifar10", columns), "--backbones": ("vgg16", tables)}
    selection["--methods"] = ("single,maxl,wamal", rows)
    weights = "comma list of --aux-weight values for Human, MAXL and WAMAL: a row each (default: %(default)s)"
    selection["--aux-weights"] = ("1", weights)
    description, epilog = __doc__.split("\n\n")[0], f"{TABLES_FLAGS_HELP} {MAOAL_TABLE_HELP}"
    return runner.tool_parser("tables.py", description, epilog, selection, TABLES_FOLDER, TABLES_FILES, "the tables")[0]


def tables_grid(args: argparse.Namespace, script_flags: tuple[str, ...]) -> runner.Grid:
    datasets = parse_names(args.datasets, DATASETS, "--datasets", "dataset")
    backbones = parse_names(args.backbones, BACKBONES, "--backbones", "backbone")
    methods, seeds = runner.parse_methods(args.methods), runner.parse_seeds(args.seeds)
    weights = parse_weights(args.aux_weights)
    selection = TableSelection(datasets, backbones, methods, seeds, args.results_dir, script_flags, weights)
    grid = build_tables(selection)
    return runner.Grid(
        "tables.py", TABLES_FOLDER, TABLES_FILES, grid.runs, script_flags,
        table=lambda runs, states, notes: report_tables(selection, grid, runs, states, notes),
        write=lambda runs, states, table: tables_files(selection, grid, runs, states, table),
        plan_notes=tuple(f"not run: {line}" for line in not_run_lines(selection, grid)),
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    if argv[:1] == ["maoal"]:  # `tables.py maoal ...`: the MAOAL table
        runner.tool_main(argv[1:], maoal_parser(), maoal_grid_of)
    runner.tool_main(argv, tables_parser(), tables_grid)


# ---------------------------------------------------------------------------------------------
# The MAOAL table: every mode of model_vgg_maoal.py on the MAOAL authors' multi-domain task (`tables.py maoal`)

# The rows and their labels, in that order: the modes (model_vgg_maoal.MODES), and the methods of other scripts on the
# same task (OTHER_SCRIPTS).
MAOAL_MODES = {"maoal": "MAOAL", "equal": "Equal", "gcs": "GCS", "gcs-block": "GCS (per block)", "aux": "AuxiLearn"}
MAOAL_MODES |= {"autol": "Auto-Lambda", "single": "SLL (single)"}
# A row another script runs: its method (model_vgg_<method>.py) and the flags that put it on MAOAL's task.
OTHER_SCRIPTS = {"autol": ("autol", ["--task", "maoal-domains", "--weighting", "autol"])}
MAOAL_BASELINE = "single"  # every other mode's difference, paired by seed, is against this one
MAOAL_FILES = "maoal.md and maoal.csv"  # in <results-dir>/tables/, beside the datasets x backbones report
NOT_THE_HIERARCHY = "the domains task's primary task is --target-domain's 5 classes, its auxiliary ones --aux-domains"
# Script flags `tables.py maoal` sets itself, and what to use instead.
MAOAL_SETS = {"task": "the MAOAL table is the domains task; figure3.py --methods maoal runs the hierarchy"}
MAOAL_SETS |= {"mode": "use --modes", "primary_level": NOT_THE_HIERARCHY, "aux_level": NOT_THE_HIERARCHY}
MAOAL_SETS |= {"weighting": "use --modes", "primary_domain": "use --target-domain: every row's target"}
MAOAL_SETS |= runner.sets_itself("tables", "", runs="table's", script="maoal")
MAOAL_FLAGS_HELP = "Flags after -- go to every run whose script has them (model_vgg_maoal.py --task domains; "
MAOAL_FLAGS_HELP += "model_vgg_autol.py --task maoal-domains follows --target-domain), e.g. -- --epochs 50 "
MAOAL_FLAGS_HELP += "--backbone vgg16."
# The two measures, from a run's test accuracy (%) per epoch: this project's, and the MAOAL authors'.
MEASURES = {"last5": last_epochs_mean, "best": max}
MEASURE_TITLES = {"last5": f"last {LAST_EPOCHS} epochs", "best": "best epoch, chosen on the test set [†]"}


@dataclass(frozen=True)
class DomainRun(Run):
    """A run of model_vgg_maoal.py --task domains (or of another script on that task, OTHER_SCRIPTS): its place in
    the table is its mode (or method), domains and seed."""

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
        how = f"--weighting {self.mode}" if self.mode in OTHER_SCRIPTS else f"--mode {self.mode}"
        return f"{how} on domain {self.target_domain} (auxiliary {domains_text(self.aux_domains)})"

    @property
    def timed_as(self) -> str:
        if self.mode in OTHER_SCRIPTS:
            return f"{self.method} --weighting {self.mode} on the domains task with {self.backbone}"
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
    method, of the hierarchy task (or recorded before --task existed: the hierarchy), of Auto-Lambda's own task, or
    with settings unreadable."""
    if config.get("method") == "autol" and config.get("task") == "maoal-domains":
        mode, target, seed, aux = (config.get(name) for name in ("weighting", "primary_domain", "seed", "aux_domains"))
        if mode not in OTHER_SCRIPTS or not (runner.is_int(target) and runner.is_int(seed) and isinstance(aux, str)):
            return None
        try:
            return "autol", "domains", mode, target, runner.script("autol").aux_domain_list(aux), seed
        except ValueError:
            return None
    if config.get("method") != "maoal" or config.get("task") != "domains":
        return None
    mode, target, seed, aux = (config.get(name) for name in ("mode", "target_domain", "seed", "aux_domains"))
    if mode not in MAOAL_MODES or not (runner.is_int(target) and runner.is_int(seed) and isinstance(aux, str)):
        return None
    try:
        domains = runner.script("maoal").aux_domain_list(aux)
    except ValueError:
        return None
    return "maoal", "domains", mode, target, domains, seed


def maoal_grid(selection: MaoalSelection) -> list[DomainRun]:
    """Every run of the table, seed by seed, mode by mode: the script's own default run of --task domains with that
    mode and seed, plus the flags after --, in the folder the script names."""
    scripts = ["maoal", *dict.fromkeys(OTHER_SCRIPTS[mode][0] for mode in selection.modes if mode in OTHER_SCRIPTS)]
    flags = runner.script_flags(selection.script_flags, scripts, MAOAL_SETS, "tables maoal")
    target = [flags["maoal"][i : i + 2] for i, token in enumerate(flags["maoal"]) if token == "--target-domain"]
    target += [["--target-domain", t.split("=", 1)[1]] for t in flags["maoal"] if t.startswith("--target-domain=")]
    runs = []
    for seed in selection.seeds:
        for mode in selection.modes:
            method, task_flags = OTHER_SCRIPTS.get(mode, ("maoal", ["--task", "domains", "--mode", mode]))
            args = [*task_flags, "--seed", str(seed), "--results-dir", str(selection.results_dir), *flags[method]]
            if method != "maoal":  # another script: its primary domain is the table's target
                args += [token.replace("--target-domain", "--primary-domain") for pair in target for token in pair]
            who = f"model_vgg_{method}.py ({' '.join(task_flags)}, seed {seed})"
            cfg = runner.checked_config(method, args, who)
            script = runner.script(method)
            target_domain = cfg.target_domain if method == "maoal" else cfg.primary_domain
            place = dict(primary=5, aux=None, mode=mode, target_domain=target_domain)  # primary: its 5 classes
            place |= dict(aux_domains=script.aux_domain_list(cfg.aux_domains))
            place |= dict(unpublished="" if script.published_accuracy(cfg) else script.unpublished_because(cfg))
            runs.append(runner.run_of(method, cfg, args, TABLES_FOLDER, DomainRun, **place))
    return runs


def mode_runs(runs: Sequence[DomainRun], mode: str) -> list[DomainRun]:
    return [run for run in runs if run.mode == mode]


def maoal_table(selection: MaoalSelection, runs: Sequence[DomainRun], states, notes: Sequence[str] = ()) -> str:
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
        for measure in MEASURES.values():
            row.append(runner.cell_of(at, states, measure).text())
            if baseline and mode == MAOAL_BASELINE:
                row.append("(baseline)")
            elif baseline:
                row.append(runner.difference_text(at, mode_runs(runs, MAOAL_BASELINE), states, measure))
        rows.append(row + ([runner.cited(at, sources) or "none"] if any_published else []))
    lines = []
    if runs:
        networks = ", ".join(sorted({BACKBONE_TITLES.get(run.backbone, run.backbone) for run in runs}))
        task = f"target domain {runs[0].target_domain} (its 5 classes), auxiliary domains "
        task += f"{domains_text(runs[0].aux_domains)}, {networks}"
        lines = [f"### CIFAR-100/20, {task}", "", *runner.markdown_table(header, rows), ""]
    lines += [
        "Test accuracy of the primary task (%), as mean ± std over seeds (n seeds, epochs done). "
        f"last {LAST_EPOCHS} epochs: the mean of each run's last {LAST_EPOCHS} epochs (this "
        "project's measure). [†] best epoch: each run's best epoch's test accuracy, chosen on the test set, as the "
        "MAOAL authors report (optimistic: the test set picks the epoch)."
        + (f" − {baseline_label}: the mode minus {MAOAL_MODES[MAOAL_BASELINE]}, paired by seed." if baseline else ""),
        *(f"[{i}] {source}" for i, source in enumerate(sources, 1)),
        *(f"Published: none for this configuration: {why}." for why in sorted({r.unpublished for r in runs} - {""})),
    ]
    return "\n".join(lines + runner.table_notes(runs, states, notes))


def maoal_files(selection: MaoalSelection, runs: Sequence[DomainRun], states, table: str) -> dict[str, str]:
    """maoal.md, and maoal.csv: every mode as a row, the per-seed numbers of both measures, their means and stds,
    the paired differences."""
    header = ["mode", "label", "n", "seeds", "epochs"]
    for name in MEASURES:
        header += [f"{name}_mean", f"{name}_std", f"{name}_values"]
        header += [f"{name}_minus_{MAOAL_BASELINE}_seeds", f"{name}_minus_{MAOAL_BASELINE}"]
    rows = [[*header, "published"]]
    baseline = mode_runs(runs, MAOAL_BASELINE) if MAOAL_BASELINE in selection.modes else []
    for mode in selection.modes:
        at = mode_runs(runs, mode)
        done = [run for run in at if states[run].epochs_done]
        row = [mode, MAOAL_MODES[mode], len(done), " ".join(str(run.seed) for run in done)]
        row.append(" ".join(str(states[run].epochs_done) for run in done))
        for measure in MEASURES.values():
            row += runner.csv_numbers([measure(states[run].accuracies) for run in done])
            paired = baseline and mode != MAOAL_BASELINE
            diffs = runner.differences_by_seed(at, baseline, states, measure) if paired else {}
            row += [" ".join(map(str, diffs)), " ".join(f"{value:.4f}" for value in diffs.values())]
        row.append("; ".join(f"{value} ({source})" for source, value in (at[0].published if at else ())))
        rows.append(row)
    title = "MAOAL's multi-domain table: every mode on CIFAR-100/20 (model_vgg_maoal.py --task domains), and "
    title += "Auto-Lambda on the same task (model_vgg_autol.py --task maoal-domains)"
    chosen = f"Modes {', '.join(selection.modes)}; seeds {', '.join(map(str, selection.seeds))}"
    markdown = runner.report_markdown(title, chosen, selection.script_flags, table, runs, states, best=True)
    return {"maoal.md": markdown, "maoal.csv": runner.csv_text(rows)}


def maoal_parser() -> runner.OneLineParser:
    description = (
        "The MAOAL table: every mode of model_vgg_maoal.py on the MAOAL authors' CIFAR-100/20 multi-domain task "
        "(--task domains), and Auto-Lambda on it (model_vgg_autol.py --task maoal-domains), over seeds."
    )
    modes = {
        "--modes": (
            ",".join(MAOAL_MODES),
            f"comma list of {', '.join(MAOAL_MODES)}: the rows, in this order (default: all)",
        )
    }
    prog = "tables.py maoal"
    return runner.tool_parser(
        prog, description, MAOAL_FLAGS_HELP, modes, TABLES_FOLDER, MAOAL_FILES, "the MAOAL table"
    )[0]


def maoal_grid_of(args: argparse.Namespace, script_flags: tuple[str, ...]) -> runner.Grid:
    modes = parse_names(args.modes, tuple(MAOAL_MODES), "--modes", "mode")
    selection = MaoalSelection(modes, runner.parse_seeds(args.seeds), args.results_dir, script_flags)
    return runner.Grid(
        "tables.py maoal", TABLES_FOLDER, MAOAL_FILES, maoal_grid(selection), script_flags,
        table=lambda runs, states, notes: maoal_table(selection, runs, states, notes),
        write=lambda runs, states, table: maoal_files(selection, runs, states, table),
        slot_of=domain_slot,
    )  # fmt: skip


if __name__ == "__main__":
    main()
