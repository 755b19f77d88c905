"""One table of every method: each COCO config built at its paper's input size (the DETR
family 800x1066, the two-stage detectors 800x1280), random weights, batch 1, with its
parameters, GFLOPs and latency in fp32 and bf16 (tools/benchmark.py's measurement; the
sparse backbones at their operating points: SViT's keep targets, DGE beta 0.5, SPT 25% of the
tokens selected). Writes OUT/compare.md, OUT/compare.json and OUT/compare.png (latency against
GFLOPs, one marker per method family); with the synthetic-trained runs it finds under
--runs-dir (a folder with config.yaml, a checkpoint and val AP in log.jsonl), also
OUT/compare_synthetic.png: val box AP50 against latency at the run's own val size.

    python tools/compare.py [--configs configs/detr_r50.yaml ...] [--precision fp32 bf16] \
        [--runs 3] [--out docs/compare] [--runs-dir out]"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.benchmark import parameter_counts  # noqa: E402
from engine.checkpoint import build_eval_model, list_checkpoints  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.memory import reuse_freed_memory  # noqa: E402
from tools.benchmark import measure, val_image_paths  # noqa: E402
from tools.plot_logs import read_log  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TWO_STAGE = ("mask_rcnn", "panoptic_fpn")
# family -> (matplotlib marker); the family of a config by its model and backbone names
MARKERS = {"DETR": "o", "Deformable DETR": "s", "Sparse DETR": "D", "PnP-DETR": "^", "dense two-stage": "v",
           "DGE": "P", "SViT": "X", "SPT": "*"}


def family(cfg) -> str:
    name, backbone = cfg.model.name, cfg.model.backbone.name
    if name in TWO_STAGE:
        for tag, fam in (("_dge", "DGE"), ("_svit", "SViT"), ("spt_", "SPT")):
            if tag in backbone:
                return fam
        return "dense two-stage"
    return {"detr": "DETR", "sparse_detr": "Sparse DETR", "pnp_detr": "PnP-DETR"}.get(name, "Deformable DETR")


def coco_configs() -> list[Path]:
    """Every config of configs/ for COCO (the synthetic ones and the quick start left out)."""
    return sorted(p for p in (REPO / "configs").glob("*.yaml") if "synthetic" not in p.stem and p.stem != "quickstart")


def bench_args(size, runs: int, precision: list[str], opts=()) -> SimpleNamespace:
    """tools/benchmark.py's options for one measurement at the operating points."""
    return SimpleNamespace(opts=list(opts), num_classes=91, size=list(size), batch=1, image="", runs=runs, warmup=1,
                           precision=precision, dge_budget=0.5, dge_shares=None, svit_targets=True, spt_select=0.25)


def measure_config(path: Path, runs: int, precision: list[str], size=None, opts=()) -> list[dict]:
    cfg = load_config(path, list(opts))
    size = size or ((800, 1280) if cfg.model.name in TWO_STAGE else (800, 1066))
    params = parameter_counts(build_eval_model(cfg.model, 91, "", "cpu"))["total"]
    rows = [{**row, "name": path.stem, "family": family(cfg), "params_m": params / 1e6}
            for row in measure(str(path), bench_args(size, runs, precision, opts))]
    print(f"{path.stem}: {rows[0]['gflops']:.1f} GFLOPs, latency s " +
          ", ".join(f"{r['precision']} {r['latency_s']:.3f}" for r in rows), flush=True)  # progress of a long run
    return rows


def synthetic_runs(runs_dir: Path, runs: int, precision: str) -> list[dict]:
    """Each run under runs_dir with a checkpoint and a val AP50: its last AP50, and its latency
    at its val size on its first val image with its trained weights (its own gates), median of
    10x `runs`."""
    found = []
    for cfg_path in sorted(runs_dir.glob("*/config.yaml")):
        log = cfg_path.parent / "log.jsonl"
        checkpoints = list_checkpoints(cfg_path.parent)
        if not log.is_file() or not checkpoints:
            continue
        checkpoint = checkpoints[0]
        evals = [r for r in read_log(log) if "bbox_AP50" in r]  # a line cut short by a killed run skipped
        if not evals:
            continue
        cfg = load_config(cfg_path)
        size = (cfg.data.val_size, cfg.data.val_size)
        # a 0.1 s model varies by 10% from run to run: 10x the runs, on the run's first val image
        # (a sparse backbone's gates decide on real content, not on random pixels)
        args = bench_args(size, 10 * runs, [precision])
        args.image = str(first_val_image(cfg.data))
        args.svit_targets, args.dge_budget, args.spt_select = False, 0.0, 0.0  # the trained gates decide
        args.num_classes = cfg.model.num_classes or 8
        try:
            row = measure(str(cfg_path), args, str(checkpoint))[0]
        except Exception as e:  # a run of another version of a model: left out, said so
            print(f"skipped {cfg_path.parent}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            continue
        found.append({"run": cfg_path.parent.name, "family": family(cfg), "AP50": evals[-1]["bbox_AP50"],
                      "latency_s": row["latency_s"], "size": list(size)})
    return found


def first_val_image(data) -> Path | str:
    """The first image (by name) of a config's val split, or "" (random pixels, said) without one."""
    images = val_image_paths(data, 1)
    if not images:
        print("no val images in the run's val split: timed on random pixels")
    return images[0] if images else ""


def markdown(rows: list[dict]) -> str:
    precisions = list(dict.fromkeys(r["precision"] for r in rows))
    head = ["config", "family", "input", "params (M)", "GFLOPs", *(f"latency s ({p})" for p in precisions)]
    lines = [" | ".join(head), " | ".join(["---"] * len(head))]
    for name in dict.fromkeys(r["name"] for r in rows):
        mine = {r["precision"]: r for r in rows if r["name"] == name}
        first = next(iter(mine.values()))
        lines.append(" | ".join([name, first["family"], "x".join(map(str, first["size"])), f"{first['params_m']:.1f}",
                                 f"{first['gflops']:.1f}", *(f"{mine[p]['latency_s']:.3f}" for p in precisions)]))
    return "\n".join(f"| {line} |" for line in lines) + "\n"


# long config-name prefixes and their plot labels (the markers already say the family)
SHORT = (("mask_rcnn_", "MR "), ("panoptic_fpn_", "PFPN "), ("deformable_detr", "DDETR"), ("sparse_detr", "SDETR"),
         ("pnp_detr", "PnP"), ("_synthetic", ""), ("_adapter", "+A"))


def short(name: str) -> str:
    """A plot label: `mask_rcnn_deit_s_adapter_svit` -> `MR deit_s+A_svit`."""
    for long, brief in SHORT:
        name = name.replace(long, brief)
    return name


def plot(points: list[dict], x: str, y: str, path: Path, xlabel: str, ylabel: str, label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for fam, marker in MARKERS.items():
        mine = [p for p in points if p["family"] == fam]
        if mine:
            ax.scatter([p[x] for p in mine], [p[y] for p in mine], marker=marker, s=60, label=fam)
            for p in mine:
                ax.annotate(short(p[label]), (p[x], p[y]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", type=Path, default=None, help="default: every COCO config")
    p.add_argument("--size", nargs=2, type=int, default=None, metavar=("H", "W"), help="default: the paper's")
    p.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    p.add_argument("--runs", type=int, default=3, help="latency: median of this many runs")
    p.add_argument("--out", type=Path, default=Path("docs/compare"))
    p.add_argument("--runs-dir", type=Path, default=None, help="synthetic-trained runs to plot (e.g. out)")
    p.add_argument("--opts", nargs="*", default=[], help="config overrides for every config")
    p.add_argument("--runs-only", action="store_true", help="only the --runs-dir runs (minutes, not the "
                   "COCO configs' 45); OUT's table of the models is kept")
    args = p.parse_args(argv)
    if args.runs_only and not args.runs_dir:
        p.error("--runs-only times the runs of --runs-dir: give it")
    reuse_freed_memory()
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / "compare.json"
    if args.runs_only:  # the models' table of an earlier run is kept
        rows = json.loads(saved.read_text())["models"] if saved.is_file() else []
    else:
        rows = [row for path in (args.configs or coco_configs())
                for row in measure_config(path, args.runs, args.precision, args.size, args.opts)]
        (args.out / "compare.md").write_text(markdown(rows))
        first = [r for r in rows if r["precision"] == args.precision[0]]
        plot(first, "gflops", "latency_s", args.out / "compare.png", "GFLOPs",
             f"latency s ({args.precision[0]}, batch 1)", "name")
    trained = synthetic_runs(args.runs_dir, args.runs, args.precision[0]) if args.runs_dir else []
    saved.write_text(json.dumps({"models": rows, "synthetic_runs": trained}, indent=1))
    if trained:
        plot(trained, "latency_s", "AP50", args.out / "compare_synthetic.png",
             f"latency s ({args.precision[0]}, val size)", "val box AP50 (synthetic)", "run")
    print("" if args.runs_only else markdown(rows), end="")
    return {"models": rows, "synthetic_runs": trained}


if __name__ == "__main__":
    main()
