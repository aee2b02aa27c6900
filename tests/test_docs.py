"""The documentation runs: every ```python block of README.md and docs/*.md, and the
demo behind `make demo`."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def _blocks():
    for path in DOCS:
        for n, code in enumerate(BLOCK.findall(path.read_text())):
            yield pytest.param(code, id=f"{path.name}-{n}")


@pytest.mark.parametrize("code", list(_blocks()))
def test_documentation_example_runs(code):
    # A fresh namespace per block: each example must stand on its own.
    exec(compile(code, "<doc example>", "exec"), {"__name__": "__doc_example__"})


def test_readme_has_the_two_commands_and_examples():
    text = (ROOT / "README.md").read_text()
    assert "make run" in text and "make test" in text
    assert len(BLOCK.findall(text)) >= 3


def test_demo_prints_the_five_steps(capsys):
    import numpy as np

    from jattn import demo

    before = np.get_printoptions()
    demo.main()
    assert np.get_printoptions() == before  # no global state left behind
    printed = capsys.readouterr().out
    for step in ("1. attention scores", "2-3. normalised scores", "4. context vectors", "5. updated sequence"):
        assert step in printed
    assert "row sums: [1. 1. 1. 1.]" in printed
