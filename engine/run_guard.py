"""What keeps one run to one output folder: workers that end with their torchrun agent, and
a lock on the output folder held by the run's rank 0.

torchrun starts every worker in a session of its own, so a kill of the launcher's process
group (the OOM killer, a scheduler) reaches the agent only, and its workers would go on
training unsupervised. `exit_with_agent` makes a worker end within about a second of its
agent: the kernel sends it SIGTERM when the agent dies (Linux PR_SET_PDEATHSIG), and a
watchdog thread that sees the worker re-parented ends it where the signal cannot (another
OS, a handler that swallows SIGTERM). torchrun's own restarts are not affected: the agent
lives on and starts new workers as its children.

`OutputLock` is an advisory POSIX lock (fcntl.lockf, which NFS forwards to its lock
manager) on `output_dir/run.lock`; the file names the holder's host and pid. The kernel
releases the lock when the holder dies however it dies, so a lock left by a dead run is
taken over (with a warning naming that run) without any clean-up.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("detr_sparse.run_guard")

LOCK_NAME = "run.lock"
_PR_SET_PDEATHSIG = 1


class OutputInUseError(RuntimeError):
    pass


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def exit_with_agent(poll_seconds: float = 0.5) -> bool:
    """In a torchrun worker: end this process when its parent (the agent) dies. Returns
    whether the guard was installed (False outside torchrun, where the parent is a shell
    that may rightly exit first, e.g. under nohup)."""
    if not under_torchrun():
        return False
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watchdog below still covers it

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        # the agent died (possibly before the prctl above took effect)
        print(f"worker {os.getpid()}: its torchrun agent (pid {parent}) is gone; exiting",
              file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-agent", daemon=True).start()
    return True


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "run_id": os.environ.get("TORCHELASTIC_RUN_ID", ""), "since": time.strftime("%Y-%m-%d %H:%M:%S")}


class OutputLock:
    """Holds `output_dir/run.lock` until released or the process ends. Raises
    OutputInUseError naming the other run's host and pid when a live run holds it."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            other = self._read()
            os.close(self._fd)
            self._fd = None
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise OutputInUseError(f"{self.path}: cannot lock the output folder ({e.strerror})") from None
            raise OutputInUseError(
                f"output_dir {self.path.parent} is in use by a live run (host {other.get('host', '?')}, "
                f"pid {other.get('pid', '?')}, since {other.get('since', '?')}); stop it or choose "
                f"another output_dir") from None
        previous, mine = self._read(), _holder()
        if previous:  # a clean end empties the file: its holder died
            restart = mine["run_id"] and previous.get("run_id") == mine["run_id"]  # torchrun restarted us
            (log.info if restart else log.warning)(
                "%s: taking over the lock left by a run that ended without releasing it (host %s, "
                "pid %s, since %s)", self.path, previous.get("host", "?"), previous.get("pid", "?"),
                previous.get("since", "?"))
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, (json.dumps(mine) + "\n").encode(), 0)
        os.fsync(self._fd)

    def _read(self) -> dict:
        try:
            return json.loads(os.pread(self._fd, 4096, 0).decode() or "{}")
        except (ValueError, OSError):
            return {}

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # a clean end leaves no holder to take over from
            os.close(self._fd)  # closing releases the lock
            self._fd = None
