"""Griffe extension for fmjax's site: two habits of fmjax's docstrings, rendered as their authors meant.

- Doctests (``>>>`` lines and their expected output) stand in the running text, where Markdown would read
  ``>>>`` as nested quotes: each block, from its first ``>>>`` line to the next blank line, is put in a
  ``pycon`` fence.
- Parameters that share a description are listed together (``rtol, atol: tolerances ...``), which the
  Google-style parser would read as one parameter named "rtol, atol": each name gets its own entry with
  the shared description, so its type comes from the signature like any other.

Only the copy that griffe renders changes; the docstrings themselves stay as written (pytest runs them).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_NAMED_SECTIONS = re.compile(
    r"(Args|Arguments|Params|Parameters|Keyword Args|Keyword Arguments|Other Parameters|Attributes):\s*$"
)
_GROUPED_ITEM = re.compile(r"(?P<names>\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)+)(?P<rest>\s*(\([^)]*\))?:(\s.*)?)$")


def fence_doctests(text: str) -> str:
    """``text`` with every unindented doctest block (``>>>`` up to a blank line) in a ``pycon`` fence.

    Blocks inside an existing fence, or indented (e.g. under an ``Examples:`` section, which griffe
    handles itself), are left as they are.
    """
    out: list[str] = []
    in_fence = in_doctest = False
    for line in text.splitlines():
        if in_doctest and not line.strip():
            out.append("```")
            in_doctest = False
        elif not in_doctest and not in_fence and line.startswith(">>>"):
            if out and out[-1].strip():
                out.append("")
            out.append("```pycon")
            in_doctest = True
        elif not in_doctest and line.lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence
        out.append(line)
    if in_doctest:
        out.append("```")
    return "\n".join(out)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def split_grouped_names(text: str) -> str:
    """``text`` with each ``a, b: description`` item of a parameter or attribute section repeated as
    ``a: description`` and ``b: description`` (continuation lines included)."""
    lines = text.splitlines()
    out: list[str] = []
    section_indent = item_indent = None
    at = 0
    while at < len(lines):
        line = lines[at]
        if line.strip() and section_indent is not None and _indent(line) <= section_indent:
            section_indent = item_indent = None  # a line at the header's level ends the section
        if section_indent is None:
            if _NAMED_SECTIONS.fullmatch(line.strip()):
                section_indent = _indent(line)
            out.append(line)
            at += 1
            continue
        if line.strip() and item_indent is None:
            item_indent = _indent(line)
        match = _GROUPED_ITEM.fullmatch(line.strip()) if line.strip() else None
        if match is None or _indent(line) != item_indent:
            out.append(line)
            at += 1
            continue
        end = at + 1  # the item's continuation lines are indented further
        while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > item_indent):
            end += 1
        while end > at + 1 and not lines[end - 1].strip():
            end -= 1
        for name in re.split(r"\s*,\s*", match["names"]):
            out.append(" " * item_indent + name + match["rest"])
            out.extend(lines[at + 1 : end])
        at = end
    return "\n".join(out)


class FmjaxDocstrings(griffe.Extension):
    """Fence the doctests and split the grouped parameters of every docstring."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        docstring = obj.docstring
        if docstring is None:
            return
        value = split_grouped_names(docstring.value)
        if ">>>" in value:
            value = fence_doctests(value)
        docstring.value = value
