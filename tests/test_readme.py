"""The README's quick start runs, and prints the figures its comments state."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def _quick_start_code() -> str:
    """The Python blocks of the README's "Quick start" section, in order, as one script."""
    text = README.read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2
    return "\n".join(blocks)


def test_quick_start_prints_the_figures_in_its_comments():
    code = _quick_start_code()
    summary = re.search(r"# (\d+ families, total group dimension \d+)", code).group(1)
    stated = dict(re.findall(r"(DDCAdam|AdamW) (\d(?:\.\d+)?e[-+]\d+)", code.split("print(name", 1)[1]))
    assert set(stated) == {"DDCAdam", "AdamW"}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})  # noqa: S102 - our own README
    out = printed.getvalue()
    assert summary in out
    measured = dict(re.findall(r"^(DDCAdam|AdamW) (\S+)$", out, flags=re.M))
    for name, figure in stated.items():
        # one significant digit; rounding-level errors move a little with the machine's BLAS and threads
        ratio = float(measured[name]) / float(figure)
        assert 0.5 <= ratio <= 2.0, (name, measured[name], figure)
