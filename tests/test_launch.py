"""launch.sh and torchrun end to end: two rendezvous "nodes" on this machine, a worker
killed with SIGKILL whose group torchrun restarts from the last checkpoint, workers that end
with their agent, and the output folder's lock."""
import json
import os
import re
import signal
import socket
import subprocess
import time

import torch

from helpers import REPO, checkpoint_model, tiny_overrides


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def test_two_nodes_rendezvous_over_localhost_and_train_together(tiny_coco, tmp_path):
    out = tmp_path / "run"
    opts = tiny_overrides(tiny_coco, out, **{"train.epochs": 1})
    port = _free_port()
    nodes = [subprocess.Popen(
        ["bash", str(REPO / "launch.sh"), "--config", str(REPO / "configs/detr_r50.yaml"), "--opts", *opts],
        cwd=tmp_path, env=_env(NNODES="2", NODE_RANK=str(rank), NPROC_PER_NODE="1",
                               RDZV_ENDPOINT=f"127.0.0.1:{port}", RDZV_ID="two_nodes"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    logs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs
    text = (out / "log.txt").read_text()
    assert "world size 2" in text, text[-2000:]
    # 8 images over 2 processes x batch 2: 2 iterations
    assert torch.load(out / "checkpoint.pth", weights_only=True)["iteration"] == 2


def _children(pid: int) -> list[int]:
    path = f"/proc/{pid}/task/{pid}/children"
    return [int(c) for c in open(path).read().split()] if os.path.exists(path) else []


def _cmdline(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline").read()
    except OSError:
        return ""


def _workers(launcher: int) -> list[int]:
    """The main.py workers under launch.sh (its child is torchrun, whose children they are)."""
    agents = [a for a in _children(launcher) if "torch.distributed.run" in _cmdline(a)]
    return [w for a in agents for w in _children(a) if "main.py" in _cmdline(w)]


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def _train(tiny_coco, out, restarts: int):
    # batch 1 on 2 processes: 4 iterations per epoch, so the checkpoint at iteration 3 is
    # mid-epoch and the restarted run must skip the batches already done
    opts = tiny_overrides(tiny_coco, out, **{"train.epochs": 4, "train.batch_size": 1,
                                             "train.checkpoint_every_iters": 3, "train.eval_every": 100})
    cmd = ["bash", str(REPO / "launch.sh"), "--max-restarts", str(restarts),
           "--config", str(REPO / "configs/detr_r50.yaml"), "--opts", *opts]
    return subprocess.Popen(cmd, cwd=out.parent, env=_env(NPROC_PER_NODE="2"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_worker_killed_after_a_checkpoint_restarts_and_ends_like_an_uninterrupted_run(tiny_coco, tmp_path):
    straight = _train(tiny_coco, tmp_path / "straight", restarts=0)
    log = straight.communicate(timeout=600)[0]
    assert straight.returncode == 0, log[-3000:]

    out = tmp_path / "killed"
    run = _train(tiny_coco, out, restarts=1)
    deadline = time.time() + 300
    while not list(out.glob("checkpoint_*.pth")):  # the first checkpoint, at iteration 3
        assert run.poll() is None and time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    workers = _workers(run.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)
    log = run.communicate(timeout=600)[0]
    assert run.returncode == 0, log[-3000:]
    text = (out / "log.txt").read_text()
    # resumed mid-epoch (normally from iteration 3; a slow machine may get further first)
    assert re.search(r"resumed from .* at epoch \d+ \(step [1-9]", text), text[-2000:]
    a, b = checkpoint_model(tmp_path / "straight"), checkpoint_model(out)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


def _launch(opts, nproc: int, **popen):
    return subprocess.Popen(["bash", str(REPO / "launch.sh"), "--config", str(REPO / "configs/detr_r50.yaml"),
                             "--opts", *opts], env=_env(NPROC_PER_NODE=str(nproc)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **popen)


def _wait_for(condition, what: str, timeout: float = 120):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, what
        time.sleep(0.1)


def _kill_launcher_group(run) -> None:
    """SIGKILL to launch.sh's process group, what the OOM killer or a scheduler's partial kill
    does: it reaches launch.sh and torchrun's agent, not the workers (own sessions)."""
    os.killpg(run.pid, signal.SIGKILL)
    run.communicate(timeout=30)


def test_workers_end_within_seconds_when_their_agent_is_killed(tiny_coco, tmp_path):
    out = tmp_path / "run"
    run = _launch(tiny_overrides(tiny_coco, out, **{"train.epochs": 1000}), nproc=2, cwd=tmp_path)
    _wait_for(lambda: (out / "log.jsonl").exists() and len(_workers(run.pid)) == 2, "training did not start")
    workers = _workers(run.pid)
    _kill_launcher_group(run)
    gone = time.time()
    _wait_for(lambda: not any(_alive(w) for w in workers), "workers outlived their agent", timeout=10)
    assert time.time() - gone < 10


def test_a_live_runs_output_folder_is_refused_and_a_dead_runs_lock_taken_over(tiny_coco, tmp_path):
    out = tmp_path / "run"
    first = _launch(tiny_overrides(tiny_coco, out, **{"train.epochs": 1000}), nproc=1, cwd=tmp_path)
    lock = out / "run.lock"
    _wait_for(lambda: lock.exists() and lock.read_text().strip(), "the first run took no lock")
    holder = json.loads(lock.read_text())
    second = _launch(tiny_overrides(tiny_coco, out, **{"train.epochs": 1}), nproc=2, cwd=tmp_path)
    log = second.communicate(timeout=300)[0]
    assert second.returncode != 0
    # the last console line, after torchrun's failure report, is the one that says why
    last = log.strip().splitlines()[-1]
    assert f"{out} is in use by a live run (host {socket.gethostname()}, pid {holder['pid']}" in last, log[-2000:]
    assert first.poll() is None, "the refused run disturbed the live one"

    worker = holder["pid"]
    _kill_launcher_group(first)
    _wait_for(lambda: not _alive(worker), "the first run's worker outlived its agent", timeout=10)
    third = _launch(tiny_overrides(tiny_coco, out, **{"train.epochs": 1}), nproc=1, cwd=tmp_path)
    log = third.communicate(timeout=300)[0]
    assert third.returncode == 0, log[-3000:]
    assert f"taking over the lock left by a run that ended without releasing it (host " \
           f"{socket.gethostname()}, pid {worker}" in (out / "log.txt").read_text()
    assert lock.read_text() == ""  # released at the end
