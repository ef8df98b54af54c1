"""The fenced blocks of a markdown page, and the commands in them, as tests/integration/test_docs.py runs them.

A block is what sits between two fences (```lang ... ```), indented fences in list items included; the line
before it may say `<!-- not run: REASON -->`. A text block right after a python block (only blank lines
between) is what that python block prints. A shell block is split into commands a reader would type one by
one: a line, with its backslash continuations and the body of a heredoc it opens; blank and comment lines are
not commands. A console block is `$ COMMAND` lines, each followed by the output it shows.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,})(?P<lang>[^`\s]*)\s*$")
NOT_RUN = re.compile(r"^<!--\s*not run:\s*(?P<reason>.*?)\s*-->$")
HEREDOC = re.compile(r"<<-?\s*(['\"]?)(?P<word>[A-Za-z_][A-Za-z0-9_]*)\1")


@dataclass
class Block:
    """One fenced block: where it starts (`page:line`), its language, its text, and why it is not run, if it
    says so."""

    page: str
    line: int
    lang: str
    text: str
    not_run: str | None = None
    follows_block: bool = False  # only blank lines between this block and the one before it

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


@dataclass
class Command:
    """A command as the page shows it, and the output shown after it (console blocks), None when none is."""

    text: str
    shown: str | None = None
    block: Block | None = field(default=None, repr=False)


def read_blocks(path: Path, name: str) -> list[Block]:
    """Every fenced block of the page, in order."""
    lines = path.read_text().splitlines()
    found: list[Block] = []
    before = ""  # the last non-blank line outside a block
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            if lines[i].strip():
                before = lines[i].strip()
            i += 1
            continue
        indent, ticks = opening["indent"], opening["ticks"]
        body: list[str] = []
        i += 1
        while i < len(lines) and not re.fullmatch(rf"[ \t]*{ticks}\s*", lines[i]):
            line = lines[i]
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
            i += 1
        marker = NOT_RUN.match(before)
        found.append(Block(name, i - len(body), opening["lang"], "\n".join(body) + "\n",
                           marker["reason"] if marker else None, bool(found) and not before))
        before = ""
        i += 1
    return found


def shell_commands(block: Block) -> list[Command]:
    """The commands of a bash/sh block, one per logical line (continuations and heredoc bodies joined)."""
    lines = block.text.splitlines()
    commands: list[Command] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        text = [line]
        while text[-1].endswith("\\") and i < len(lines):
            text.append(lines[i])
            i += 1
        opened = HEREDOC.search(strip_comment("\n".join(text)))
        if opened:
            while i < len(lines):
                text.append(lines[i])
                i += 1
                if text[-1].strip() == opened["word"]:
                    break
        commands.append(Command("\n".join(text), None, block))
    return commands


def console_commands(block: Block) -> list[Command]:
    """The `$ ` commands of a console block, each with the output shown below it ('' when none is)."""
    commands: list[Command] = []
    for line in block.text.splitlines():
        if line.startswith("$ "):
            commands.append(Command(line[2:], "", block))
        elif commands:
            commands[-1].shown = f"{commands[-1].shown}{line}\n"
        elif line.strip():
            raise AssertionError(f"{block.where}: a console block starts with '$ COMMAND', not {line!r}")
    return commands


def strip_comment(command: str) -> str:
    """The command without a trailing `# comment` (a `#` after whitespace, outside quotes), so that words can be
    added after it."""
    quote = ""
    for i, char in enumerate(command):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or command[i - 1].isspace()):
            return command[:i].rstrip()
    return command.rstrip()
