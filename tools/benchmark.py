"""GFLOPs (by model part), median latency and peak memory of a forward pass; or, with
--train, training throughput for 1 and 2 processes (one thread each) and the scaling.

    python tools/benchmark.py --config configs/detr_r50.yaml configs/detr_r50_dc5.yaml \
        --size 800 1066 [--batch 1] [--runs 3] [--image x.jpg] [--precision fp32 bf16] [--json] [--opts k=v ...]
    python tools/benchmark.py --train --config configs/detr_r18_synthetic.yaml [--processes 1 2]
    python tools/benchmark.py --component msda [--size 800 1066] [--precision fp32 bf16]   # deformable
        # sampling: the device's kernel (CPU: C++, CUDA: Triton) vs the grid_sample reference
    python tools/benchmark.py --config configs/mask_rcnn_pvt_s.yaml configs/mask_rcnn_pvt_s_dge.yaml \
        --size 800 1280 --dge-budget 0.5     # DGE at an operating point (or --checkpoint: its own gates)
    python tools/benchmark.py --config configs/mask_rcnn_deit_s_adapter.yaml \
        configs/mask_rcnn_deit_s_adapter_svit.yaml --size 800 1280 --svit-targets   # SViT at its keep targets
    python tools/benchmark.py --config configs/mask_rcnn_swin_t.yaml configs/mask_rcnn_spt_t12.yaml \
        --size 800 1280 --spt-select 0.25    # SPT with a quarter of the tokens selected in every SPA block
    python tools/benchmark.py --config out/dense/config.yaml out/dge/config.yaml \
        --checkpoint out/dense/checkpoint.pth out/dge/checkpoint.pth --image val.jpg   # one each
    python tools/benchmark.py --config out/dge/config.yaml --checkpoint out/dge/checkpoint.pth \
        --val-images 50    # + GFLOPs averaged over 50 val images at the evaluation size
    python tools/benchmark.py --component dge_train --dge-backbone pvt_t_dge --size 144 144 --batch 4
    python tools/benchmark.py --component gather    # the token core's row gather vs torch.gather
    python tools/benchmark.py --component spa --size 800 1280   # SPA's packed attention vs windows
    python tools/benchmark.py --component swin_timm --size 800 1068   # our Swin-T vs timm's (installed apart)
    python tools/benchmark.py --component attention --precision fp32 bf16  # fused vs written-out attention

With several configs, ratios against the first one are printed too (same process, same input);
with --precision fp32 bf16, a row for each (bf16: autocast, the matmuls on AMX where the CPU
has it; the deformable sampling kernel computes in fp32).
GFLOPs count a multiply-add as one, as the detection papers do (engine/benchmark.py)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detr_sparse.image_batch import ImageBatch  # noqa: E402
from engine.benchmark import count_flops, measure_latency, peak_memory, train_images_per_second  # noqa: E402
from engine.checkpoint import build_eval_model  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.distributed import resolve_device  # noqa: E402
from engine.memory import reuse_freed_memory  # noqa: E402
from engine.train import autocast  # noqa: E402
from tools._benchmark_components import COMPONENTS  # noqa: E402


def make_input(size: tuple[int, int], batch: int, image: str, device) -> ImageBatch:
    """A real image resized to `size` (normalised as in training), or random pixels."""
    if image:
        from PIL import Image
        from torchvision.transforms.v2 import functional as F

        from datasets.transforms import IMAGENET_MEAN, IMAGENET_STD

        pixels = F.pil_to_tensor(Image.open(image).convert("RGB"))
        pixels = F.resize(pixels, list(size), antialias=True).float() / 255
        pixels = F.normalize(pixels, IMAGENET_MEAN, IMAGENET_STD)
    else:
        pixels = torch.randn(3, *size, generator=torch.Generator().manual_seed(0))
    return ImageBatch.from_images([pixels] * batch).to(device)


def val_image_paths(data_cfg, count: int) -> list[Path]:
    """The first `count` images (by name) of a config's val split; [] without any."""
    from datasets import split_files

    folder = Path(split_files(data_cfg, "val")[0])
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:count]


def val_flops(model, cfg, count: int, device) -> dict:
    """GFLOPs of the whole model and of its backbone, averaged over the first `count` images
    (by name) of the config's val split, each through the evaluation transform: a sparse
    backbone's cost at its own (trained or forced) choices on real images."""
    from datasets.coco import read_image
    from datasets.transforms import build_transforms

    paths = val_image_paths(cfg.data, count)
    if not paths:
        raise FileNotFoundError("--val-images: no images in the val split (data.root / data.val_images)")
    transform = build_transforms(False, cfg.data)
    totals = torch.zeros(2, dtype=torch.float64)
    for path in paths:
        pixels = transform(read_image(str(path))).as_subclass(torch.Tensor)
        flops = count_flops(model, ImageBatch.from_images([pixels]).to(device), getattr(model, "parts", None))
        totals += torch.tensor([flops.total, flops.by_part.get("backbone", 0.0)], dtype=torch.float64)
    mean = totals / len(paths)
    return {"val_images": len(paths), "val_gflops": round(float(mean[0]), 6),
            "val_backbone_gflops": round(float(mean[1]), 6)}


def operating_point(backbone, args, inputs: ImageBatch) -> dict:
    """Force a DGE backbone's routers (--dge-budget / --dge-shares), an SViT backbone's
    gates (--svit-targets) or an SPT's selections (--spt-select); its realised cost share,
    keep share or selected share."""
    if hasattr(backbone, "selection_usage"):
        backbone.forced = args.spt_select or None
        with torch.no_grad():
            backbone(inputs.tensors)
        picked = [float(p.mean()) for _, _, p in backbone.record if p is not None]
        return {"spt_selected": round(sum(picked) / len(picked), 4)}
    if hasattr(backbone, "keep_shares"):
        backbone.forced = args.svit_targets
        with torch.no_grad():
            backbone(inputs.tensors)
        return {"svit_keep": round(float(backbone.keep_shares()[1].mean()), 4)}
    if not hasattr(backbone, "force_budget"):
        return {}
    if args.dge_shares:
        backbone.forced = tuple(args.dge_shares)
    elif args.dge_budget:
        backbone.force_budget(args.dge_budget, inputs.tensors)
    with torch.no_grad():
        backbone(inputs.tensors)
    shares = {k: round(float(v), 4) for k, v in backbone.cost_shares().items()}
    return {"dge_forced": backbone.forced, **shares}


def measure(cfg_path: str, args, checkpoint: str = "") -> list[dict]:
    """One row per --precision: GFLOPs (counted once), latency, backbone latency, memory."""
    cfg = load_config(cfg_path, args.opts)
    device = resolve_device(cfg.device)
    model = build_eval_model(cfg.model, args.num_classes, checkpoint, device)
    inputs = make_input(tuple(args.size), args.batch, args.image, device)
    backbone = getattr(model, "backbone", None)
    sparse = operating_point(backbone, args, inputs) if backbone is not None else {}
    flops = count_flops(model, inputs, getattr(model, "parts", None))
    on_val = val_flops(model, cfg, args.val_images, device) if getattr(args, "val_images", 0) else {}
    # the deformable attention's sampling, counted by its operator's formula (the reference
    # tables' counter leaves grid_sample out, so totals minus this compare with them)
    sampling = sum(v for op, v in flops.by_op.items() if op.startswith("detr_sparse.msda"))
    rows = []
    for precision in args.precision or [cfg.eval.precision]:
        with autocast(device, precision, "--precision"):
            with peak_memory(device) as mem:
                latency = measure_latency(model, inputs, runs=args.runs, warmup=args.warmup)
            # the backbone alone, on what the model hands it (the batch tensor)
            backbone_latency = 0.0 if backbone is None else \
                measure_latency(backbone, inputs.tensors, runs=args.runs, warmup=args.warmup)
        rows.append({"config": cfg_path, "precision": precision, "size": list(args.size), "batch": args.batch,
                     "gflops": round(flops.total, 6), "gflops_deform_sampling": round(sampling, 6),
                     "gflops_by_part": {k: round(v, 6) for k, v in flops.by_part.items()},
                     "latency_s": round(latency, 4), "backbone_latency_s": round(backbone_latency, 4),
                     "peak_mem_mb": round(mem["mb"], 1), "threads": torch.get_num_threads(),
                     "device": str(device), **sparse, **on_val})
    return rows


SHARES = ("dge_beta", "svit_keep", "spt_selected")  # a sparse backbone's operating point


def print_table(rows: list[dict]) -> None:
    parts = sorted({p for r in rows for p in r["gflops_by_part"]})
    head = ["config", "precision", "GFLOPs", "w/o sampling", *parts, "latency s", "backbone s", "peak MB", "x GFLOPs",
            "x latency", "x backbone GFLOPs", "x backbone s", "DGE beta / SViT keep / SPT selected"]
    print(" | ".join(head))
    base = rows[0]

    def ratio(r, key, part=None):
        mine, theirs = (r["gflops_by_part"].get(part, 0), base["gflops_by_part"].get(part, 0)) if part \
            else (r[key], base[key])
        return f"{mine / theirs:.3f}" if theirs else "-"

    for r in rows:
        cells = [Path(r["config"]).stem, r["precision"], f"{r['gflops']:.1f}", f"{r['gflops'] - r['gflops_deform_sampling']:.1f}",
                 *(f"{r['gflops_by_part'].get(p, 0):.1f}" for p in parts),
                 f"{r['latency_s']:.3f}", f"{r['backbone_latency_s']:.3f}", f"{r['peak_mem_mb']:.0f}",
                 ratio(r, "gflops"), ratio(r, "latency_s"), ratio(r, None, "backbone"),
                 ratio(r, "backbone_latency_s"), next((f"{r[k]:.3f}" for k in SHARES if k in r), "-")]
        print(" | ".join(cells))
    for r in rows[:: len({r["precision"] for r in rows})]:
        if "val_gflops" in r:
            print(f"{Path(r['config']).stem}: {r['val_gflops']:.2f} GFLOPs, backbone {r['val_backbone_gflops']:.2f}, "
                  f"the mean over {r['val_images']} val images at the evaluation size")


def train_worker(args) -> None:
    """One torchrun worker of --train: trains, then rank 0 prints every rank's images/s."""
    from engine.distributed import all_gather_objects, cleanup, init_distributed
    from engine.trainer import Trainer

    cfg = load_config(args.config[0], [*args.opts, f"train.max_iters={args.warmup + args.iters}"])
    dist = init_distributed(cfg.device)
    rates = all_gather_objects(train_images_per_second(Trainer(cfg, dist), args.iters, args.warmup))
    if dist.is_main:
        print("THROUGHPUT " + json.dumps(rates))
    cleanup()


def _train_run(args, n: int) -> list[float]:
    """images/s of each of n torchrun processes (one thread each)."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
               __file__, "--train-worker", "--config", args.config[0], "--iters", str(args.iters),
               "--warmup", str(args.warmup), "--opts", *args.opts, f"output_dir={out}"]
        done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    lines = [x for x in done.stdout.splitlines() if x.startswith("THROUGHPUT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"training benchmark with {n} processes failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].split(" ", 1)[1])


def train_scaling(args) -> list[dict]:
    """The training benchmark under torchrun for each process count, one thread each; with
    --repeats, the process counts alternate and the run with the median total is kept, so a
    burst of background load cannot favour one of them."""
    runs = {n: [] for n in args.processes}
    for _ in range(args.repeats):
        for n in args.processes:
            runs[n].append(_train_run(args, n))
    rows = []
    for n, measured in runs.items():
        rates = sorted(measured, key=sum)[len(measured) // 2]
        rows.append({"config": args.config[0], "processes": n, "images_per_s_per_process": rates,
                     "images_per_s": sum(rates), "repeats": [round(sum(r), 2) for r in measured]})
    base = rows[0]["images_per_s"] / rows[0]["processes"]
    print("processes | images/s per process | images/s total | x one process | scaling efficiency")
    for r in rows:
        r["speedup"] = r["images_per_s"] / rows[0]["images_per_s"]
        r["efficiency"] = r["images_per_s"] / (base * r["processes"])
        per = ", ".join(f"{v:.2f}" for v in r["images_per_s_per_process"])
        print(f"{r['processes']} | {per} | {r['images_per_s']:.2f} | {r['speedup']:.2f} | {r['efficiency']:.2f}")
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", nargs="+", help="model configs (not needed with --component)")
    p.add_argument("--component", choices=list(COMPONENTS), help="time one component instead: attention = "
                   "the backbones' attention shapes, fused kernel vs written-out, per precision; msda = "
                   "deformable attention sampling, the device's kernel (CPU: C++; CUDA: Triton) vs grid_sample "
                   "reference, time and peak memory; dge_train = a DGE "
                   "backbone's training step, dense vs sparse form (--dge-backbone); gather = the token "
                   "core's row gather vs torch.gather; spa = SPA's packed attention per selected token vs "
                   "window attention per token; swin_timm = our Swin-T backbone vs timm's (timm installed apart)")
    p.add_argument("--dge-backbone", default="pvt_s_dge", help="--component dge_train: the backbone")
    p.add_argument("--size", nargs=2, type=int, default=[800, 1066], metavar=("H", "W"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--image", default="", help="a real image instead of random input")
    p.add_argument("--checkpoint", nargs="*", default=[], help="weights to load (matter for sparse models): "
                   "one for every config, or one per config")
    p.add_argument("--dge-budget", type=float, default=0.0, help="DGE backbones: force the routers to the "
                   "finest / coarsest mix whose backbone cost share beta is this (random weights)")
    p.add_argument("--dge-shares", nargs=3, type=float, metavar=("FINEST", "MIDDLE", "COARSEST"),
                   help="DGE backbones: force these granularity shares of the regions")
    p.add_argument("--svit-targets", action="store_true", help="SViT backbones: every gated block keeps its "
                   "target share (0.7, 0.49, 0.343 by quarter; for random weights; default: the gates' own choices)")
    p.add_argument("--spt-select", type=float, default=0.0, help="SPT backbones: every SPA block selects this "
                   "share of the tokens, the best by score (for random weights; default: the gates' own choices)")
    p.add_argument("--num-classes", type=int, default=91, help="when the config leaves it to the data")
    p.add_argument("--val-images", type=int, default=0, help="also GFLOPs (whole and backbone) averaged over the "
                   "first N images of the config's val split at the evaluation size (a sparse backbone at its "
                   "trained gates with --checkpoint)")
    p.add_argument("--precision", nargs="+", choices=["fp32", "bf16", "fp16"], default=None,
                   help="forward passes in each of these (autocast; default: the config's eval.precision); "
                        "a row each, ratios against the first row; --component msda: the sampling's inputs "
                        "in each dtype (default fp32)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", action="store_true", help="also print one JSON object per measurement")
    p.add_argument("--opts", nargs="*", default=[], help="config overrides for every config")
    p.add_argument("--train", action="store_true", help="training throughput instead (first config)")
    p.add_argument("--processes", nargs="+", type=int, default=[1, 2])
    p.add_argument("--iters", type=int, default=80, help="--train: timed iterations")
    p.add_argument("--repeats", type=int, default=3, help="--train: runs per process count (median kept)")
    p.add_argument("--train-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    reuse_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.train_worker:
        return train_worker(args)
    if args.component:
        rows = COMPONENTS[args.component](args)
    elif not args.config:
        p.error("--config is required (unless --component)")
    elif args.train:
        rows = train_scaling(args)
    else:
        if len(args.checkpoint) not in (0, 1, len(args.config)):
            p.error(f"--checkpoint: {len(args.checkpoint)} files for {len(args.config)} configs (give one or one each)")
        checkpoints = args.checkpoint * len(args.config) if len(args.checkpoint) == 1 else \
            args.checkpoint or [""] * len(args.config)
        rows = [row for c, w in zip(args.config, checkpoints) for row in measure(c, args, w)]
        print_table(rows)
    if args.json:
        for r in rows:
            print(json.dumps(r))
    return rows



if __name__ == "__main__":
    main()
