import json
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.coco_panoptic import rgb_to_id
from helpers import REPO, TINY_DEFORMABLE, tiny_overrides
from tools import demo


def _run(tmp_path, config, checkpoint, source, *opts) -> list[dict]:
    args = ["--config", str(config), "--input", str(source), "--out", str(tmp_path / "demo"), "--threshold", "0"]
    return demo.main(args + (["--checkpoint", str(checkpoint)] if checkpoint else []) + ["--opts", *opts])


def test_an_image_and_a_folder_give_pictures_and_predictions(tiny_run, tiny_coco, tmp_path, capsys):
    image = sorted((tiny_coco / "val2017").iterdir())[0]
    records = _run(tmp_path, tiny_run / "config.yaml", tiny_run / "checkpoint.pth", image)
    written = json.loads((tmp_path / "demo" / "predictions.json").read_text())
    assert written == records and len(records) == 1
    w, h = Image.open(image).size
    assert Image.open(tmp_path / "demo" / f"{image.stem}.png").size == (w, h)  # drawn at the original size
    assert (records[0]["height"], records[0]["width"]) == (h, w) and records[0]["file"] == str(image)
    detection = records[0]["detections"][0]
    assert detection["class_name"].startswith("shape ") and len(detection["box"]) == 4  # the checkpoint's names
    assert not (tmp_path / "demo" / f"{image.stem}_sparsity.png").exists()  # DETR is dense
    # a folder, searched recursively: names keep the subfolder
    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    shutil.copy(image, folder / "a.jpg")
    shutil.copy(image, folder / "more" / "b.jpg")
    (folder / "notes.txt").write_text("not an image")
    records = _run(tmp_path, tiny_run / "config.yaml", tiny_run / "checkpoint.pth", folder)
    assert [r["picture"] for r in records] == ["a.png", "more/b.png"]
    assert (tmp_path / "demo" / "more" / "b.png").is_file()
    assert records[0]["detections"] == records[1]["detections"]
    assert capsys.readouterr().out.count("detections") == 3


def test_a_sparse_model_shows_where_it_computed(tiny_coco, tmp_path):
    image = sorted((tiny_coco / "val2017").iterdir())[0]
    opts = tiny_overrides(tiny_coco, tmp_path) + TINY_DEFORMABLE + [
        "model.name=sparse_detr", "model.two_stage=true", "model.with_box_refine=true", "model.sparse.rho=0.3"]
    records = _run(tmp_path, REPO / "configs/sparse_detr_r50.yaml", "", image, *opts)
    picture = Image.open(tmp_path / "demo" / records[0]["sparsity_picture"])
    # the kept tokens and the DAM side by side, at the network's input size (shorter side data.val_size 80)
    assert picture.size[1] == 80 and picture.size[0] > 2 * 80


def test_a_panoptic_model_writes_its_segments(tiny_coco, tmp_path):
    image = sorted((tiny_coco / "val2017").iterdir())[0]
    opts = tiny_overrides(tiny_coco, tmp_path) + [
        "data.panoptic=true", "model.panoptic.enabled=true", "model.panoptic.threshold=0.0",
        "model.backbone.out_features=[res2,res3,res4,res5]"]
    record = _run(tmp_path, REPO / "configs/detr_r50.yaml", "", image, *opts)[0]
    ids = rgb_to_id(np.asarray(Image.open(tmp_path / "demo" / record["panoptic_png"])))
    assert ids.shape == (record["height"], record["width"])
    assert {s["id"] for s in record["segments"]} == set(np.unique(ids).tolist()) - {0}
    assert Image.open(tmp_path / "demo" / record["picture"]).size[0] > 2 * record["width"]  # detections | segments


def test_video_frames_are_decoded_and_predicted_and_without_pyav_a_one_line_error(tiny_coco, tmp_path, monkeypatch):
    import av

    image = Image.open(sorted((tiny_coco / "val2017").iterdir())[0]).convert("RGB").resize((80, 64))
    opts = tiny_overrides(tiny_coco, tmp_path)
    video = tmp_path / "clip.mp4"
    with av.open(str(video), "w") as container:  # 5 frames of MPEG-4
        stream = container.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 80, 64, "yuv420p"
        for _ in range(5):
            container.mux(stream.encode(av.VideoFrame.from_image(image)))
        container.mux(stream.encode())
    records = demo.main(["--config", str(REPO / "configs/detr_r50.yaml"), "--input", str(video), "--every", "2",
                         "--out", str(tmp_path / "demo"), "--opts", *opts])
    assert [(r["frame"], r["picture"]) for r in records] == [
        (0, "clip_000000.png"), (2, "clip_000002.png"), (4, "clip_000004.png")]
    assert (records[0]["height"], records[0]["width"]) == (64, 80) and (tmp_path / "demo" / "clip_000004.png").is_file()
    monkeypatch.setitem(sys.modules, "av", None)  # PyAV missing: one line
    with pytest.raises(SystemExit, match=r"^error: --input .*clip.mp4 is a video: reading it needs PyAV"):
        _run(tmp_path, REPO / "configs/detr_r50.yaml", "", video, *opts)
    with pytest.raises(SystemExit, match="no such file or folder"):
        _run(tmp_path, REPO / "configs/detr_r50.yaml", "", tmp_path / "missing.jpg", *opts)
    assert demo.as_uint8(torch.ones(3, 4, 4)).max() == 255  # a [0, 1] float tensor input is drawn too
