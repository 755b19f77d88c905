import torch

from engine.memory import allocated_bytes, reuse_freed_memory


def test_bytes_in_use_fall_when_freed_memory_is_kept():
    reuse_freed_memory()  # True on glibc; elsewhere a no-op
    before = allocated_bytes()
    x = torch.ones(5_000_000)  # 20 MB
    during = allocated_bytes()
    del x
    after = allocated_bytes()
    assert during - before >= 19_000_000
    assert after - before < 5_000_000
