import json

import pytest
from PIL import Image

from tools import plot_logs


def _write_log(folder, resumed: bool = False):
    """A run's log.jsonl: logged steps 1..6 (a resumed run repeats 5 and 6 with other values),
    two epochs' records and evaluations, and a last line cut short."""
    folder.mkdir()
    records = [{"kind": "train", "step": s, "epoch": (s - 1) // 3, "loss": 2.0 - 0.1 * s, "lr": 1e-4} for s in range(1, 7)]
    records += [{"kind": "train_epoch", "step": 3, "epoch": 0, "loss": 1.8, "lr": 1e-4},
                {"kind": "val", "step": 3, "epoch": 1, "bbox_AP": 0.1, "bbox_AP50": 0.3},
                {"kind": "val", "step": 6, "epoch": 2, "bbox_AP": 0.2, "bbox_AP50": 0.4}]
    if resumed:
        records += [{"kind": "train", "step": s, "epoch": 1, "loss": 9.0, "lr": 1e-5} for s in (5, 6)]
    text = "\n".join(json.dumps(r) for r in records) + '\n{"kind": "train", "st'
    (folder / "log.jsonl").write_text(text)


def test_writes_a_png_of_loss_lr_and_ap_for_several_runs(tmp_path, capsys):
    _write_log(tmp_path / "a")
    _write_log(tmp_path / "b", resumed=True)
    out = tmp_path / "plots" / "curves.png"
    plotted = plot_logs.main([str(tmp_path / "a"), str(tmp_path / "b" / "log.jsonl"), "--out", str(out),
                              "--smooth", "2"])
    width, height = Image.open(out).size
    assert width > 2 * height  # loss | lr | AP
    assert set(plotted) == {"a", "b"} and capsys.readouterr().out.startswith(f"{out}: a, b")
    assert plotted["a"]["loss"][0] == [1, 2, 3, 4, 5, 6]
    assert plotted["b"]["loss"][1][-2:] == [9.0, 9.0] and plotted["b"]["lr"][1][-1] == 1e-5  # the later records
    assert plotted["a"]["bbox_AP50"] == ([1, 2], [0.3, 0.4]) and "segm_AP" not in plotted["a"]


def test_moving_average_and_a_missing_log(tmp_path, capsys):
    assert plot_logs.moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    with pytest.raises(SystemExit):
        plot_logs.main([str(tmp_path / "nothing"), "--out", str(tmp_path / "x.png")])
    assert "no log" in capsys.readouterr().err
