"""Keep the model code that the scripts copy from one another identical to its source.

Each model_vgg_*.py reads alone, so the model code a reader needs beside a method (the VGG-16 trunk, the
heads, the focal loss; what WAMAL takes from MAXL) is copied into every script that uses it, and each copy is
marked on the line above it with the script it was copied from:

    # Copied from model_vgg_single.py
    class Trunk(nn.Module):

A mark may sit above a definition at any depth (a method, a function inside a function): the source is the
definition of the same qualified name (`Trunk.features`) in the script the mark names, which must not be a
marked copy itself (point the mark at the original). A mark above anything but a definition is refused.
Edit the original, then

    python tools/check_copies.py           # change nothing; exit 1 naming every copy that differs (or --check)
    python tools/check_copies.py --fix     # rewrite every copy from its source; prints what changed

The test suite runs the check. The run machinery is not copied: it lives once, in experiment.py.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPTS_GLOB = "model_vgg_*.py"
MARK = re.compile(r"# Copied from (\S+\.py)$")
FIX_COMMAND = "python tools/check_copies.py --fix"


class CopyError(Exception):
    """A mark that cannot be followed: not above a definition, or its source script or definition does not exist,
    or is itself a copy."""


@dataclass
class Definition:
    """A definition of a script at any depth: its qualified name, its lines [start, stop), its text (dedented) and
    indentation, and the script its mark names."""

    name: str
    start: int
    stop: int
    text: str
    indent: str
    copied_from: str | None


def definitions(path: Path) -> dict[str, Definition]:
    """The script's definitions (functions, classes, assigned names) at any depth, by qualified name (`f`,
    `Class.method`, `f.inner`). CopyError for a mark that is not on the line above a definition."""
    source = path.read_text()
    lines = source.splitlines(keepends=True)
    found, marked_lines = {}, set()

    def visit(body: list[ast.stmt], prefix: str, in_function: bool) -> None:
        for node in body:
            name, assigned = None, not in_function  # a function's own variables are not definitions
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = node.name
            elif assigned and isinstance(node, ast.Assign) and len(node.targets) == 1:
                name = node.targets[0].id if isinstance(node.targets[0], ast.Name) else None
            elif assigned and isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                name = node.target.id
            if name is not None:
                start = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))]) - 1
                mark = MARK.fullmatch(lines[start - 1].strip()) if start > 0 else None
                if mark:
                    marked_lines.add(start - 1)
                text = "".join(lines[start : node.end_lineno])
                indent = text[: len(text) - len(text.lstrip(" "))]
                found[prefix + name] = Definition(
                    prefix + name,
                    start,
                    node.end_lineno,
                    textwrap.dedent(text),
                    indent,
                    mark.group(1) if mark else None,
                )
            for child in ("body", "orelse", "finalbody", "handlers"):  # definitions inside, at any depth
                inner = getattr(node, child, None)
                if isinstance(inner, list) and inner and isinstance(inner[0], ast.stmt | ast.ExceptHandler):
                    function = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                    visit([n for item in inner for n in (item.body if isinstance(item, ast.ExceptHandler) else [item])],
                          prefix + name + "." if name is not None else prefix, function)  # fmt: skip

    visit(ast.parse(source, filename=str(path)).body, "", False)
    for number, line in enumerate(lines):
        if MARK.fullmatch(line.strip()) and number not in marked_lines:
            raise CopyError(
                f"{path.name}, line {number + 1}: the mark is not on the line above a definition; mark whole "
                "functions, classes or names only"
            )
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
    """Rewrite every copy that differs from its source (at the copy's own indentation); one line per script."""
    changed: dict[Path, list[tuple[Definition, Definition]]] = {}
    for path, copy, source in copies(repo):
        if copy.text != source.text:
            changed.setdefault(path, []).append((copy, source))
    for path, pairs in changed.items():
        # A copy inside another copy being rewritten is rewritten with it.
        pairs[:] = [p for p in pairs if not any(o.start < p[0].start and p[0].stop <= o.stop for o, _ in pairs)]
        lines = path.read_text().splitlines(keepends=True)
        for copy, source in sorted(pairs, key=lambda pair: pair[0].start, reverse=True):  # spans above stay valid
            lines[copy.start : copy.stop] = textwrap.indent(source.text, copy.indent).splitlines(keepends=True)
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
