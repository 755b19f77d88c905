"""Convert an authors' released checkpoint (DETR, PnP-DETR, Deformable DETR, Sparse DETR; SViT's and
ViT-Adapter's mmdet Mask R-CNN) into a detr_sparse checkpoint of the same model, checked against
the project config that builds it; or DGE's DeiT classification weights (StevenGrove/vtpack)
into backbone weights for `model.backbone.pretrained`:

    python tools/convert_checkpoint.py detr-r50.pth out/official/detr_r50.pth
    python tools/convert_checkpoint.py detr-r50-dc5.pth out/official/detr_r50_dc5.pth --config configs/detr_r50_dc5.yaml
    python tools/convert_checkpoint.py SRC DST --categories data/mine/annotations/instances_val2017.json
    python tools/convert_checkpoint.py svit-adapter-s-0.33x.pth out/official/svit_adapter_s.pth
    python tools/convert_checkpoint.py deit_dge_s124_small.pth out/official/deit_s_dge_backbone.pth

The format (repository) and variant come from the keys (--format names the format instead),
the config from them (--config names another: the keys do not tell R50 from R50-DC5, the
checkpoint's args do when it has them). The class heads keep the rows of the categories'
ids. COCO's by default, or those of --categories (a COCO annotation file). Evaluate the
result with `python main.py --config CONFIG --eval --resume DST`; a backbone's (vtpack) is the
backbone's own state dict, as tools/pretrain_backbone.py writes: train with
`python main.py --config CONFIG --opts model.backbone.pretrained=DST`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from detr_sparse import build_model  # noqa: E402
from detr_sparse.official import (FORMATS, coco_categories, convert_state_dict, detect_layout,  # noqa: E402
                                  read_categories, training_arg)
from engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402
from engine.config import load_config  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="the authors' checkpoint (.pth)")
    p.add_argument("dst", help="the detr_sparse checkpoint to write")
    p.add_argument("--format", choices=sorted(FORMATS), default=None,
                   help="the authors' repository: " + ", ".join(f"{k} = {v}" for k, v in FORMATS.items()))
    p.add_argument("--config", default="", help="the project config of the same model (default: the one "
                   "the keys name, in configs/)")
    p.add_argument("--categories", default="", help="a COCO annotation file whose category ids the class "
                   "heads keep (default: COCO's 80, or 133 for panoptic DETR)")
    p.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, as main.py's")
    return p.parse_args(argv)


def convert_file(src: str, dst: str, fmt: str | None = None, config: str = "", categories: str = "",
                 overrides: list[str] = ()) -> dict:
    """Convert `src` into the checkpoint `dst` ({"model", "converted_from"}; a backbone's: its
    state dict), checked against the model of `config` (+ overrides; a backbone's: that model's
    backbone). Returns what was done: config, layout description, tensor count, backbone_only."""
    state = load_checkpoint(src)
    args = state.get("args")
    layout = detect_layout(state["model"], fmt, src)
    config = config or f"configs/{layout.config(training_arg(args, 'dilation'))}"
    cfg = load_config(config if Path(config).is_file() else REPO / config, list(overrides))
    ids, is_thing = read_categories(categories) if categories else coco_categories(layout.panoptic)
    model = build_model(cfg.model, len(ids), is_thing if cfg.model.panoptic.enabled else None)
    done = {"config": config, "model": layout.describe(), "backbone_only": layout.backbone_only}
    if layout.backbone_only:  # every pretrained key of the backbone (its detection pyramid starts fresh)
        converted = convert_state_dict(state["model"], model.backbone, fmt=fmt, strict=False, source=src)
        model.backbone.load_state_dict(converted.state_dict, strict=False)
        save_checkpoint(converted.state_dict, dst)
        return {**done, "tensors": len(converted.state_dict)}
    converted = convert_state_dict(state["model"], model, ids, fmt, source=src, args=args)
    model.load_state_dict(converted.state_dict)  # strict: the conversion produced every key
    save_checkpoint({"model": model.state_dict(),
                     "converted_from": {"file": str(src), "format": layout.format,
                                        "model": layout.describe(), "categories": ids}}, dst)
    return {**done, "tensors": len(converted.state_dict)}


def main(argv=None) -> dict:
    a = parse_args(argv)
    try:
        done = convert_file(a.src, a.dst, a.format, a.config, a.categories, a.opts)
    except (CheckpointError, ValueError) as e:  # ConversionError, ConfigError, a config's model error
        sys.exit(f"error: {e}")
    opts = f" --opts {' '.join(a.opts)}" if a.opts else ""
    if done["backbone_only"]:
        print(f"{a.src}: the authors' {done['model']} -> {a.dst} ({done['tensors']} tensors of a backbone, checked "
              f"against {done['config']}'s); train on it: python main.py --config {done['config']} --opts "
              f"model.backbone.pretrained={a.dst}{' ' + ' '.join(a.opts) if a.opts else ''}")
        return done
    print(f"{a.src}: the authors' {done['model']} -> {a.dst} ({done['tensors']} tensors, checked against "
          f"{done['config']}); evaluate: python main.py --config {done['config']} --eval --resume {a.dst}{opts}")
    return done


if __name__ == "__main__":
    main()
