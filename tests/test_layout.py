"""Small files, small functions (STYLE.md, habit 11): a module past ~400 lines or a function
past ~60 is usually two things. Where one really is one thing, a comment says why:

* a file over :data:`FILE_LIMIT` lines carries ``# Long file: <reason>`` in its first
  :data:`HEADER_LINES` lines;
* a function or method over :data:`FUNCTION_LIMIT` lines (``end_lineno - lineno + 1`` of its
  ``def``) carries ``# Long function: <reason>`` in the comment lines right above its ``def``
  (above its decorators, if it has any).

Each test lists every offender at once, so one run shows all that is left to split.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import List

PACKAGE = Path(__file__).resolve().parent.parent / "commcomp"
FILE_LIMIT = 400
FUNCTION_LIMIT = 60
HEADER_LINES = 40
LONG_FILE = "# Long file:"
LONG_FUNCTION = "# Long function:"


def _sources():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, path.read_text(encoding="utf-8")


def _comments_above(lines: List[str], lineno: int) -> List[str]:
    """The block of comment lines right above 1-based line ``lineno``, nearest first."""
    out, i = [], lineno - 2
    while i >= 0 and lines[i].strip().startswith("#"):
        out.append(lines[i].strip())
        i -= 1
    return out


def long_files() -> List[str]:
    """``path: N lines`` for each file over the limit without a reason."""
    found = []
    for path, text in _sources():
        lines = text.splitlines()
        header = lines[:HEADER_LINES]
        if len(lines) > FILE_LIMIT and not any(line.strip().startswith(LONG_FILE) for line in header):
            found.append(f"{path.relative_to(PACKAGE.parent)}: {len(lines)} lines")
    return found


def long_functions() -> List[str]:
    """``path:line name: N lines`` for each function over the limit without a reason."""
    found = []
    for path, text in _sources():
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text, filename=str(path))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            length = node.end_lineno - node.lineno + 1
            if length <= FUNCTION_LIMIT:
                continue
            top = min([node.lineno] + [d.lineno for d in node.decorator_list])
            if any(c.startswith(LONG_FUNCTION) for c in _comments_above(lines, top)):
                continue
            found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}: {length} lines")
    return found


def test_no_file_passes_the_limit_without_a_reason():
    found = long_files()
    assert not found, (f"{len(found)} file(s) over {FILE_LIMIT} lines: split each where it is two things, "
                       f"or write why it is one in a '{LONG_FILE}' comment in its first {HEADER_LINES} "
                       "lines:\n  " + "\n  ".join(found))


def test_no_function_passes_the_limit_without_a_reason():
    found = long_functions()
    assert not found, (f"{len(found)} function(s) over {FUNCTION_LIMIT} lines: split each into named steps, "
                       f"or write why it is one in a '{LONG_FUNCTION}' comment right above its def:\n  "
                       + "\n  ".join(found))


def test_the_checks_find_what_they_look_for(tmp_path):
    """The helpers on a made-up source: a reason above the decorators counts, one elsewhere not."""
    body = "\n".join(f"    x{i} = {i}" for i in range(FUNCTION_LIMIT))
    text = (f"# Long function: a reason\n@staticmethod\ndef ok():\n{body}\n\n"
            f"def bad():\n    # Long function: inside does not count\n{body}\n")
    lines = text.splitlines()
    tree = ast.parse(text)
    flagged = [n.name for n in tree.body
               if not any(c.startswith(LONG_FUNCTION)
                          for c in _comments_above(lines, min([n.lineno] + [d.lineno for d in n.decorator_list])))]
    assert flagged == ["bad"]
