"""Issue 11, items 1-3, as a new user meets them: `pip install .` (not editable) into a fresh venv, then
`api-buddy` from a folder that has nothing to do with the clone. Real processes, 127.0.0.1, data folders
and homes under tmp_path; everything started here is stopped here, and nothing may be left running."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

import psutil
import pytest
import requests

from tests.support.ports import free_port, wait_for_port
from tests.support.processes import ROOT, stop_group
from tests.support.upstream_stub import UpstreamStub

# One venv for the module (`venv_bin`): under pytest-xdist its tests all go to one worker, which builds it once.
pytestmark = pytest.mark.xdist_group("installed-venv")

NOT_THE_SOURCE = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis",
                                        ".buddy-data", ".venv*", "venv")


@pytest.fixture(scope="module")
def venv_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with `pip install <a copy of the project>` (no editable link) into its own site-packages.

    The dependencies are the ones this test run already has: the venv reads the running interpreter's own
    site-packages after its own (a .pth file), whether that interpreter is a venv's or the system's, so the test
    needs no network and stays quick, and pip, setuptools and wheel (the dev extra) come from there too. The
    project itself is a real, non-editable install in the venv's own site-packages, which come first. A copy, so
    that a stale build/ in the work tree cannot slip old files into the wheel, and the install writes nothing
    into the clone."""
    root = tmp_path_factory.mktemp("installed")
    source = root / "source"
    shutil.copytree(ROOT, source, ignore=NOT_THE_SOURCE)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True, timeout=120)
    bin_dir = root / "venv" / "bin"
    ours = subprocess.run([str(bin_dir / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    theirs = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    # Plain paths, appended after the venv's own: the running environment's .pth files (its editable install of
    # the project among them) are not run.
    (Path(ours) / "running-environment.pth").write_text("".join(f"{path}\n" for path in sorted(theirs)))
    pip = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                          "--no-deps", "--no-build-isolation", "--no-index", str(source)], capture_output=True,
                         text=True, timeout=600)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    shutil.rmtree(source)  # the installed copy is all that is left
    return bin_dir


@pytest.fixture(scope="module")
def api_buddy(venv_bin: Path) -> str:
    """The console script, by its full path: never one that PATH finds elsewhere."""
    return str(venv_bin / "api-buddy")


def clean_env(tmp_path: Path, venv_bin: Path | None = None, **variables: str) -> dict[str, str]:
    """An environment of the test's own: no REDIS_URL, BUDDY_* or WEB_CONCURRENCY from the caller's shell, and
    home, XDG folders and gunicorn's control socket under tmp_path. Commands are run by their full path."""
    for name in ("home", "xdg-data", "xdg-runtime"):
        (tmp_path / name).mkdir(exist_ok=True)
    env = {"PATH": f"{venv_bin}:/usr/bin:/bin" if venv_bin else "/usr/bin:/bin", "LANG": "C.UTF-8",
           "HOME": str(tmp_path / "home"), "XDG_DATA_HOME": str(tmp_path / "xdg-data"),
           "XDG_RUNTIME_DIR": str(tmp_path / "xdg-runtime")}
    env.update(variables)
    return env


def left_running(root: Path) -> list[psutil.Process]:
    """Every redis-server working in a folder under `root`, and every keeper (`buddy/keeper.py <folder>`) of one."""
    text, found = str(root.resolve()), []
    for process in psutil.process_iter(["name", "cmdline", "cwd"]):
        info = process.info
        if ("redis-server" in (info["name"] or "") and (info["cwd"] or "").startswith(text)) or (
                "buddy/keeper.py" in " ".join(info["cmdline"] or ()) and text in " ".join(info["cmdline"] or ())):
            try:
                if process.status() != psutil.STATUS_ZOMBIE:
                    found.append(process)
            except psutil.NoSuchProcess:
                pass
    return found


@pytest.fixture
def nothing_left(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    left = left_running(tmp_path)
    for process in left:
        process.kill()
    assert not left, f"left running: {[(p.pid, p.name()) for p in left]}"


class Served:
    """`api-buddy ARGS` in `folder`, output to a file (a leaked server must not hold a pipe), its group stopped."""

    def __init__(self, args: list[str], folder: Path, env: dict[str, str], port: int) -> None:
        self.log_path = folder / f"api-buddy-{port}.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(args, cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{port}"
        try:
            wait_for_port(port, timeout=30, alive=lambda: self.process.poll() is None)
        except Exception:
            self.stop()
            raise AssertionError(f"api-buddy did not start:\n{self.log()}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_group(self.process, timeout=20)


def x_cache(url: str) -> str:
    return requests.get(url, timeout=10, headers={"Connection": "close"}).headers["X-Cache"]


def run(args: list[str], folder: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=folder, env=env, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def no_proxy_message(result: subprocess.CompletedProcess[str], data_dir: Path) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"no proxy is running with the data folder {data_dir}" in result.stderr
    assert "BUDDY_DATA_DIR" in result.stderr and "REDIS_URL" in result.stderr and "--config" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_installed_api_buddy_serves_and_its_commands_act_on_its_cache_only(api_buddy, venv_bin, nothing_left,
                                                                           tmp_path) -> None:
    upstream = UpstreamStub()
    elsewhere = tmp_path / "elsewhere"  # no wsgi.py, no gunicorn.conf.py, no buddy/ here
    elsewhere.mkdir()
    port = free_port()
    (elsewhere / "cfg.json").write_text(json.dumps({"domain_mappings": {"up": {"upstream": upstream.url},
                                                                        "other": {"upstream": upstream.url + "/o"}},
                                                    "server": {"port": port}}))
    data_dir = tmp_path / "data"
    env = clean_env(tmp_path, venv_bin, BUDDY_DATA_DIR=str(data_dir))
    where = run([str(venv_bin / "python"), "-c", "import buddy; print(buddy.__file__)"], elsewhere, env)
    assert where.stdout.startswith(str(venv_bin.parent)), where.stdout + where.stderr  # the installed copy
    proxy = Served([api_buddy, "--config", "cfg.json", "--workers", "2"], elsewhere, env, port)
    try:
        assert [x_cache(f"{proxy.url}/up/a"), x_cache(f"{proxy.url}/up/a")] == ["MISS", "HIT"]
        assert x_cache(f"{proxy.url}/other/b") == "MISS"

        other_dir = tmp_path / "other-data"
        other_env = {**env, "BUDDY_DATA_DIR": str(other_dir)}
        for command in (["clear-cache", "up"], ["stats"], ["key"]):
            no_proxy_message(run([api_buddy, "--config", "cfg.json", *command], elsewhere, other_env), other_dir)
        assert not other_dir.exists(), "a command created the data folder it found no proxy in"
        assert x_cache(f"{proxy.url}/up/a") == "HIT", "a command with another data folder touched the proxy's cache"

        cleared = run([api_buddy, "--config", "cfg.json", "clear-cache", "up"], elsewhere, env)
        assert cleared.returncode == 0 and "up: 1 entries removed" in cleared.stdout, cleared.stderr
        assert x_cache(f"{proxy.url}/up/a") == "MISS"
        assert x_cache(f"{proxy.url}/other/b") == "HIT"  # only that mapping
        stats = run([api_buddy, "--config", "cfg.json", "stats"], elsewhere, env)
        assert stats.returncode == 0 and stats.stdout.split()[:2] == ["domain", "entries"], stats.stderr
    finally:
        proxy.stop()
        upstream.stop()
    log = proxy.log()
    assert "Using worker: buddy.worker.DeadlineWorker" in log and log.count("Booting worker") == 2, log
    assert "Traceback" not in log, log
    assert upstream.paths() == ["/a", "/o/b", "/a"]


def test_flask_buddy_in_the_clone_refuses_a_data_folder_no_proxy_uses(nothing_left, tmp_path) -> None:
    data_dir = tmp_path / "nobody-here"
    env = clean_env(tmp_path, BUDDY_DATA_DIR=str(data_dir))  # `python -m` puts the clone first on sys.path
    for command in (["clear-cache"], ["key"]):
        no_proxy_message(run([sys.executable, "-m", "flask", "buddy", *command], ROOT, env), data_dir)
    assert not data_dir.exists()


def test_a_taken_port_leaves_no_redis_server_behind(api_buddy, venv_bin, nothing_left, tmp_path) -> None:
    env = clean_env(tmp_path, venv_bin, BUDDY_DATA_DIR=str(tmp_path / "data"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with open(tmp_path / "out.log", "wb") as output:  # a file, not a pipe that a leaked server keeps open
            result = subprocess.run([api_buddy, "--port", str(port)], cwd=tmp_path, env=env, stdout=output,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=60,
                                    start_new_session=True)
    log = (tmp_path / "out.log").read_text()
    assert result.returncode != 0 and "Connection in use" in log, log
    assert not left_running(tmp_path), "the failed start left its embedded Redis running"


def test_an_unwritable_home_is_one_line_naming_buddy_data_dir(api_buddy, venv_bin, nothing_left, tmp_path) -> None:
    (tmp_path / "not-a-folder").write_text("")
    home = tmp_path / "not-a-folder" / "home"  # nothing can be created below a file, not even by root
    env = clean_env(tmp_path, venv_bin, HOME=str(home))
    del env["XDG_DATA_HOME"]
    expected = home / ".local" / "share" / "reference-api-buddy"
    for args, folder, run_env, status in (
        ([api_buddy, "--port", str(free_port())], tmp_path, env, 2),
        ([sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{free_port()}", "-w", "1", "wsgi:app"], ROOT, env, 2),
        ([api_buddy, "stats"], tmp_path, env, 1),
    ):
        result = run(args, folder, run_env)
        problems = [line for line in result.stderr.splitlines() if "BUDDY_DATA_DIR" in line]
        assert result.returncode == status, result.stderr
        assert len(problems) == 1 and str(expected) in problems[0], result.stderr
        assert "Traceback" not in result.stderr and "ERROR" not in result.stderr, result.stderr
