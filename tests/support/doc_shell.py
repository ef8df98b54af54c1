"""A bash session that stands for a reader's terminal (tests/integration/test_docs.py): commands run in it one
after another, so exports, variables and files carry on from one to the next, as they do for someone who types
a page's commands in order. A server runs in the background as its own process group (`set -m`), its output to
a file; `stop()` ends the servers with SIGTERM (SIGKILL after a while), then the session.
"""
from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import time
import uuid
from pathlib import Path

ASSIGNMENTS = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_]*=\S*\s+)*")


class Shell:
    """`run(command)` -> (status, output with stderr); `start(command, log)` -> pid of a background server."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder = folder
        self.process = subprocess.Popen(
            ["bash", "--noprofile", "--norc"], cwd=folder, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        self._pending = b""
        self.servers: list[int] = []
        self._signalled: set[int] = set()
        self._send("set -m\n")  # job control: each background server gets a process group of its own

    def run(self, command: str, timeout: float = 60.0) -> tuple[int, str]:
        """Run one command in the session (stdin from /dev/null, stderr with stdout) and wait for it."""
        mark = f"__done_{uuid.uuid4().hex}__"
        self._send(f"{{ {command}\n}} </dev/null 2>&1; printf '\\n{mark} %s\\n' \"$?\"\n")
        output, status = self._read_until(mark, timeout)
        return status, output

    def start(self, command: str, log: Path) -> int:
        """Start a server in the background, its output to `log`; its pid is also its process group."""
        mark = f"__pid_{uuid.uuid4().hex}__"
        assigned = ASSIGNMENTS.match(command)
        assert assigned is not None
        exec_command = f"{assigned[0]}exec {command[assigned.end():]}"  # `exec` after any VAR=value prefixes
        self._send(f"{{ {exec_command}\n}} >'{log}' 2>&1 </dev/null &\nprintf '{mark} %s\\n' \"$!\"\n")
        _, pid = self._read_until(mark, 10)
        self.servers.append(pid)
        return pid

    def alive(self, pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    def status(self, pid: int, timeout: float = 20.0) -> int:
        """The exit status of a background server (waits for it to end)."""
        mark = f"__exit_{uuid.uuid4().hex}__"
        self._send(f"wait {pid}; printf '{mark} %s\\n' \"$?\"\n")
        return self._read_until(mark, timeout)[1]

    def signal_servers(self, pids: list[int]) -> None:
        """SIGTERM to each server's group (Ctrl-C, for a reader), without waiting: `stop()` waits for them."""
        for pid in pids:
            if pid in self._signalled:
                continue  # once: a second SIGTERM could cut a shutdown short
            self._signalled.add(pid)
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def stop_servers(self, pids: list[int], timeout: float = 20.0) -> None:
        """SIGTERM to each group side by side, then wait; SIGKILL what outlives `timeout`."""
        self.signal_servers(pids)
        deadline = time.monotonic() + timeout
        for pid in pids:
            while self.alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            try:
                os.killpg(pid, signal.SIGKILL)  # workers that outlived their master, if any
            except ProcessLookupError:
                pass
            if pid in self.servers:
                self.servers.remove(pid)

    def stop(self) -> None:
        """Stop every server still running, then the session itself."""
        self.stop_servers(list(self.servers))
        try:
            self.process.stdin.close()  # type: ignore[union-attr]
            self.process.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        self.process.stdout.close()  # type: ignore[union-attr]

    def _send(self, text: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(text.encode())
        self.process.stdin.flush()

    def _read_until(self, mark: str, timeout: float) -> tuple[str, int]:
        """What the session printed before `mark N`, and N."""
        assert self.process.stdout is not None
        pattern = re.compile(rf"\n?{mark} (\d+)\n".encode())  # the newline run() prints before it
        fd = self.process.stdout.fileno()
        deadline = time.monotonic() + timeout
        while True:
            found = pattern.search(self._pending)
            if found:
                before, self._pending = self._pending[:found.start()], self._pending[found.end():]
                return before.decode(errors="replace"), int(found[1])
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer within {timeout:g} s; so far:\n{self._pending.decode(errors='replace')}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RuntimeError(f"the shell ended; it printed:\n{self._pending.decode(errors='replace')}")
                self._pending += chunk
