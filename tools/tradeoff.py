"""The accuracy / cost trade-off of a token-sparse model from one checkpoint: for each ratio
(Sparse DETR's keep ratio rho, PnP-DETR's poll ratio), val AP and AP50, GFLOPs (in total,
without the deformable sampling, of the encoder and of the whole transformer), median
latency, and where the kept tokens are: the share of val tokens inside a (thing) box that the
model keeps (Sparse DETR's encoder tokens, PnP-DETR's polled tokens), and of those outside.

    python tools/tradeoff.py --config out/sparse/config.yaml --checkpoint out/sparse/checkpoint.pth \
        --ratio 0.1 0.2 0.3 0.5 1.0 [--size H W] [--json]

GFLOPs and latency are measured on one input: a random --size image, or by default the first
val image at its evaluation size. Sparse DETR at rho 0 runs the dense encoder. Evaluation and
latency run in the config's eval.precision (`--opts eval.precision=bf16`: bf16 autocast)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# the attribute each model exposes for its ratio
RATIO_ATTRIBUTES = ("rho", "poll_ratio")

from datasets import build_dataset  # noqa: E402
from detr_sparse.image_batch import ImageBatch  # noqa: E402
from detr_sparse.sparsity.tokens import kept_in_boxes  # noqa: E402
from engine.benchmark import count_flops, measure_latency  # noqa: E402
from engine.checkpoint import build_eval_model  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.distributed import DistInfo, resolve_device  # noqa: E402
from engine.memory import reuse_freed_memory  # noqa: E402
from engine.train import autocast, evaluate  # noqa: E402
from engine.trainer import build_evaluators, make_loader  # noqa: E402
from engine.visualize import sparsity_maps  # noqa: E402


def ratio_attribute(model) -> str | None:
    return next((a for a in RATIO_ATTRIBUTES if hasattr(model, a)), None)


def kept_shares(model, loader, device, is_thing=None) -> tuple[float, float]:
    """Shares of the val tokens inside / outside the (thing) boxes that the model keeps
    (nan when no pass has token maps: Sparse DETR's dense encoder)."""
    counts = torch.zeros(4)
    for images, targets in loader:
        images = images.to(device)
        maps = sparsity_maps(model, images)
        if maps is not None:
            counts += kept_in_boxes(maps["kept"], maps["valid"], maps["shapes"], targets,
                                    tuple(images.tensors.shape[-2:]), is_thing)
    return (counts[0] / counts[1]).item(), (counts[2] / counts[3]).item()


def tradeoff(model, val_set, loader, inputs: ImageBatch, ratios: list[float], runs: int,
             precision: str = "fp32") -> list[dict]:
    """A row per ratio; evaluation and latency in `precision` (eval.precision)."""
    attribute = ratio_attribute(model)
    device = inputs.tensors.device
    transformer_parts = [p for p in model.parts if p not in ("backbone", "mask head", "other")]
    rows = []
    for ratio in ratios:
        setattr(model, attribute, ratio)
        results = evaluate(model, loader, build_evaluators(model, val_set), device, precision, show_progress=False)
        stats = results["bbox"]
        flops = count_flops(model, inputs, model.parts)
        inside, outside = kept_shares(model, loader, device, getattr(val_set, "is_thing", None))
        sampling = sum(v for op, v in flops.by_op.items() if op.startswith("detr_sparse.msda"))
        rows.append({"ratio": ratio, "AP": stats["AP"], "AP50": stats["AP50"],
                     **({"PQ": results["panoptic"]["PQ"]} if "panoptic" in results else {}),
                     "gflops": flops.total,
                     "gflops_without_sampling": flops.total - sampling,
                     "gflops_encoder": flops.by_part["encoder"],
                     "gflops_transformer": sum(flops.by_part[p] for p in transformer_parts),
                     "precision": precision, "latency_s": _latency(model, inputs, runs, precision),
                     "kept_in_boxes": inside, "kept_outside": outside})
    return rows


def _latency(model, inputs: ImageBatch, runs: int, precision: str) -> float:
    with autocast(inputs.tensors.device, precision, "eval.precision"):
        return measure_latency(model, inputs, runs=runs)


def print_table(rows: list[dict]) -> None:
    pq = "PQ" in rows[0]
    print("ratio | AP | AP50 | " + ("PQ | " if pq else "") +
          "GFLOPs | w/o sampling | encoder GFLOPs | transformer GFLOPs | latency s | precision | "
          "kept in boxes | kept outside")
    for r in rows:
        print(f"{r['ratio']:g} | {r['AP']:.3f} | {r['AP50']:.3f} | " + (f"{r['PQ']:.3f} | " if pq else "") +
              f"{r['gflops']:.3f} | "
              f"{r['gflops_without_sampling']:.3f} | {r['gflops_encoder']:.3f} | "
              f"{r['gflops_transformer']:.3f} | {r['latency_s']:.4f} | {r['precision']} | "
              f"{r['kept_in_boxes']:.3f} | {r['kept_outside']:.3f}")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--checkpoint", default="", help="trained weights (random weights without)")
    p.add_argument("--ratio", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.5, 1.0],
                   help="Sparse DETR's rho or PnP-DETR's poll ratio")
    p.add_argument("--size", nargs=2, type=int, default=None, metavar=("H", "W"),
                   help="a random input of this size for GFLOPs / latency (default: first val image)")
    p.add_argument("--runs", type=int, default=3, help="latency: median of this many runs")
    p.add_argument("--json", action="store_true", help="also print one JSON object per ratio")
    p.add_argument("--opts", nargs="*", default=[], help="config overrides")
    args = p.parse_args(argv)
    reuse_freed_memory()
    cfg = load_config(args.config, args.opts)
    device = resolve_device(cfg.device)
    val_set = build_dataset(cfg.data, "val")
    model = build_eval_model(cfg.model, val_set.num_classes, args.checkpoint, device,
                             getattr(val_set, "is_thing", None))
    if ratio_attribute(model) is None:
        p.error(f"model.name '{cfg.model.name}' has no token ratio: use a sparse_detr or pnp_detr config")
    loader = make_loader(val_set, cfg.eval.batch_size, False, 0, cfg.train.seed, DistInfo(device=device))
    if args.size:
        pixels = torch.randn(3, *args.size, generator=torch.Generator().manual_seed(0))
    else:
        pixels = val_set[0][0]
    inputs = ImageBatch.from_images([pixels]).to(device)
    rows = tradeoff(model, val_set, loader, inputs, args.ratio, args.runs, cfg.eval.precision)
    print_table(rows)
    if args.json:
        for r in rows:
            print(json.dumps(r))
    return rows


if __name__ == "__main__":
    main()
