"""Every command in README.md and docs/*.md runs as written, and shows what it really prints.

Each page is read block by block (tests/support/doc_blocks.py). A bash, console or python block is run here
unless the line before it says `<!-- not run: REASON -->`; a block of any other language must be one this
test knows (toml, json, text), so a page cannot grow a command nobody runs. How each kind is checked:

- bash: each command runs in one bash session per page (tests/support/doc_shell.py), in order, as a reader
  types them (exports and files carry on), and must exit 0.
- console: each `$ COMMAND` runs the same way, and what it prints (stdout and stderr) must be what the page
  shows under it, after `normalise()`; a line `...` stands for any lines.
- A command that serves (`gunicorn ...`, or `api-buddy` without a COMMAND) runs in the background: the page
  goes on once the server answers HTTP, after its start-up log showed that every mapping points at the local
  stub. One server at a time, as in one terminal: once a new one answers, the one before gets SIGTERM (the
  reader's Ctrl-C); each gets a free port, so they never meet on one.
- python: runs with the session's python3, and must exit 0; a text block right after it (only blank lines
  between) is its output, compared as for console.
- toml: must be a valid configuration (buddy.settings.validate_config).
- json, text: data or output, never commands (a `$ ` line in one fails the test).

Besides: the README starts with its quick start, in order; an example that listens on 0.0.0.0 requires the
access key in the same block; every link between the pages reaches a file, and a heading there; the lists of
settings in docs/configuration.md are what the settings' declarations make (`api-buddy check-config --reference`).

A page that starts with `<!-- setup: the README's quick start -->` is run in a session that has first done
the README's quick start (its blocks up to and including the first request): buddy.toml written, the proxy
serving it, one answer cached.

Everything this test changes is said here and in the constants below (INSTALLED, DOC_PORTS, UPSTREAMS,
DOC_REDIS_URL, LOOPBACK) and session_env():
- the install lines (INSTALLED) are not run: the environment running this test is that install (the project
  editable, with its dev extras), and its bin folder comes first on the session's PATH;
- the ports a page uses (DOC_PORTS) become free ones; a server command that names no port gets one
  (`--port N`, `-b 127.0.0.1:N`), for the default 8080;
- the upstream URLs (UPSTREAMS) become the local upstream stub (tests/support/upstream_stub.py), so nothing
  reaches the internet; an address to listen on beyond loopback, 0.0.0.0, becomes 127.0.0.1;
- the Redis URL of the external-Redis examples becomes this test's redis-server;
- HOME, XDG_DATA_HOME and XDG_RUNTIME_DIR are folders of the test (the embedded Redis's data lives there);
  nothing from the caller's environment but the locale; WEB_CONCURRENCY=1, so each server boots one worker;
- the clone is a folder of the test with links to the clone's wsgi.py, gunicorn.conf.py and deploy/ (files a
  page writes land there, not in the clone).
"""
from __future__ import annotations

import contextlib
import re
import sys
import time
from pathlib import Path
from typing import Iterator

import psutil
import pytest
import requests

from buddy.settings import tomllib, validate_config
from buddy.settings.reference import PARTS
from tests.support.doc_blocks import Block, Command, console_commands, read_blocks, shell_commands, strip_comment
from tests.support.doc_shell import Shell
from tests.support.ports import free_port
from tests.support.processes import ROOT
from tests.support.upstream_stub import UpstreamStub

INSTALLED = ("python3 -m venv .venv && . .venv/bin/activate", "pip install -c constraints.txt -e .")
DOC_PORTS = ("8080", "8081", "9000")  # 8080 is also where a server that names no port listens
UPSTREAMS = ("https://api.conceptnet.io", "https://www.wikidata.org", "https://lookup.dbpedia.org",
             "https://query.wikidata.org")
DOC_REDIS_URL = "redis://127.0.0.1:6379/0"
LOOPBACK = ("0.0.0.0", "127.0.0.1")  # never listen beyond loopback
SETUP = "<!-- setup: the README's quick start -->"
RUN = {"bash", "sh", "console", "python"}
SHOWN = {"json", "text"}
KNOWN = RUN | SHOWN | {"toml"}
PAGES = ["README.md", *sorted(f"docs/{path.name}" for path in (ROOT / "docs").glob("*.md"))]


def blocks(page: str) -> list[Block]:
    return read_blocks(ROOT / page, page)


def runnable(block: Block) -> bool:
    return block.lang in RUN and block.not_run is None


def quick_start() -> list[Block]:
    """The README's blocks up to and including the first request (the first console block)."""
    found: list[Block] = []
    for block in blocks("README.md"):
        found.append(block)
        if block.lang == "console":
            return found
    raise AssertionError("README.md: no first request (a console block) found")


def session_env(tmp_path: Path) -> dict[str, str]:
    for name in ("home", "xdg-data", "xdg-runtime"):
        (tmp_path / name).mkdir()
    return {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "LANG": "C.UTF-8",
        "HOME": str(tmp_path / "home"), "XDG_DATA_HOME": str(tmp_path / "xdg-data"),
        "XDG_RUNTIME_DIR": str(tmp_path / "xdg-runtime"), "WEB_CONCURRENCY": "1",
    }


def serves(command: str) -> bool:
    """Is this a command that serves until stopped: gunicorn, or api-buddy with no COMMAND?"""
    words = strip_comment(command).split()
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", words[0]):
        words.pop(0)  # VAR=value prefixes
    if not words or words[0] not in ("gunicorn", "api-buddy"):
        return False
    if words[0] == "gunicorn":
        return True
    takes_value = {"--config", "--host", "--port", "--log-level", "--workers", "--threads"}
    rest = iter(words[1:])
    for word in rest:
        if word in takes_value:
            next(rest, None)
        elif not word.startswith("-") or word in ("--help", "--version"):
            return False  # a COMMAND: it runs and ends
    return True


def normalise(text: str) -> str:
    """What may differ from run to run: carriage returns, trailing spaces, Age values, log timestamps."""
    text = text.replace("\r", "")
    text = re.sub(r"(?mi)^(age: )\d+$", r"\1N", text)
    text = re.sub(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}", "TIME", text)
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


def matches(shown: str, printed: str) -> bool:
    """Whether `printed` is what the page shows; a shown line `...` stands for any lines (none included)."""
    if not shown:
        return printed == ""
    pattern = "".join("(?:.*\n)*?" if line == "..." else re.escape(line) + "\n" for line in shown.splitlines())
    return re.fullmatch(pattern, printed + "\n") is not None


class PageRun:
    """One page's commands in one session, with the substitutions above."""

    def __init__(self, page: str, tmp_path: Path, stub: UpstreamStub, redis_url: str) -> None:
        self.page, self.tmp_path, self.stub, self.redis_url = page, tmp_path, stub, redis_url
        clone = tmp_path / "clone"
        clone.mkdir()
        for name in ("wsgi.py", "gunicorn.conf.py", "deploy"):
            (clone / name).symlink_to(ROOT / name)
        self.env = session_env(tmp_path)
        self.shell = Shell(clone, self.env)
        self.ports = {port: free_port() for port in DOC_PORTS}
        self.served = 0

    def substitute(self, text: str) -> str:
        text = text.replace(DOC_REDIS_URL, self.redis_url)
        for upstream in UPSTREAMS:
            text = text.replace(upstream, self.stub.url)
        text = text.replace(*LOOPBACK)
        for doc, real in self.ports.items():
            text = re.sub(rf"(?<![0-9]){doc}(?![0-9])", str(real), text)
        return text

    def printed(self, text: str) -> str:
        """Output as the page would show it: the real ports and home folder back to the page's."""
        for doc, real in self.ports.items():
            text = re.sub(rf"(?<![0-9]){real}(?![0-9])", doc, text)
        return normalise(text.replace(self.env["HOME"], "~"))

    def run(self, block: Block, shown: Block | None = None) -> None:
        """Run a block; `shown`: the output a python block is shown to print."""
        if block.lang == "python":
            code = self.substitute(block.text)
            status, output = self.shell.run(f"python3 - <<'__PYTHON__'\n{code}__PYTHON__")
            assert status == 0, f"{block.where}: the python block exited {status}:\n{output}"
            if shown is not None:
                printed, expected = self.printed(output), normalise(shown.text)
                assert matches(expected, printed), f"{block.where}\nthe page shows:\n{expected}\nit printed:\n{printed}"
            return
        for command in console_commands(block) if block.lang == "console" else shell_commands(block):
            self.command(command)

    def command(self, command: Command) -> None:
        if command.text.strip() in INSTALLED:
            return  # this test runs in the installed environment
        where = f"{command.block.where if command.block else self.page}: {command.text.splitlines()[0]}"
        began = time.monotonic()
        status, output = self.serve(command) if serves(command.text) else self.shell.run(self.substitute(command.text))
        print(f"{time.monotonic() - began:6.2f} s  {where}")  # pytest shows it for a failed test
        if command.shown is not None:
            printed, shown = self.printed(output), normalise(command.shown)
            assert matches(shown, printed), f"{where}\nthe page shows:\n{shown}\nit printed:\n{printed}"
        else:
            assert status == 0, f"{where}\nexited {status}:\n{output}"

    def serve(self, command: Command) -> tuple[int, str]:
        """Start a server in the background; (0, its log so far) once it answers, or (its exit status, its output)
        if it ends first. The one before is stopped once this one answers (and only waited for when the page
        ends): never side by side on a port, since each gets a free one, and the built-in Redis they may share
        is never left by its last user while the next is still starting."""
        before = list(self.shell.servers)
        text = command.text
        named = [port for port in DOC_PORTS if re.search(rf"(?<![0-9]){port}(?![0-9])", text)]
        doc_port = named[0] if named else "8080"
        self.ports[doc_port] = port = free_port()
        real = self.substitute(strip_comment(text))
        if not named:
            real += f" --port {port}" if " api-buddy" in f" {real}" else f" -b 127.0.0.1:{port}"
        self.served += 1
        log = self.tmp_path / f"server-{self.served}.log"
        pid = self.shell.start(real, log)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if not self.shell.alive(pid):
                self.shell.signal_servers(before)
                return self.shell.status(pid), log.read_text(errors="replace")
            try:
                requests.get(f"http://127.0.0.1:{port}/admin/health", timeout=5)
                break
            except requests.RequestException:
                time.sleep(0.1)
        else:
            raise AssertionError(f"{command.text}: nothing answered on {port} within 60 s:\n{log.read_text()}")
        started = log.read_text(errors="replace")
        mapped = re.findall(r"mapping /\S+/ -> (\S+)", started)
        assert mapped and all(url.startswith(self.stub.url) for url in mapped), (
            f"{command.text}: a mapping that is not the local stub would reach the internet:\n{started}")
        self.shell.signal_servers(before)
        return 0, started

    def close(self) -> None:
        """Stop the session and its servers; a built-in Redis that outlives them all is a bug of the proxy's."""
        self.shell.stop()
        left = [process for process in psutil.process_iter(["cmdline"])
                if str(self.tmp_path) in " ".join(process.info["cmdline"] or ())]
        for process in left:
            with contextlib.suppress(psutil.Error):
                process.kill()
        assert not left, f"left running: {[' '.join(process.info['cmdline']) for process in left]}"


@pytest.fixture
def page_run(request: pytest.FixtureRequest, tmp_path: Path, upstream: UpstreamStub,
             redis_url: str) -> Iterator[PageRun]:
    run = PageRun(request.param, tmp_path, upstream, redis_url)
    yield run
    run.close()


def test_every_block_is_run_or_says_why_not() -> None:
    problems = []
    for page in PAGES:
        for block in blocks(page):
            if block.lang not in KNOWN:
                problems.append(f"{block.where}: ```{block.lang or '(no language)'}: use one of {sorted(KNOWN)}")
            elif block.lang in SHOWN and any(line.startswith("$ ") for line in block.text.splitlines()):
                problems.append(f"{block.where}: a command in a {block.lang} block: make it a console block")
            if block.not_run is not None and not block.not_run:
                problems.append(f"{block.where}: `not run:` without a reason")
            if block.not_run is not None and block.lang in SHOWN:
                problems.append(f"{block.where}: a {block.lang} block is never run: drop the `not run` comment")
    assert not problems, "\n".join(problems)


def test_the_readme_starts_with_the_quick_start() -> None:
    """What it is, a venv and the install, a config, the server, a MISS then a HIT, the test command."""
    first = blocks("README.md")[:5]
    assert [block.lang for block in first] == ["bash", "bash", "bash", "console", "bash"], first
    install, config, server, request, tests = first
    assert install.text.splitlines() == list(INSTALLED)
    assert "cat > buddy.toml <<" in config.text and "[domain_mappings." in config.text
    assert [serves(command.text) for command in shell_commands(server)] == [True]
    assert [line for line in request.text.splitlines() if line.startswith("X-Cache")] == ["X-Cache: MISS",
                                                                                          "X-Cache: HIT"]
    assert tests.text.splitlines() == ['pip install -c constraints.txt -e ".[dev]"',
                                       "ruff check . && mypy && python bench/smoke.py && pytest"]
    assert tests.not_run, "the test command runs this very test"


def test_examples_that_listen_beyond_loopback_require_a_key() -> None:
    """An example that serves on 0.0.0.0 shows the access key in the same block."""
    for page in PAGES:
        for block in blocks(page):
            if "0.0.0.0" in block.text:
                assert "require_secure_key = true" in block.text and "BUDDY_SECURE_KEY" in block.text, block.where


def slug(heading: str) -> str:
    """A heading's anchor, as GitHub makes it."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_pages_reach_a_file_and_a_heading() -> None:
    problems = []
    for page in PAGES:
        text = (ROOT / page).read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # a URL
            path, _, anchor = target.partition("#")
            file = ((ROOT / page).parent / path).resolve() if path else ROOT / page
            if not file.exists():
                problems.append(f"{page}: {target}: no such file")
            elif anchor and file.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", file.read_text(), re.MULTILINE)
                if anchor not in {slug(heading) for heading in headings}:
                    problems.append(f"{page}: {target}: no such heading")
    assert not problems, "\n".join(problems)


def test_the_settings_lists_are_the_ones_the_declarations_make() -> None:
    """docs/configuration.md lists every setting (and every variable that sets one) as `api-buddy check-config
    --reference` makes them from the declarations in buddy/settings/: a setting added, renamed, given another
    default or help there and not here fails this test."""
    text = (ROOT / "docs/configuration.md").read_text()
    for name, (heading, make) in PARTS.items():
        between = rf"^<!-- begin: {name}[ ,].*?-->\n\n(.*?)\n<!-- end: {name} -->$"
        found = re.search(rf"^## {re.escape(heading)}\n.*?{between}", text, re.MULTILINE | re.DOTALL)
        assert found, f"docs/configuration.md: no `<!-- begin: {name} ... -->` ... `<!-- end: {name} -->` under " \
                      f"'## {heading}'"
        assert found[1] == make(), (f"docs/configuration.md: the {name} list differs from the declarations; put "
                                    f"what `api-buddy check-config --reference` prints under '## {heading}' "
                                    "between its markers")


def test_toml_blocks_are_valid_configurations() -> None:
    checked = 0
    for page in PAGES:
        for block in blocks(page):
            if block.lang == "toml" and block.not_run is None:
                validate_config(tomllib.loads(block.text))
                checked += 1
    assert checked


@pytest.mark.parametrize("page_run", [page for page in PAGES if any(map(runnable, blocks(page)))],
                         indirect=True)
def test_page_runs_as_written(page_run: PageRun) -> None:
    page = page_run.page
    if (ROOT / page).read_text().startswith(SETUP):
        for block in quick_start():
            if runnable(block):
                page_run.run(block)
    found = blocks(page)
    for block, after in zip(found, [*found[1:], None]):
        if runnable(block):
            prints = after is not None and block.lang == "python" and after.lang == "text" and after.follows_block
            page_run.run(block, after if prints else None)
