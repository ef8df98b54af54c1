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


def test_no_file_of_the_project_holds_a_merge_conflicts_markers() -> None:
    """A merge left `<<<<<<<`, `=======` and `>>>>>>>` lines in a docs page once, where only code was checked."""
    marker = re.compile(rb"^(<{7} |={7}$|>{7} )", re.M)
    skipped = {"build", "dist", "__pycache__", "node_modules"}  # and hidden folders (caches, .git, .venv) but .ci
    text = {".py", ".md", ".toml", ".txt", ".lua", ".html", ".css", ".js", ".json", ".cfg", ".ini", ".conf", ".sh",
            ".service", ".yml", ".yaml", ""}
    left = []
    for path in ROOT.rglob("*"):
        parts = path.relative_to(ROOT).parts
        if any(part in skipped or part.endswith(".egg-info") or (part.startswith(".") and part != ".ci")
               for part in parts[:-1]) or not path.is_file():
            continue
        if path.suffix in text and marker.search(path.read_bytes()):
            left.append(str(path.relative_to(ROOT)))
    assert left == []
