"""Keep the parts every model script repeats identical, copied from one canonical script.

Each model_vgg_*.py reads alone, so some code is repeated on purpose in every one of them:
  - the run machinery: everything from the RUN MACHINERY banner to the end of the file;
  - Config's data and run fields: from the line "# --- data and run" to the end of the class;
  - the definitions listed in SHARED_DEFINITIONS (the VGG-16 trunk, the focal loss, `option`).
model_vgg_single.py holds the canonical copy: edit the shared parts there, then

    python tools/sync_shared.py            # copy them into every other model script; prints what changed
    python tools/sync_shared.py model_vgg_maxl.py      # only into the scripts named
    python tools/sync_shared.py --check    # change nothing; exit 1 naming each script and definition that differs

The check also names imports the shared code needs but a script lacks (sync cannot place those: add them
by hand). The test suite runs the same check.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CANONICAL = "model_vgg_single.py"
SCRIPTS_GLOB = "model_vgg_*.py"
BANNER = "# RUN MACHINERY."  # the second line of the banner that opens the machinery block
CONFIG_MARKER = "    # --- data and run"  # the line that opens Config's shared fields
SHARED_DEFINITIONS = (
    "option",
    "conv_block",
    "head",
    "init_weights",
    "VGGTrunk",
    "at_least_float32",
    "focal_terms",
    "focal_loss",
)
SYNC_COMMAND = "python tools/sync_shared.py"


class SharedCodeError(Exception):
    """A script whose shared parts cannot be found (no banner, no Config marker, a missing definition)."""


@dataclass
class Piece:
    """One shared part of a script: its name and its exact text, with the span it occupies."""

    name: str
    start: int  # line index (0-based) of the first line
    stop: int  # line index after the last line
    text: str


def block_start(lines: list[str], path: Path) -> int:
    """Index of the banner's first line (the rule above the BANNER line)."""
    for i, line in enumerate(lines):
        if line.startswith(BANNER):
            return i - 1
    raise SharedCodeError(f"{path.name}: no '{BANNER}' banner; copy the block from {CANONICAL}, banner included")


def top_level_names(node: ast.stmt) -> list[str]:
    """The names a top-level statement defines (for naming what differs)."""
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return [node.name]
    if isinstance(node, ast.Assign):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    if isinstance(node, ast.If):
        return ["if __name__ == '__main__'"]
    return [ast.dump(node)[:40]]


def statement_span(node: ast.stmt) -> tuple[int, int]:
    """(first, after-last) line indices of a statement, decorators included."""
    first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
    return first - 1, node.end_lineno


def pieces(path: Path) -> dict[str, Piece]:
    """The shared parts of one script, by name: each definition, 'Config fields', 'machinery'."""
    source = path.read_text()
    lines = source.splitlines(keepends=True)
    tree = ast.parse(source, filename=str(path))
    start = block_start(lines, path)
    found: dict[str, Piece] = {"machinery": Piece("machinery", start, len(lines), "".join(lines[start:]))}
    for node in tree.body:
        first, stop = statement_span(node)
        if first >= start:
            break
        names = top_level_names(node)
        if names[0] in SHARED_DEFINITIONS:
            found[names[0]] = Piece(names[0], first, stop, "".join(lines[first:stop]))
        if names[0] == "Config":
            marker = next((i for i in range(first, stop) if lines[i].startswith(CONFIG_MARKER)), None)
            if marker is None:
                raise SharedCodeError(
                    f"{path.name}: Config has no '{CONFIG_MARKER.strip()}' line before its shared fields"
                )
            found["Config fields"] = Piece("Config fields", marker, stop, "".join(lines[marker:stop]))
    missing = [name for name in (*SHARED_DEFINITIONS, "Config fields") if name not in found]
    if missing:
        raise SharedCodeError(f"{path.name}: missing {', '.join(missing)}; copy from {CANONICAL}")
    return found


def machinery_statements(text: str) -> dict[str, str]:
    """The machinery block's top-level statements by name, each with its source."""
    lines = text.splitlines(keepends=True)
    out = {}
    for node in ast.parse(text).body:
        first, stop = statement_span(node)
        out[", ".join(top_level_names(node))] = "".join(lines[first:stop])
    return out


def differing_names(canonical: Piece, copy: Piece) -> list[str]:
    """What differs between two versions of a piece, named as precisely as possible."""
    if canonical.name != "machinery":
        return [canonical.name]
    ours, theirs = machinery_statements(canonical.text), machinery_statements(copy.text)
    names = [name if name in theirs else f"{name} (missing)" for name in ours if ours[name] != theirs.get(name)]
    names += [f"{name} (not in {CANONICAL})" for name in theirs if name not in ours]
    if not names:  # same statements, different comments, blank lines or order
        names = ["the machinery block's comments, spacing or order"]
    return [f"machinery: {name}" for name in names]


def imported_names(tree: ast.Module) -> dict[str, str]:
    """name -> the import that binds it, as text ('import json', 'from pathlib import Path')."""
    bound = {}
    for node in tree.body:
        if isinstance(node, ast.Import):
            for alias in node.names:
                name = alias.asname or alias.name.split(".")[0]
                bound[name] = f"import {alias.name}" + (f" as {alias.asname}" if alias.asname else "")
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                bound[alias.asname or alias.name] = f"from {node.module} import {alias.name}" + (
                    f" as {alias.asname}" if alias.asname else ""
                )
    return bound


def missing_imports(canonical: Path, copy: Path, shared_text: str) -> list[str]:
    """Imports of the canonical script that the shared code uses and the copy lacks."""
    wanted = imported_names(ast.parse(canonical.read_text()))
    have = imported_names(ast.parse(copy.read_text()))
    used = {node.id for node in ast.walk(ast.parse(shared_text)) if isinstance(node, ast.Name)}
    return sorted({wanted[name] for name in used if name in wanted and have.get(name) != wanted[name]})


def shared_text(script_pieces: dict[str, Piece]) -> str:
    """The shared code of a script as one parsable text (for the names it uses)."""
    config_fields = "class _ConfigFields:\n" + script_pieces["Config fields"].text
    others = [p.text for name, p in script_pieces.items() if name != "Config fields"]
    return "\n".join([*others, config_fields])


def check(repo: Path = REPO) -> list[str]:
    """One line per script and shared part that differs from the canonical copy; empty when all agree."""
    canonical_path = repo / CANONICAL
    canonical = pieces(canonical_path)
    problems = []
    for path in sorted(repo.glob(SCRIPTS_GLOB)):
        if path.name == CANONICAL:
            continue
        try:
            copy = pieces(path)
        except SharedCodeError as error:
            problems.append(str(error))
            continue
        for name, piece in canonical.items():
            if copy[name].text != piece.text:
                problems += [
                    f"{path.name}: {what} differs from {CANONICAL}" for what in differing_names(piece, copy[name])
                ]
        for line in missing_imports(canonical_path, path, shared_text(canonical)):
            problems.append(f"{path.name}: lacks `{line}`, which the shared code uses; add it to the imports")
    return problems


def sync(repo: Path = REPO, only: list[str] = ()) -> list[str]:
    """Copy every shared part from the canonical script into the others (or those named in `only`).
    Returns what changed, one line per script."""
    canonical = pieces(repo / CANONICAL)
    report = []
    for path in sorted(repo.glob(SCRIPTS_GLOB)):
        if path.name == CANONICAL or (only and path.name not in only):
            continue
        copy = pieces(path)
        lines = path.read_text().splitlines(keepends=True)
        changed = []
        # From the bottom up, so that the spans above stay valid.
        for piece in sorted(copy.values(), key=lambda p: p.start, reverse=True):
            new = canonical[piece.name]
            if new.text != piece.text:
                changed.append(piece.name)
                lines[piece.start : piece.stop] = new.text.splitlines(keepends=True)
        if changed:
            path.write_text("".join(lines))
            report.append(f"{path.name}: updated {', '.join(reversed(changed))}")
        else:
            report.append(f"{path.name}: already in sync")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if any shared part differs")
    parser.add_argument("scripts", nargs="*", help="sync only these model scripts (default: all)")
    parser.add_argument("--repo", type=Path, default=REPO, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = [name for name in args.scripts if not (args.repo / Path(name).name).is_file()]
    if unknown:
        print(f"error: no model script {', '.join(unknown)} in {args.repo}", file=sys.stderr)
        return 2
    only = [Path(name).name for name in args.scripts]
    try:
        if args.check:
            problems = check(args.repo)
            for line in problems:
                print(line)
            if problems:
                print(f"run `{SYNC_COMMAND}` to copy the shared parts from {CANONICAL}")
                return 1
            print(f"every model script's shared parts equal {CANONICAL}'s")
            return 0
        for line in sync(args.repo, only):
            print(line)
        problems = check(args.repo)  # what sync cannot do: imports
        for line in problems:
            print(line)
        return 1 if problems else 0
    except SharedCodeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
