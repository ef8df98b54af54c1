"""CI is a newcomer: `.ci/run` makes a venv of its own and runs exactly the README's install and test commands."""
from __future__ import annotations

import re

from tests.support.processes import ROOT


def fenced_lines(markdown: str) -> set[str]:
    """Every line inside a fenced shell block of a markdown page."""
    blocks = re.findall(r"^```(?:bash|sh|console)\n(.*?)^```", markdown, flags=re.S | re.M)
    return {line.strip() for block in blocks for line in block.splitlines() if line.strip()}


def test_ci_runs_the_readme_commands_in_a_venv_of_its_own() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    commands = [line for line in script.splitlines() if line and not line.startswith((" ", "#", "\t", "}"))]
    venv = [line for line in commands if "-m venv" in line]
    assert venv == ["python3 -m venv --clear .venv"], venv  # afresh every run: nothing from an earlier one
    assert ". .venv/bin/activate" in commands and "--system-site-packages" not in script
    readme = fenced_lines((ROOT / "README.md").read_text())
    after = commands[commands.index(". .venv/bin/activate") + 1:]
    assert after and after[0].startswith("pip install -c constraints.txt") and "pytest" in after[-1]
    assert [line for line in after if line not in readme] == []  # each of them, word for word, in the README
