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


def test_print_config_prints_the_resolved_config_and_parameters_by_part(capsys):
    import main

    counts = main.main(["--config", str(REPO / "configs/mask_rcnn_r18_synthetic.yaml"), "--print-config",
                        "--opts", "model.rcnn.box_head_dim=64"])
    out = capsys.readouterr().out
    assert "box_head_dim: 64" in out and "parameters (M) backbone" in out
    assert counts["total"] == sum(v for k, v in counts.items() if k not in ("total", "trainable")) > 0
    assert counts["trainable"] < counts["total"]  # the recipe freezes the stem and res2


def test_a_missing_annotation_file_of_a_custom_split_ends_with_one_line_naming_the_key(custom_coco, tmp_path):
    opts = [o if not o.startswith("data.train_annotations=") else f"data.train_annotations={tmp_path / 'gone.json'}"
            for o in custom_coco]
    result = subprocess.run([sys.executable, str(REPO / "main.py"), "--config", str(REPO / "configs/detr_r50.yaml"),
                             "--opts", *tiny_overrides(tmp_path / "no_root", tmp_path / "out"), *opts],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: data.train_annotations: annotation file not found: {tmp_path / 'gone.json'}"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
