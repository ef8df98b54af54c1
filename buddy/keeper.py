"""The data folder's lock files, which every role takes, and the keeper of one embedded redis-server.

Whoever starts a server (buddy.embedded) runs this file as the server's keeper: `python -I -S …/buddy/keeper.py
FOLDER SOCKET GRACE REDIS-SERVER ARGS…`. So it uses the standard library only (the keeper starts fast and loads
nothing of the project's), and the locks live here, where both sides reach them. The keeper's rules, its row in
buddy/embedded.py's table, all live in `keep()`.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Callable, Iterator

# The data folder's lock files, by what they protect (flocks: the kernel drops one when its holder dies).
USERS = "redis.users"  # who uses the server: a shared lock each; exclusive only to ask "is anyone (else) here?"
START_STOP = "redis.lock"  # starting a server, and a keeper stopping an idle one: one at a time
SUPERVISORS = "redis.supervisor"  # who will restart the server: a shared lock each
CHECK_EVERY = 0.5  # seconds between a keeper's looks at its server, its folder and the users
SOCKET_PATIENCE = 15.0  # seconds a server has to make its socket: as long as its starter waits for it to answer


def held_by_others(path: Path) -> bool:
    """True while some process holds a lock on `path` (even a shared one); False if the folder is gone."""
    try:
        with open(path, "a") as file:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except FileNotFoundError:
        return False
    return False


@contextlib.contextmanager
def exclusive(path: Path, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive flock on `path`; with wait=False, yield False at once if someone else holds it."""
    with open(path, "a") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True


def identity(path: Path) -> tuple[int, int] | None:
    """Which file or folder `path` names now (device, inode); None if nothing does."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return None
    return found.st_dev, found.st_ino


class SharedLock:
    """This process's shared flock on one of the folder's lock files, held while it plays that role."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] | None = None
        self._pid = 0

    def take(self) -> None:
        """Hold it on the file at the path now: again, if the one held was deleted with its folder."""
        if self.held() and self.current():
            return
        self.release()
        file = open(self.path, "a")
        fcntl.flock(file, fcntl.LOCK_SH)
        self._file, self._pid = file, os.getpid()

    def held(self) -> bool:
        """Held by this process (a forked child inherits the file, not the role)."""
        return self._file is not None and self._pid == os.getpid()

    def current(self) -> bool:
        """The file held is the one at the path: its folder was not deleted since."""
        if self._file is None:
            return False
        held = os.fstat(self._file.fileno())
        return identity(self.path) == (held.st_dev, held.st_ino)

    def last_to_leave(self, patience: float) -> bool:
        """Is this process the only holder? An exclusive lock is granted only then; asked a few times over
        `patience` seconds, because a keeper checks for users by taking it for an instant (and a worker that is
        exiting still holds its shared one for a moment)."""
        assert self._file is not None
        deadline = time.monotonic() + patience
        while True:
            try:
                fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.02)

    def release(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            file.close()


class Address:
    """Where clients reach a server: its data folder and its socket, as they were when the server started. Once
    either is gone from its path (deleted, or deleted and made anew), no new client can reach this server."""

    def __init__(self, folder: Path, socket_path: Path) -> None:
        self.folder, self.socket_path = folder, socket_path
        self._folder = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)  # to tell a deleted folder from a moved one
        self._folder_id = identity(folder)
        self._socket_id: tuple[int, int] | None = None  # the server makes it at once (its starter removed the old)
        self._socket_due = time.monotonic() + SOCKET_PATIENCE

    def knows_socket(self) -> bool:
        return self._socket_id is not None

    def lost(self) -> str | None:
        """Why no new client can reach the server, or None while they can."""
        if identity(self.folder) != self._folder_id:
            return f"its data folder {self.folder} is gone"
        found = identity(self.socket_path)
        if self._socket_id is None:
            self._socket_id = found
            if found is None and time.monotonic() > self._socket_due:  # never seen: made and deleted at once?
                return f"its socket {self.socket_path} is not there"
        elif found != self._socket_id:
            return f"its socket {self.socket_path} is gone"
        return None

    def deleted(self) -> bool:
        """The server's folder was deleted (not moved): its files went with it, there is nothing left to save."""
        return os.fstat(self._folder).st_nlink == 0


def keep(folder: Path, socket_path: Path, grace: float, server_command: list[str]) -> int:
    """The keeper's loop: run the server, and stop it on SIGTERM, once nobody has used the folder for `grace` s
    (an orphan of a killed master), or at once when no new client can reach it (its folder or socket deleted);
    exit when the server does. Linux also stops the server if its keeper dies, however it dies."""
    os.umask(0o077)  # the server's AOF and RDB hold every cached body: its owner's alone
    stop_requested: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda signum, frame: stop_requested.append(signum))
    address = Address(folder, socket_path)
    server = subprocess.Popen(server_command, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent())
    idle_since: float | None = None
    while True:
        try:  # quick looks until the server's socket is known, so that one deleted at once counts too
            return server.wait(CHECK_EVERY if address.knows_socket() else 0.02)  # it died, or was stopped
        except subprocess.TimeoutExpired:
            pass
        if stop_requested:
            return _stop(server, address)
        lost = address.lost()
        if lost:
            _say(f"{lost}, so nobody can reach its redis-server any more; stopping it")
            return _stop(server, address)
        if held_by_others(folder / USERS):
            idle_since = None
            continue
        idle_since = idle_since or time.monotonic()
        if time.monotonic() - idle_since < grace:
            continue
        with contextlib.suppress(FileNotFoundError), exclusive(folder / START_STOP, wait=False) as locked:
            # Under the start lock, so that a process joining now waits for the stop and then starts afresh.
            if locked and not held_by_others(folder / USERS):
                _say(f"nobody has used {folder} for {grace:g} s; stopping its redis-server")
                return _stop(server, address)


def _stop(server: subprocess.Popen[bytes], address: Address) -> int:
    if address.deleted():  # SIGTERM would have it save into a deleted folder, which some versions refuse to skip
        server.kill()
        return server.wait()
    server.terminate()
    try:
        return server.wait(120)  # saving a large dataset takes a while
    except subprocess.TimeoutExpired:
        server.kill()
        return server.wait()


def _say(line: str) -> None:
    print(f"buddy keeper: {line}", file=sys.stderr, flush=True)  # into redis.log, where its server writes


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to send the server SIGTERM when the keeper dies, however it dies."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl, parent = ctypes.CDLL(None, use_errno=True).prctl, os.getpid()
    pr_set_pdeathsig = 1

    def arm() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() != parent:  # the keeper died before the request was in place
            os._exit(1)

    return arm


if __name__ == "__main__":  # python -I -S keeper.py FOLDER SOCKET GRACE REDIS-SERVER ARGS...
    sys.exit(keep(Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), sys.argv[4:]))
