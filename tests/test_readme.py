"""The README's examples run as pasted, so they cannot rot.

Every ```python block runs as a script in a fresh process (with no unused or undefined
names), and every ```python and ```ipython block runs in order as the cells of a notebook in
a real kernel — twice, the second time in a fresh kernel, where the ``%%task`` cell is a hit.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import _kernels
import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
_BLOCK = re.compile(r"^```(python|py|ipython)\n(.*?)^```", re.M | re.S)


def blocks() -> list[tuple[str, str]]:
    """``(language, code)`` of every Python block of the README, in order."""
    return [(m.group(1), m.group(2)) for m in _BLOCK.finditer(README.read_text())]


PYTHON_BLOCKS = [code for lang, code in blocks() if lang in ("python", "py")]


def test_the_readme_shows_python_and_ipython_blocks() -> None:
    langs = [lang for lang, _ in blocks()]
    assert langs[0] == "python" and "ipython" in langs
    # A block that uses IPython syntax must say so, or pasting it into a script fails.
    for code in PYTHON_BLOCKS:
        assert not re.search(r"^\s*%", code, re.M), code


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_block_runs_as_a_script(
    index: int, tmp_path: Path, python_env: dict[str, str]
) -> None:
    code = PYTHON_BLOCKS[index]
    lint = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--select", "F"]
        + ["--stdin-filename", f"readme_block_{index}.py", "-"],
        input=code,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr  # unused imports, undefined names
    for run in ("first", "second"):  # the second run takes its results from the store
        result = subprocess.run(
            [sys.executable, "-"],
            input=code,
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=python_env,
            timeout=300,
        )
        assert result.returncode == 0, (run, result.stdout + result.stderr)
        if index == 0:
            assert result.stdout.strip() == "3 [3, 3, 3]", result.stdout


@pytest.mark.kernel
def test_all_blocks_run_in_order_in_a_kernel(tmp_path: Path, python_env: dict[str, str]) -> None:
    cells = [code for _, code in blocks()]
    for run in ("first", "second"):
        kernel = _kernels.Kernel(python_env, tmp_path)
        try:
            outputs = [_kernels.execute_ok(kernel.kc, code, timeout=300) for code in cells]
        finally:
            kernel.close()
        task_cell = next(i for i, code in enumerate(cells) if code.startswith("%%task"))
        badges = [
            m
            for m in outputs[task_cell]
            if m["msg_type"] == "display_data"
            and m["content"]["metadata"].get("notebook_flow", {}).get("badge") == "cached"
        ]
        printed = "".join(
            m["content"]["text"] for m in outputs[task_cell] if "text" in m["content"]
        )
        assert "'2026-11-01': 3" in printed, (run, printed)
        assert bool(badges) == (run == "second"), (run, outputs[task_cell])
