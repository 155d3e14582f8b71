"""The README's tour is runnable as written."""

import re
from pathlib import Path

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
