"""Keep the model code that the scripts copy from one another identical to its source.

Each model_vgg_*.py reads alone, so the model code a reader needs beside a method (the VGG-16 trunk, the
heads, the focal loss; what WAMAL takes from MAXL) is copied into every script that uses it, and each copy is
marked on the line above it with the script it was copied from:

    # Copied from model_vgg_single.py
    class VGGTrunk(nn.Module):

The source is the definition of the same name in that script, which must not be a marked copy itself (point
the mark at the original). Edit the original, then

    python tools/check_copies.py           # change nothing; exit 1 naming every copy that differs (or --check)
    python tools/check_copies.py --fix     # rewrite every copy from its source; prints what changed

The test suite runs the check. The run machinery is not copied: it lives once, in experiment.py.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPTS_GLOB = "model_vgg_*.py"
MARK = re.compile(r"# Copied from (\S+\.py)$")
FIX_COMMAND = "python tools/check_copies.py --fix"


class CopyError(Exception):
    """A mark that cannot be followed: its source script or definition does not exist, or is itself a copy."""


@dataclass
class Definition:
    """A top-level statement of a script: its name, its lines [start, stop) and the script its mark names."""

    name: str
    start: int
    stop: int
    text: str
    copied_from: str | None


def definitions(path: Path) -> dict[str, Definition]:
    """The script's top-level definitions (functions, classes, assigned names) by name."""
    source = path.read_text()
    lines = source.splitlines(keepends=True)
    found = {}
    for node in ast.parse(source, filename=str(path)).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            name = node.name
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            name = node.target.id
        else:
            continue
        start = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))]) - 1
        mark = MARK.fullmatch(lines[start - 1].strip()) if start > 0 else None
        text = "".join(lines[start : node.end_lineno])
        found[name] = Definition(name, start, node.end_lineno, text, mark.group(1) if mark else None)
    return found


def copies(repo: Path) -> list[tuple[Path, Definition, Definition]]:
    """(script, copy, source) for every marked copy in the repository's model scripts."""
    scripts = {path.name: definitions(path) for path in sorted(repo.glob(SCRIPTS_GLOB))}
    out = []
    for name, defs in scripts.items():
        for copy in defs.values():
            if copy.copied_from is None:
                continue
            where = f"{name}: {copy.name} is marked as copied from {copy.copied_from}"
            if copy.copied_from not in scripts:
                raise CopyError(f"{where}, which is not a model script in {repo}")
            source = scripts[copy.copied_from].get(copy.name)
            if source is None:
                raise CopyError(f"{where}, which defines no {copy.name}")
            if source.copied_from is not None:
                raise CopyError(f"{where}, where it is a copy from {source.copied_from}: mark it with that one")
            out.append((repo / name, copy, source))
    return out


def check(repo: Path = REPO) -> list[str]:
    """One line per copy that differs from its source; empty when every copy agrees."""
    return [
        f"{path.name}: {copy.name} differs from {copy.copied_from}"
        for path, copy, source in copies(repo)
        if copy.text != source.text
    ]


def fix(repo: Path = REPO) -> list[str]:
    """Rewrite every copy that differs from its source; one line per script changed."""
    changed: dict[Path, list[tuple[Definition, Definition]]] = {}
    for path, copy, source in copies(repo):
        if copy.text != source.text:
            changed.setdefault(path, []).append((copy, source))
    for path, pairs in changed.items():
        lines = path.read_text().splitlines(keepends=True)
        for copy, source in sorted(pairs, key=lambda pair: pair[0].start, reverse=True):  # spans above stay valid
            lines[copy.start : copy.stop] = source.text.splitlines(keepends=True)
        path.write_text("".join(lines))
    return [f"{path.name}: rewrote {', '.join(copy.name for copy, _ in pairs)}" for path, pairs in changed.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="change nothing, only compare (the default)")
    mode.add_argument("--fix", action="store_true", help="rewrite the copies that differ from their source")
    parser.add_argument("--repo", type=Path, default=REPO, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        if args.fix:
            for line in fix(args.repo) or ["every copy already equals its source"]:
                print(line)
            return 0
        problems = check(args.repo)
    except CopyError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for line in problems:
        print(line)
    if problems:
        print(f"edit the original, then run `{FIX_COMMAND}` to copy it into every marked copy")
        return 1
    print(f"every marked copy in {SCRIPTS_GLOB} equals its source")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
