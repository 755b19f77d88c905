"""The output folder's lock between processes, and the agent guard outside torchrun."""
import json
import os
import socket
import subprocess
import sys

import pytest

from engine import run_guard
from helpers import REPO

HOLD = """
import sys, time
sys.path.insert(0, {repo!r})
from engine.run_guard import OutputLock
lock = OutputLock({out!r})
print("locked", flush=True)
time.sleep(600)
"""


def _holder(out):
    proc = subprocess.Popen([sys.executable, "-c", HOLD.format(repo=str(REPO), out=str(out))],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_live_holder_is_refused_by_host_and_pid_and_a_dead_ones_lock_taken_over(tmp_path, caplog):
    out = tmp_path / "run"
    holder = _holder(out)
    try:
        with pytest.raises(run_guard.OutputInUseError,
                           match=f"in use by a live run \\(host {socket.gethostname()}, pid {holder.pid},"):
            run_guard.OutputLock(out)
    finally:
        holder.kill()
        holder.wait()
    lock = run_guard.OutputLock(out)  # the kernel released the dead holder's lock
    assert f"taking over the lock left by a run that ended without releasing it (host " \
           f"{socket.gethostname()}, pid {holder.pid}" in caplog.text
    assert json.loads((out / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert (out / "run.lock").read_text() == ""
    caplog.clear()
    run_guard.OutputLock(out).release()  # a cleanly released lock is no takeover
    assert "taking over" not in caplog.text


def test_the_agent_guard_is_only_for_torchrun_workers(monkeypatch):
    # a plain `python main.py` may rightly outlive its shell (nohup)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert run_guard.exit_with_agent() is False
