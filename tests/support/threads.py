"""Killing a thread of this process, as an error that no `except Exception` catches would end it."""
from __future__ import annotations

import ctypes
import threading


def kill(thread: threading.Thread) -> None:
    """Raise SystemExit inside `thread` (it ends at its next Python instruction) and wait for it to end."""
    assert thread.ident is not None
    raised = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(SystemExit))
    assert raised == 1, f"no thread {thread.name} to kill"
    thread.join(5)
    assert not thread.is_alive(), f"{thread.name} still runs"


def started_since(before: set[threading.Thread], name: str) -> list[threading.Thread]:
    """The threads named `name` that run now and did not before."""
    return [t for t in threading.enumerate() if t not in before and t.name == name]
