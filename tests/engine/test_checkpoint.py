import random

import numpy as np
import pytest
import torch

from engine import checkpoint as ckpt


def test_atomic_save_and_load(tmp_path):
    path = tmp_path / "c.pth"
    ckpt.save_checkpoint({"model": {}, "a": torch.arange(3)}, path)
    ckpt.save_checkpoint({"model": {}, "a": torch.arange(4)}, path)
    assert torch.equal(ckpt.load_checkpoint(path)["a"], torch.arange(4))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth"]  # no temporary left behind


def test_failed_save_keeps_previous_file(tmp_path):
    path = tmp_path / "c.pth"
    ckpt.save_checkpoint({"model": {}, "a": torch.arange(3)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        ckpt.save_checkpoint({"a": Unpicklable()}, path)
    assert torch.equal(ckpt.load_checkpoint(path)["a"], torch.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth"]


def _unreadable(tmp_path, kind: str):
    path = tmp_path / f"{kind}.pth"
    if kind == "missing":
        return path
    good = tmp_path / "good.pth"
    ckpt.save_checkpoint({"model": {"w": torch.randn(1000)}}, good)
    data = bytearray(good.read_bytes())
    if kind == "truncated":
        data = data[:len(data) // 2]
    elif kind == "corrupt":  # zeroes over the pickled structure
        start = data.find(b"data.pkl") + 60
        data[start:start + 20] = bytes(20)
    elif kind == "text":
        data = b"not a checkpoint\n" * 50
    path.write_bytes(bytes(data))
    if kind == "state_dict_only":
        torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    elif kind == "pickled_module":
        torch.save({"model": torch.nn.Linear(2, 2)}, path)
    return path


@pytest.mark.parametrize("kind, reason", [
    ("missing", "not found"), ("truncated", "truncated"), ("corrupt", "corrupt"),
    ("text", "not a PyTorch checkpoint"), ("state_dict_only", "no 'model' entry"),
    ("pickled_module", "pickled torch.nn.modules.linear.Linear")])
def test_an_unreadable_checkpoint_is_one_line_naming_the_file_and_the_reason(tmp_path, kind, reason):
    path = _unreadable(tmp_path, kind)
    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.load_checkpoint(path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message and reason in message, message
    assert "weights_only` argument" not in message  # torch's hint is no reason


def test_rng_state_round_trip(tmp_path):
    state = ckpt.rng_state()
    ckpt.save_checkpoint({"model": {}, "rng": state}, tmp_path / "r.pth")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.set_rng_state(ckpt.load_checkpoint(tmp_path / "r.pth")["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2] == again[2]


def test_load_model_state_names_keys():
    model = torch.nn.Linear(2, 2)
    state = {"weight": torch.zeros(2, 2), "extra": torch.zeros(1)}
    with pytest.raises(ckpt.CheckpointError, match=r"missing keys \['bias'\].*unexpected keys \['extra'\]"):
        ckpt.load_model_state(model, state, "x.pth")


def test_numbered_checkpoints_keep_the_newest_and_link_the_last(tmp_path):
    for it in (5, 10, 15):
        ckpt.save_numbered({"model": {}, "iteration": it}, tmp_path, it, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [ckpt.checkpoint_name(15),
                                                                 ckpt.checkpoint_name(10)]
    assert (tmp_path / ckpt.LAST).resolve().name == ckpt.checkpoint_name(15)
    assert ckpt.load_checkpoint(tmp_path / ckpt.LAST)["iteration"] == 15
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*link"))


def test_truncated_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    for it in (10, 20):
        ckpt.save_numbered({"model": {"w": torch.arange(1000.0)}, "iteration": it}, tmp_path, it, keep=3)
    newest = tmp_path / ckpt.checkpoint_name(20)
    newest.write_bytes(newest.read_bytes()[:100])
    path, state = ckpt.load_latest(tmp_path)
    assert path.name == ckpt.checkpoint_name(10) and state["iteration"] == 10
    assert "falling back" in caplog.text and newest.name in caplog.text


def test_no_readable_checkpoint_is_an_error_and_none_is_none(tmp_path):
    assert ckpt.load_latest(tmp_path) is None
    (tmp_path / ckpt.checkpoint_name(3)).write_bytes(b"garbage")
    with pytest.raises(ckpt.CheckpointError, match="none of the checkpoints"):
        ckpt.load_latest(tmp_path)


def test_a_tool_builds_the_trained_runs_classes_from_its_checkpoint(tmp_path):
    from helpers import REPO

    from engine.config import load_config

    cfg = load_config(REPO / "configs/panoptic_fpn_r18_synthetic.yaml",
                      ["model.backbone.pretrained=''", "model.rcnn.fpn_channels=32"]).model
    trained = ckpt.build_eval_model(cfg, 5, "", "cpu", is_thing=[True, True, True, False, False])
    classes = {"names": list("abcde"), "category_ids": [1, 2, 3, 4, 5], "is_thing": [True] * 3 + [False] * 2}
    ckpt.save_checkpoint({"model": trained.state_dict(), "classes": classes}, tmp_path / "run.pth")
    # without data a panoptic model would be COCO's 80 + 53 classes; the checkpoint says 3 + 2
    tool = ckpt.build_eval_model(cfg, 91, str(tmp_path / "run.pth"), "cpu")
    assert all(torch.equal(v, tool.state_dict()[k]) for k, v in trained.state_dict().items())
    # a run that set model.num_classes built that many (the names are the data's): so does the tool
    wide = load_config(REPO / "configs/detr_r18_synthetic.yaml", ["model.backbone.pretrained=''",
                                                                   "model.num_classes=10"]).model
    ckpt.save_checkpoint({"model": ckpt.build_eval_model(wide, 5, "", "cpu").state_dict(),
                          "classes": {**classes, "is_thing": [True] * 5}}, tmp_path / "wide.pth")
    assert ckpt.build_eval_model(wide, 91, str(tmp_path / "wide.pth"), "cpu").class_embed.out_features == 11
