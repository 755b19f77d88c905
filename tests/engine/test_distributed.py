"""The process group's set-up from torchrun's environment: NCCL bound to the process's own
GPU on CUDA (checked by recording the calls: there is no GPU here), gloo on the CPU."""
import pytest
import torch
import torch.distributed as dist

from engine import distributed


@pytest.fixture
def calls(monkeypatch):
    """What init_distributed asks of torch.cuda and torch.distributed, in order."""
    made = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: made.append(("set_device", device)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: made.append(("init", backend, kw)))
    for key, value in {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    return made


def test_nccl_starts_on_the_local_rank_s_gpu(calls):
    info = distributed.init_distributed("cuda")
    gpu = torch.device("cuda", 1)
    assert (info.rank, info.world_size, info.local_rank, info.device) == (3, 4, 1, gpu)
    # the current device first (collectives and object gathers use it), then NCCL bound to it
    assert [c[:2] for c in calls] == [("set_device", gpu), ("init", "nccl")]
    assert calls[1][2]["device_id"] == gpu


def test_gloo_on_the_cpu(calls):
    info = distributed.init_distributed("cpu")
    assert info.device == torch.device("cpu")
    assert [c[:2] for c in calls] == [("init", "gloo")] and calls[0][2]["device_id"] is None
