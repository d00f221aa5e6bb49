"""Checks that the copies across `remote_scripts/<version>/` still equal their sources, and rewrites them with --fix.

Each version folder is self-contained (it is copied next to the weights), so code shared between versions lives in
several places. Two kinds of copy are checked:

- Whole files: `WHOLE_FILES` names files whose source is one version folder's file; every other version folder must
  hold a byte-identical copy.
- Marked definitions: a comment line

      # Copied from remote_scripts/chatglm2-6b/modeling_chatglm.py:RMSNorm

  directly above a `class`, a `def` (above its decorators, if any) or a module-level `NAME = ...` says that the
  definition's text must equal the named definition in that file (path relative to the repository root; a method is
  named `Class.method`). A definition runs from its first decorator to its last line, comments indented inside it
  included. The comparison is textual, so a copied method may sit in a class that differs from its source's.

    python tools/check_copies.py          # check; exits 1 listing each copy that differs, with a diff
    python tools/check_copies.py --fix    # rewrite each copy from its source

Only the standard library is used, so the check runs in well under a second.
"""
import argparse
import ast
import difflib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = "remote_scripts"
# file name -> version folder holding the source; every other version folder must carry an identical copy.
WHOLE_FILES = {
    "kernels.py": "chatglm2-6b",
    "quantization.py": "chatglm2-6b",
}
MARKER = re.compile(r"^(?P<indent>[ \t]*)# Copied from (?P<path>[^\s:]+):(?P<name>[\w.]+)[ \t]*$")
MAX_DIFF_LINES = 40


@dataclass
class Definition:
    name: str  # dotted: Class.method
    start: int  # index of its first line (first decorator)
    end: int  # index one past its last line


@dataclass
class Problem:
    path: str  # the copy, relative to the root
    line: int  # 1-based line of the marker (0 for a whole file)
    message: str
    diff: list = None  # unified diff lines, source -> copy
    fixable: bool = True


def version_folders(root):
    scripts = Path(root) / SCRIPTS
    return sorted(p for p in scripts.iterdir() if p.is_dir() and (p / "__init__.py").is_file())


def definitions(lines):
    """Every class, def (also methods, at any depth of classes) and module-level single-name assignment in the
    source `lines` (as split with keepends), by dotted name."""
    found = {}

    def extend_over_comments(node, start):
        end = node.end_lineno
        indent = len(indent_of(lines[start]))
        j = end
        while j < len(lines):
            stripped = lines[j].strip()
            if not stripped:
                j += 1
                continue
            if stripped.startswith("#") and len(indent_of(lines[j])) > indent:
                end = j = j + 1
                continue
            break
        return end

    def walk(body, prefix):
        for node in body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + node.name
                start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
                found[name] = Definition(name, start, extend_over_comments(node, start))
                if isinstance(node, ast.ClassDef):
                    walk(node.body, name + ".")
            elif not prefix and isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if len(targets) == 1 and isinstance(targets[0], ast.Name):
                    found[targets[0].id] = Definition(targets[0].id, node.lineno - 1, node.end_lineno)

    walk(ast.parse("".join(lines)).body, "")
    return found


def read_lines(path):
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    return lines


def indent_of(line):
    return line[:len(line) - len(line.lstrip(" \t"))]


def reindent(lines, old, new):
    if old == new:
        return list(lines)
    return [new + line[len(old):] if line.startswith(old) else line for line in lines]


def short_diff(expected, actual, source_label, copy_label):
    diff = list(difflib.unified_diff(expected, actual, source_label, copy_label, n=1))
    diff = [line.rstrip("\n") for line in diff]
    if len(diff) > MAX_DIFF_LINES:
        diff = diff[:MAX_DIFF_LINES] + [f"... ({len(diff) - MAX_DIFF_LINES} more diff lines)"]
    return diff


def check_whole_files(root, fix):
    problems = []
    folders = version_folders(root)
    for name, source_version in WHOLE_FILES.items():
        source = Path(root) / SCRIPTS / source_version / name
        if not source.is_file():
            problems.append(Problem(f"{SCRIPTS}/{source_version}/{name}", 0, "source of a whole-file copy is missing",
                                    fixable=False))
            continue
        data = source.read_bytes()
        for folder in folders:
            copy = folder / name
            if copy == source or (copy.is_file() and copy.read_bytes() == data):
                continue
            rel = copy.relative_to(root).as_posix()
            source_rel = source.relative_to(root).as_posix()
            if copy.is_file():
                diff = short_diff(source.read_text(encoding="utf-8").splitlines(keepends=True),
                                  copy.read_text(encoding="utf-8").splitlines(keepends=True), source_rel, rel)
                problems.append(Problem(rel, 0, f"whole file differs from its source {source_rel}", diff))
            else:
                problems.append(Problem(rel, 0, f"whole-file copy of {source_rel} is missing"))
            if fix:
                copy.write_bytes(data)
    return problems


def check_marked_file(root, path, fix, cache):
    """Problems of the marked definitions in `path`; with `fix`, rewrites the differing ones from their sources."""
    rel = path.relative_to(root).as_posix()
    lines = read_lines(path)
    if not any(MARKER.match(line) for line in lines):
        return []
    try:
        by_start = {d.start: d for d in definitions(lines).values()}
    except SyntaxError as err:
        return [Problem(rel, err.lineno or 0, f"cannot be parsed: {err.msg}", fixable=False)]
    problems, replacements = [], []
    covered_until = -1
    for index, line in enumerate(lines):
        match = MARKER.match(line)
        if not match:
            continue
        source_rel, name = match["path"], match["name"]
        copy_def = by_start.get(index + 1)
        if copy_def is not None and indent_of(lines[copy_def.start]) != match["indent"]:
            copy_def = None
        if copy_def is None:
            problems.append(Problem(rel, index + 1, f"marker for {source_rel}:{name} is not directly above a class, "
                                    "def or NAME = ... at its indentation", fixable=False))
            continue
        label = f"{copy_def.name} (copied from {source_rel}:{name})"
        if index < covered_until:
            problems.append(Problem(rel, index + 1, f"{label}: marker inside a definition that is itself a copy",
                                    fixable=False))
            continue
        covered_until = copy_def.end
        source = Path(root) / source_rel
        if not source.is_file():
            problems.append(Problem(rel, index + 1, f"{label}: source file not found", fixable=False))
            continue
        if source not in cache:
            source_lines = read_lines(source)
            try:
                cache[source] = (source_lines, definitions(source_lines))
            except SyntaxError as err:
                cache[source] = (source_lines, {})
                problems.append(Problem(rel, index + 1, f"{label}: the source cannot be parsed ({err.msg}, line "
                                        f"{err.lineno})", fixable=False))
                continue
        source_lines, source_defs = cache[source]
        if name not in source_defs:
            problems.append(Problem(rel, index + 1, f"{label}: no such definition in the source", fixable=False))
            continue
        source_def = source_defs[name]
        expected = source_lines[source_def.start:source_def.end]
        actual = lines[copy_def.start:copy_def.end]
        expected = reindent(expected, indent_of(expected[0]), match["indent"])
        if expected != actual:
            diff = short_diff(expected, actual, f"{source_rel}:{name}", f"{rel}:{copy_def.name}")
            problems.append(Problem(rel, index + 1, f"{label}: differs from its source", diff))
            replacements.append((copy_def, expected))
    if fix and replacements:
        for copy_def, expected in sorted(replacements, key=lambda r: r[0].start, reverse=True):
            lines[copy_def.start:copy_def.end] = expected
        path.write_text("".join(lines), encoding="utf-8")
        cache.pop(path, None)
    return problems


def check(root=REPO_ROOT, fix=False):
    """Problems found (a list of Problem). With `fix`, copies are rewritten from their sources, repeatedly, so that a
    copy of a copy is right too; the problems returned are those of the first pass."""
    root = Path(root).resolve()
    first = None
    for _ in range(10):
        cache = {}
        problems = check_whole_files(root, fix)
        for path in sorted((root / SCRIPTS).glob("*/*.py")):
            problems += check_marked_file(root, path, fix, cache)
        if first is None:
            first = problems
        if not fix or not any(p.fixable for p in problems):
            break
    return first


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fix", action="store_true", help="rewrite each differing copy from its source")
    parser.add_argument("--root", default=str(REPO_ROOT), help="repository root (default: this checkout)")
    args = parser.parse_args(argv)
    problems = check(args.root, fix=args.fix)
    for problem in problems:
        where = f"{problem.path}:{problem.line}" if problem.line else problem.path
        state = " (fixed)" if args.fix and problem.fixable else ""
        print(f"{where}: {problem.message}{state}")
        for line in problem.diff or []:
            print("    " + line)
    unfixed = [p for p in problems if not (args.fix and p.fixable)]
    if unfixed:
        fixable = sum(p.fixable for p in unfixed)
        hint = f" ({fixable} fixable with `python tools/check_copies.py --fix`)" if fixable else ""
        print(f"{len(unfixed)} copy problem(s){hint}.")
        return 1
    if problems:
        print(f"Rewrote {len(problems)} copy(ies) from their sources.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
