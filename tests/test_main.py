"""main.py's console: an error a user can act on ends the run with one line."""
import subprocess
import sys

import torch

from helpers import REPO, tiny_overrides


def test_an_unreadable_checkpoint_ends_with_one_line_naming_it(tiny_coco, tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"model": {"w": torch.randn(1000)}}, bad)
    bad.write_bytes(bad.read_bytes()[:2000])
    result = subprocess.run([sys.executable, str(REPO / "main.py"), "--config", str(REPO / "configs/detr_r50.yaml"),
                             "--eval", "--resume", str(bad), "--opts", *tiny_overrides(tiny_coco, tmp_path / "out")],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: checkpoint {bad}: truncated"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "weights_only" not in result.stderr
