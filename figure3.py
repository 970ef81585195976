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

This file is Figure 3's grid, table and picture; the runner (plan, run, submit, runs found by their recorded
settings) is runner.py, which tables.py shares.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import runner
from experiment import UsageError
from runner import LAST_EPOCHS, METHODS, Run, RunState, last_epochs_mean

if TYPE_CHECKING:  # the optional extra, for annotations only: imported where used
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DEFAULT_METHODS = ("single", "human", "maxl")  # the curves of the paper's Figure 3 (wamal and maoal are opt-in)
COMPARED_WITH = {"maxl": ("human", "single"), "wamal": ("human",), "maoal": ("human",)}  # per pair, paired by seed
PAIRS = ((3, 10), (3, 20), (3, 100), (10, 20), (10, 100), (20, 100))  # (primary, auxiliary), the paper's order
LEVELS = (3, 10, 20, 100)
REPORT_FOLDER = "figure3"  # inside --results-dir: report.md, figure3.png, jobs/, submitit/
REPORT_FILES = "report.md and figure3.png"
AUTHORS_WORDS = (
    "Figure 3 is a plot in every version of the paper, with no numbers; the authors' ICLR 2019 submission says "
    "MAXL performs about as well as Human on 4 of the 6 pairs and worse on 2, and that 20 → 100 is its best pair"
)
# Script flags figure3 sets itself, and what to use instead.
FIGURE3_SETS = dict(primary_level="use --pairs", aux_level="use --pairs", **runner.sets_itself("figure3", "figure3's "))
FIGURE3_SETS["dataset"] = "Figure 3 is CIFAR-100's hierarchy; tables.py runs the other datasets"
FIGURE3_FLAGS_HELP = "Flags after -- go to every run whose model script has them, e.g. -- --epochs 50 "
FIGURE3_FLAGS_HELP += "--meta-grad finite-difference."


# ---------------------------------------------------------------------------------------------
# The grid: which runs, with which flags, in which folders (each script decides, as in the script)


@dataclass(frozen=True)
class Selection:
    methods: tuple[str, ...]
    pairs: tuple[tuple[int, int], ...]
    seeds: tuple[int, ...]
    results_dir: Path
    script_flags: tuple[str, ...]  # everything after `--`


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
            choices = ", ".join(f"{p}-{a}" for p, a in PAIRS)
            raise UsageError(f"--pairs: {item.strip()!r} is not a pair of the hierarchy; choose from {choices}")
        pairs.append(pair)
    return tuple(pair for pair in PAIRS if pair in pairs)


def build_grid(selection: Selection) -> list[Run]:
    """Every run of the selected grid, seed by seed, each once (Single shared by the pairs of its primary level)."""
    flags = runner.script_flags(selection.script_flags, selection.methods, FIGURE3_SETS, "figure3")
    runs: dict[tuple, Run] = {}
    for seed in selection.seeds:
        for primary, aux in selection.pairs:
            for method in selection.methods:
                run_aux = None if method in runner.PRIMARY_ONLY else aux
                if (method, primary, run_aux, seed) in runs:
                    continue
                args = ["--primary-level", str(primary), *(["--aux-level", str(run_aux)] if run_aux else [])]
                args += ["--seed", str(seed), "--results-dir", str(selection.results_dir), *flags[method]]
                place = f"{primary}-{run_aux}" if run_aux is not None else f"primary {primary}"
                cfg = runner.checked_config(method, args, f"{runner.script_path(method).name} ({place}, seed {seed})")
                runs[(method, primary, run_aux, seed)] = runner.run_of(method, cfg, args, REPORT_FOLDER)
    return list(runs.values())


# ---------------------------------------------------------------------------------------------
# The table and report.md


def at_pair(runs: Sequence[Run], method: str, pair: tuple[int, int]) -> list[Run]:
    return [run for run in runs if run.method == method and run.serves(pair)]


def report_table(selection: Selection, runs: Sequence[Run], states: dict[Run, RunState], notes=()) -> str:
    """The markdown table (rows: pairs; columns: methods, differences, what is published) and its notes."""
    methods = selection.methods
    differences = [(m, o) for m in methods for o in COMPARED_WITH.get(m, ()) if o in methods]
    header = ["pair", *(METHODS[m] for m in methods)]
    header += [*(f"{METHODS[m]} − {METHODS[o]}" for m, o in differences), "published"]
    rows, sources = [], []
    for pair in selection.pairs:
        row = [f"{pair[0]} → {pair[1]}", *(runner.cell_of(at_pair(runs, m, pair), states).text() for m in methods)]
        row += [runner.difference_text(at_pair(runs, m, pair), at_pair(runs, o, pair), states) for m, o in differences]
        # What is published for the pair: the scripts' figures ([n] = the n-th source), else the authors' words.
        published = [
            f"{METHODS[m]} {cited}" for m in METHODS if (cited := runner.cited(at_pair(runs, m, pair), sources))
        ]
        rows.append([*row, "; ".join([*published, "MAXL's best pair [*]" if pair == PAIRS[-1] else "plot only [*]"])])
    return "\n".join(
        [
            *runner.markdown_table(header, rows),
            "",
            f"Test accuracy of the primary task (%), the mean of each run's last {LAST_EPOCHS} epochs, as mean ± std "
            "over seeds (n seeds, epochs done); differences are paired by seed.",
            *(f"[{i}] {source}" for i, source in enumerate(sources, 1)),
            f"[*] {AUTHORS_WORDS}.",
            *runner.table_notes(runs, states, notes),
        ]
    )


def report_files(selection: Selection, runs, states, table: str, draw: bool) -> dict:
    """report.md, and with `draw` figure3.png (refused, before anything is written, without matplotlib)."""
    if draw:
        without = " (or --no-figure: the table and report.md only)"
        runner.import_extra("matplotlib.figure", "the picture figure3.png", without)
    title = "MAXL, Figure 3: CIFAR-100 hierarchy, primary and auxiliary levels"
    chosen = f"Methods {', '.join(selection.methods)}; seeds {', '.join(map(str, selection.seeds))}"
    picture = ["![Figure 3](figure3.png)", ""] if draw else []
    markdown = runner.report_markdown(title, chosen, selection.script_flags, table, runs, states, picture=picture)
    files = {"report.md": markdown}
    if draw:
        figure = make_figure(figure_data(selection, runs, states))
        files["figure3.png"] = lambda tmp: figure.savefig(tmp, dpi=150, format="png")
    return files


# ---------------------------------------------------------------------------------------------
# The picture


@dataclass(frozen=True)
class FigureData:  # what figure3.png shows
    curves: dict  # {pair: {method: [accuracy (%) per epoch, one list per seed]}}
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
    """The curves by pair and method, the published figures, and the note on comparability and damaged runs."""
    curves, published = {}, {}
    for pair in selection.pairs:
        at = {method: at_pair(runs, method, pair) for method in selection.methods}
        curves[pair] = {m: [list(states[r].accuracies) for r in at[m] if states[r].epochs_done] for m in at}
        published[pair] = {m: at[m][0].published for m in at if at[m]}
    reasons = runner.not_comparable_reasons(runs, states)
    damaged = [run.name for run in runs if states[run].damaged]
    notes = (
        [f"Not comparable with the published figures: {', '.join(reasons)} (in some or all runs)"] if reasons else []
    )
    notes += [f"Left out, metrics damaged: {', '.join(damaged)}"] if damaged else []
    return FigureData(curves, published, ". ".join(notes))


def nested(index: int) -> dict:
    """Hollow markers and lines that shrink from method to method, each drawn over the last: where curves
    coincide, each still shows, as a rim around the next."""
    sizes, widths = (12, 8.5, 5.5, 4, 3), (3.2, 2, 1.3, 0.9, 0.6)  # one per method, METHODS' five at most
    return dict(markersize=sizes[index], linewidth=widths[index], markerfacecolor="none")


def make_figure(data: FigureData) -> Figure:
    """Left, each method's final accuracy at each pair (the mean of the last 5 epochs; ± one std over seeds as error
    bars; the published figures as stars). Right, a panel per pair of the curves (the mean over seeds per epoch, ± one
    std as a band). One legend below all panels; the note on comparability in the title, in red."""
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
        Line2D([], [], color=color, marker=marker, linestyle=linestyle, label=METHODS[method], **nested(i))
        for i, (method, (color, marker, linestyle)) in enumerate((m, METHOD_STYLES[m]) for m in methods)
    ]
    cited = {third_party(source) for pair in pairs for m in methods for source, _ in data.published[pair].get(m, ())}
    for reproduction, (marker, label) in PUBLISHED_MARKERS.items():
        if reproduction in cited:
            handles.append(Line2D([], [], color="black", marker=marker, markersize=11, linestyle="none",
                                  markerfacecolor="none", label=label))  # fmt: skip
    figure.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
    title = "MAXL, Figure 3: test accuracy of the primary task, CIFAR-100 hierarchy"
    characters = int(9 * figure.get_figwidth())  # what a line of the title's font holds
    note = f"\n{textwrap.fill(data.note, width=characters)}" if data.note else ""
    figure.suptitle(title + note, color="firebrick" if data.note else None)
    return figure


# A paper's figure is a star; a third-party reproduction's (a source that says it is one) a triangle.
PUBLISHED_MARKERS = {False: ("*", "published figure"), True: ("^", "third-party reproduction")}


def third_party(source: str) -> bool:
    return "a reproduction" in source


def draw_finals(ax: Axes, data: FigureData, methods: Sequence[str]) -> None:
    """Per pair a point per method, its published figures beside it as stars (a reproduction's as triangles)."""
    pairs = list(data.curves)
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        color, marker, _ = METHOD_STYLES[method]
        x_of = {pair: j + (i - (len(methods) - 1) / 2) * width for j, pair in enumerate(pairs)}
        finals = {pair: [last_epochs_mean(c) for c in data.curves[pair].get(method) or []] for pair in pairs}
        shown_pairs = [pair for pair in pairs if finals[pair]]
        means = [statistics.fmean(finals[pair]) for pair in shown_pairs]
        # one seed has no spread: NaN draws no bar (0 would draw its caps across the point)
        stds = [statistics.stdev(finals[pair]) if len(finals[pair]) > 1 else math.nan for pair in shown_pairs]
        style = dict(color=color, marker=marker, linestyle="none", markerfacecolor="none", label=METHODS[method])
        ax.errorbar([x_of[pair] for pair in shown_pairs], means, yerr=stds, capsize=3, markersize=7, **style)
        for pair in pairs:
            for source, value in data.published[pair].get(method, ()):
                marker = PUBLISHED_MARKERS[third_party(source)][0]
                ax.plot(x_of[pair], value, marker=marker, markersize=11, color=color, markerfacecolor="none",
                        linestyle="none", gid="published")  # fmt: skip
    ax.set_xticks(range(len(pairs)), [f"{p} → {a}" for p, a in pairs])
    ax.set_xlim(-0.5, len(pairs) - 0.5)
    ax.set_title(f"final: mean of the last {LAST_EPOCHS} epochs, ± std over seeds", fontsize="medium")
    ax.set(xlabel="primary → auxiliary level", ylabel="test accuracy (%)")
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
        ax.plot(epochs, means, color=color, marker=marker, linestyle=linestyle, label=METHODS[method],
                markevery=((i * every) // len(methods), every), **nested(i))  # fmt: skip
        if len(seed_curves) > 1:
            low, high = [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)]
            ax.fill_between(epochs, low, high, color=color, alpha=0.15, linewidth=0)
    margin = max(0.5, 0.03 * longest)  # a single epoch is a marker in the middle of its panel
    ax.set_xlim(1 - margin, longest + margin)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # 1 or 2 epochs: no epoch 1.5
    ax.set(title=f"primary {pair[0]}, auxiliary {pair[1]}", xlabel="epoch", ylabel="test accuracy (%)")
    ax.grid(alpha=0.3)


def mean_curve(seed_curves: Sequence[Sequence[float]]) -> tuple[list[int], list[float], list[float]]:
    """Per epoch, the mean and standard deviation over the seeds that reached it (0 where only one did)."""
    by_epoch = [[c[e] for c in seed_curves if len(c) > e] for e in range(max(map(len, seed_curves)))]
    means = [statistics.fmean(values) for values in by_epoch]
    return list(range(1, len(by_epoch) + 1)), means, [statistics.stdev(v) if len(v) > 1 else 0.0 for v in by_epoch]


# ---------------------------------------------------------------------------------------------
# Command line


def command_line() -> runner.OneLineParser:
    methods = f"comma list of {', '.join(METHODS)} (default: %(default)s, the paper's Figure 3)"
    pairs = "comma list of primary-auxiliary level pairs (default: all six)"
    selection = {
        "--methods": (",".join(DEFAULT_METHODS), methods),
        "--pairs": (",".join(f"{p}-{a}" for p, a in PAIRS), pairs),
    }
    description = __doc__.split("\n\n")[0]
    parser, subcommand = runner.tool_parser(
        "figure3.py", description, FIGURE3_FLAGS_HELP, selection, REPORT_FOLDER, REPORT_FILES, "the table"
    )
    no_figure = "only the table and report.md (no matplotlib needed)"
    subcommand["report"].add_argument("--no-figure", dest="figure", action="store_false", help=no_figure)
    return parser


def figure3_grid(args: argparse.Namespace, script_flags: tuple[str, ...]) -> runner.Grid:
    methods, pairs, seeds = runner.parse_methods(args.methods), parse_pairs(args.pairs), runner.parse_seeds(args.seeds)
    selection = Selection(methods, pairs, seeds, args.results_dir, script_flags)
    return runner.Grid(
        "figure3.py", REPORT_FOLDER, REPORT_FILES, build_grid(selection), script_flags,
        table=lambda runs, states, notes: report_table(selection, runs, states, notes),
        write=lambda runs, states, table: report_files(selection, runs, states, table, draw=args.figure),
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    runner.tool_main(argv, command_line(), figure3_grid)


if __name__ == "__main__":
    main()
