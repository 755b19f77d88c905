"""tools/convert_checkpoint.py and detr_sparse.official: every authors' state-dict layout
(tests/tools/official_keys: key -> shape of the authors' models at random init) converts
completely into its config's model; class rows; the errors; the files and the direct
loading paths (model.weights, --eval --resume)."""
from __future__ import annotations

import argparse
import gzip
import json
import re
import subprocess
import sys
from collections import Counter
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from detr_sparse import build_model
from detr_sparse.official import (ConversionError, coco_categories, convert_state_dict, detect_layout, head_kind,
                                  head_rows, read_categories)
from engine.checkpoint import CheckpointError, load_checkpoint, load_model_state, load_model_weights
from engine.config import load_config
from engine.trainer import Trainer
from helpers import REPO, one_line_error, tiny_overrides
from official_reference import DETR_OPTS, ReferenceDETR

FACTS = Path(__file__).parent / "official_keys"
CONFIGS = {  # official model -> the project config of the same network
    "detr_r50": "detr_r50.yaml", "detr_r50_dc5": "detr_r50_dc5.yaml", "detr_r50_panoptic": "detr_r50_panoptic.yaml",
    "pnp_detr_r50": "pnp_detr_r50.yaml", "pnp_detr_r50_dc5": "pnp_detr_r50_dc5.yaml",
    "deformable_detr_r50": "deformable_detr_r50.yaml", "deformable_detr_r50_refine": "deformable_detr_refine_r50.yaml",
    "deformable_detr_r50_refine_two_stage": "deformable_detr_two_stage_r50.yaml",
    "sparse_detr_r50": "sparse_detr_r50.yaml", "sparse_detr_swin_t": "sparse_detr_swin.yaml"}
CLASS_HEAD = re.compile(r"(class_embed|enc_aux_class)(\.\d+)?\.(weight|bias)")
COCO_UNUSED_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}  # of 1..90


def facts(name: str) -> dict:
    return json.loads(gzip.decompress((FACTS / f"{name}.json.gz").read_bytes()))


def repeated(key: str) -> str | None:
    """The key an authors' alias repeats: the transformer's copies of the head lists (the
    Sparse DETR lists: 6 decoder heads, the proposal head, then the encoder's 5)."""
    match = re.fullmatch(r"transformer\.(decoder|encoder)\.(class_embed|bbox_embed)\.(\d+)\.(.+)", key)
    if match is None:
        return None
    return f"{match[2]}.{int(match[3]) + (7 if match[1] == 'encoder' else 0)}.{match[4]}"


def random_official(shapes: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict of these keys and shapes, random values (the aliases equal their key)."""
    g = torch.Generator().manual_seed(seed)
    state = {k: (torch.randint(0, 169, s, generator=g) if k.endswith("relative_position_index")
                 else torch.randn(s, generator=g)) for k, s in shapes.items()}
    return {k: state[repeated(k)] if repeated(k) in state else v for k, v in state.items()}


@lru_cache(maxsize=None)
def coco_model(config: str, *overrides: str):
    ids, is_thing = coco_categories(panoptic="panoptic" in config)
    cfg = load_config(REPO / "configs" / config, list(overrides))
    torch.manual_seed(0)
    return build_model(cfg.model, len(ids), is_thing if cfg.model.panoptic.enabled else None)


def test_coco_category_lists():
    things, _ = coco_categories(panoptic=False)
    assert len(things) == 80 and things == sorted(things)
    assert set(range(1, 91)) - set(things) == COCO_UNUSED_IDS
    ids, is_thing = coco_categories(panoptic=True)
    assert len(ids) == 133 and ids == sorted(ids) and ids[:80] == things
    assert sum(is_thing) == 80 and all(91 < c <= 200 for c in ids[80:])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_authors_layout_converts_completely(name):
    fact = facts(name)
    official = random_official(fact["state_dict"])
    model = coco_model(CONFIGS[name])
    result = convert_state_dict(official, model, source=name)
    ours = model.state_dict()
    assert result.layout.config(dilation="--dilation" in fact["argv"]) == CONFIGS[name]
    # every key of ours produced, with its shape; every official key consumed, once
    assert set(result.state_dict) == set(ours)
    assert {k: v.shape for k, v in result.state_dict.items()} == {k: v.shape for k, v in ours.items()}
    consumed = [s for s in result.sources.values() if s]
    assert len(consumed) == len(set(consumed)) and set(consumed) | set(result.aliases) == set(official)
    assert all(repeated(k) == v for k, v in result.aliases.items())
    # values: the official tensors, the class heads' rows those of COCO's ids (+ no-object)
    ids = coco_categories(panoptic=result.layout.panoptic)[0]
    kinds = Counter()
    for key, source in result.sources.items():
        value = official[source] if source else ours[key]
        kind = head_kind(result.layout, key)
        kinds[kind] += 1
        if kind is not None:
            assert value.shape[0] == fact["num_classes_head"]
            rows = {"softmax": ids + [value.shape[0] - 1], "sigmoid": ids, "objectness": list(range(len(ids)))}[kind]
            value = value[rows]
        assert torch.equal(result.state_dict[key], value.reshape(ours[key].shape)), key
    assert sum(n for k, n in kinds.items() if k) == sum(bool(CLASS_HEAD.fullmatch(k)) for k in ours)
    assert kinds["objectness"] == (2 if name.endswith("two_stage") else 0)  # the proposal head's rows
    model.load_state_dict(result.state_dict)  # strict


def test_class_rows_of_a_hand_made_head():
    head = torch.arange(251.0)[:, None] * torch.ones(1, 3)  # row r holds r
    assert head[head_rows("softmax", 92, [1, 3, 90])][:, 0].tolist() == [1, 3, 90, 91]
    assert head[head_rows("softmax", 251, [1, 92, 200])][:, 0].tolist() == [1, 92, 200, 250]
    assert head[head_rows("sigmoid", 91, [1, 3, 90])][:, 0].tolist() == [1, 3, 90]
    assert head[head_rows("objectness", 91, [5, 7, 9])][:, 0].tolist() == [0, 1, 2]
    with pytest.raises(ConversionError, match=r"class_embed.weight: 92 rows .* \[91, 95\]"):
        head_rows("softmax", 92, [1, 91, 95], "class_embed.weight")
    with pytest.raises(ConversionError, match=r"\[91\]"):
        head_rows("sigmoid", 91, [90, 91])
    with pytest.raises(ConversionError, match="fewer than the 3 classes"):
        head_rows("objectness", 2, [1, 2, 3])


def test_a_converted_detr_head_keeps_the_coco_rows_then_no_object():
    official = random_official(facts("detr_r50")["state_dict"])
    official["class_embed.weight"] = torch.arange(92.0)[:, None].repeat(1, 256)
    official["class_embed.bias"] = torch.arange(92.0)
    result = convert_state_dict(official, coco_model("detr_r50.yaml"))
    expected = list(coco_categories(False)[0]) + [91]
    assert result.state_dict["class_embed.bias"].tolist() == expected
    assert result.state_dict["class_embed.weight"][:, 0].tolist() == expected


def test_a_dataset_of_its_own_categories(tmp_path):
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps({"categories": [{"id": 7, "name": "b", "isthing": 0}, {"id": 2, "name": "a"}]}))
    assert read_categories(ann) == ([2, 7], [True, False])
    official = random_official(facts("deformable_detr_r50")["state_dict"])
    official["class_embed.0.bias"] = torch.arange(91.0)
    for i in range(6):  # the heads are one module (no box refinement)
        official[f"class_embed.{i}.bias"] = official["class_embed.0.bias"]
    model = build_model(load_config(REPO / "configs/deformable_detr_r50.yaml").model, 2)
    result = convert_state_dict(official, model, categories=[2, 7])
    assert result.state_dict["class_embed.3.bias"].tolist() == [2.0, 7.0]
    with pytest.raises(ConversionError, match=r"2 categories for a model of 80 classes"):
        convert_state_dict(official, coco_model("deformable_detr_r50.yaml"), categories=[2, 7])
    with pytest.raises(ConversionError, match=r"has 2 classes, not COCO's 80 .*--categories"):
        convert_state_dict(official, model)


def test_unknown_keys_wrong_shapes_and_misfits_are_named():
    official = random_official(facts("detr_r50")["state_dict"])
    model = coco_model("detr_r50.yaml")
    message = one_line_error(convert_state_dict, {**official, "transformer.extra.weight": torch.ones(1)}, model,
                             source="x.pth")
    assert message.startswith("x.pth: 1 keys unknown") and "transformer.extra.weight" in message
    message = one_line_error(convert_state_dict, {**official, "query_embed.weight": torch.ones(99, 256)}, model)
    assert "query_embed.weight (99, 256) vs (100, 256)" in message
    without = {k: v for k, v in official.items() if k != "transformer.decoder.norm.weight"}
    assert "transformer.decoder_norm.weight" in one_line_error(convert_state_dict, without, model)
    assert "PnPDETR" in one_line_error(convert_state_dict, official, coco_model("pnp_detr_r50.yaml"))
    message = one_line_error(convert_state_dict, official, model, args=argparse.Namespace(dilation=True))
    assert "dilation=True" in message and "configs/detr_r50_dc5.yaml" in message
    refine = random_official(facts("deformable_detr_r50_refine")["state_dict"])
    message = one_line_error(convert_state_dict, refine, coco_model("deformable_detr_r50.yaml"))
    assert "model.with_box_refine: True in the checkpoint, False" in message
    refine["transformer.decoder.bbox_embed.2.layers.0.bias"] = torch.zeros(256)
    message = one_line_error(convert_state_dict, refine, coco_model("deformable_detr_refine_r50.yaml"))
    assert "transformer.decoder.bbox_embed.2.layers.0.bias should repeat bbox_embed.2.layers.0.bias" in message
    assert "not an authors' checkpoint" in one_line_error(detect_layout, model.state_dict())


def test_an_authors_file_where_a_training_checkpoint_is_expected_is_explained(tmp_path):
    official = random_official(facts("detr_r50")["state_dict"])
    model = coco_model("detr_r50.yaml")
    message = one_line_error(load_model_weights, model, {"model": official}, "detr.pth", allow_official=False)
    assert message == ("checkpoint detr.pth: the authors' facebookresearch/detr (ResNet) checkpoint, not a detr_sparse "
                       "training checkpoint to resume: evaluate it with --eval --resume detr.pth, start from its "
                       "weights with model.weights=detr.pth, or tools/convert_checkpoint.py it")
    trainer = SimpleNamespace(model=model, categories=None, ema=None)
    with pytest.raises(CheckpointError, match="model weights only .* --eval, or .* model.weights=w.pth"):
        Trainer.resume(trainer, "w.pth", {"model": model.state_dict()})


def test_an_authors_file_loads_directly_and_through_the_tool(tmp_path):
    torch.manual_seed(0)
    official = ReferenceDETR().state_dict()
    src = tmp_path / "detr.pth"  # as the authors' files: the legacy format, args a Namespace
    torch.save({"model": official, "args": argparse.Namespace(dilation=False, num_queries=5)}, src,
               _use_new_zipfile_serialization=False)
    torch.save(official, tmp_path / "bare.pth")
    model = build_model(load_config(REPO / "configs/detr_r50.yaml", DETR_OPTS).model, 80)
    expected = convert_state_dict(official, model).state_dict
    for path in (src, tmp_path / "bare.pth"):
        load_model_weights(model, load_checkpoint(path), str(path))
        assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    from tools.convert_checkpoint import main

    done = main([str(src), str(tmp_path / "ours.pth"), "--opts", *DETR_OPTS])
    assert done["config"] == "configs/detr_r50.yaml" and done["tensors"] == len(expected)
    state = load_checkpoint(tmp_path / "ours.pth")
    assert state["converted_from"]["format"] == "detr"
    load_model_state(model, state["model"], "ours.pth")  # a detr_sparse checkpoint, strict
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    with pytest.raises(SystemExit, match=r"^error: .*the config builds a PnPDETR"):
        main([str(src), str(tmp_path / "x.pth"), "--config", "configs/pnp_detr_r50.yaml", "--opts", *DETR_OPTS])


def test_model_weights_leave_a_new_mask_branch_to_train():
    # model.weights (strict=False): an authors' detector under a panoptic model of 8 + 4 classes
    torch.manual_seed(0)
    reference = ReferenceDETR()
    cfg = load_config(REPO / "configs/detr_r50_panoptic.yaml", DETR_OPTS)
    model = build_model(cfg.model, 12, [i < 8 for i in range(12)])
    load_model_weights(model, {"model": reference.state_dict()}, "w.pth", strict=False, categories=list(range(1, 13)))
    assert torch.equal(model.class_embed.bias, reference.class_embed.bias[list(range(1, 13)) + [91]])
    message = one_line_error(load_model_weights, model, {"model": reference.state_dict()}, "w.pth",
                             categories=list(range(1, 13)))
    assert "keys of the model the checkpoint leaves empty" in message and "panoptic_head." in message


def test_main_evaluates_an_authors_file_and_will_not_resume_a_run_from_it(tiny_coco, tmp_path):
    torch.manual_seed(0)
    src = tmp_path / "official.pth"
    torch.save({"model": ReferenceDETR().state_dict(), "epoch": 299}, src)
    opts = [o for o in tiny_overrides(tiny_coco, tmp_path / "out") if not o.startswith("model.")] + DETR_OPTS
    cmd = [sys.executable, str(REPO / "main.py"), "--config", str(REPO / "configs/detr_r50.yaml"), "--resume", str(src)]
    done = subprocess.run(cmd + ["--eval", "--opts", *opts], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    log = (tmp_path / "out" / "log.txt").read_text()
    assert "the authors' facebookresearch/detr (ResNet) checkpoint, converted" in log and "AP" in log
    done = subprocess.run(cmd + ["--opts", *opts], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: checkpoint {src}: the authors' facebookresearch")
