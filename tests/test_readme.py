"""The README's tour and the examples in docs/ are runnable as written."""

import doctest
import importlib.util
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_tour_runs():
    text = README.read_text()
    tour = re.search(r"## A short tour\n\n```python\n(.*?)```", text, flags=re.S)
    assert tour, "README lost its tour"
    exec(compile(tour.group(1), "README tour", "exec"), {})


def test_readme_starts_with_the_two_setup_commands():
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]


DOCS = sorted((README.parent / "docs").glob("*.md"))
# A python block preceded by one of these HTML comments is not run, or needs modules.
BLOCK = re.compile(r"(?:<!-- (not run|needs): ([^>]*?) -->\n)?```python\n(.*?)```", flags=re.S)


def test_docs_exist():
    assert DOCS, "docs/ lost its pages"


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_docs_examples_run(page):
    """Every python block of docs/*.md runs as written, in order in one namespace:
    `>>>` blocks as doctests, others as scripts; blocks marked `<!-- needs: mod ... -->`
    skip without those modules, `<!-- not run: why -->` blocks (process groups) never run."""
    if page.name == "text.md":
        pytest.importorskip("tokenizers", reason="docs/text.md's examples need the text extra")
    namespace: dict = {}
    ran = 0
    for i, (tag, what, code) in enumerate(BLOCK.findall(page.read_text())):
        if tag == "not run":
            continue
        missing = [m for m in what.split() if tag == "needs" and importlib.util.find_spec(m) is None]
        if missing:
            continue
        if ">>>" in code:
            test = doctest.DocTestParser().get_doctest(code, namespace, f"{page.name}#{i}", str(page), 0)
            runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
            runner.run(test)
            assert runner.failures == 0, f"{page.name} block {i}: {runner.failures} example(s) failed"
        else:
            exec(compile(code, f"{page.name} block {i}", "exec"), namespace)
        ran += 1
    assert ran, f"{page.name} has no runnable python block"
