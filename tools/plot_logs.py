"""Training curves of one or several runs from their log.jsonl, as one PNG: the training loss
(every logged iteration, faint, and its moving average over --smooth points), the learning
rate, and the val AP against the epoch (box AP and AP50, mask AP and PQ where the run has
them; --ap names others, any key of the val records). A colour per run.

    python tools/plot_logs.py out/run_a [out/run_b ...] --out curves.png [--smooth 10] \
        [--ap bbox_AP50 segm_AP50]

A run folder or its log.jsonl file may be named. A step logged twice (a run resumed from a
checkpoint repeats the steps after it) keeps its last record."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_AP = ("bbox_AP", "bbox_AP50", "segm_AP", "panoptic_PQ")
STYLES = ("-", "--", ":", "-.")


def read_log(path: str | Path) -> list[dict]:
    """The records of a run's log.jsonl (a line cut short by a killed run is skipped)."""
    path = Path(path)
    path = path / "log.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no log: {path} is missing")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def series(records: list[dict], kind: str, key: str, x: str = "step") -> tuple[list[float], list[float]]:
    """(x, value) of `key` in the records of `kind`, in step order, the last record of a step."""
    by_step = {r["step"]: r for r in records if r.get("kind") == kind and key in r}
    rows = [by_step[s] for s in sorted(by_step)]
    return [r[x] for r in rows], [r[key] for r in rows]


def moving_average(values: list[float], window: int) -> list[float]:
    """Each value's mean with up to window - 1 values before it."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_runs(runs: list[str | Path], out: str | Path, smooth: int = 10, ap_keys=()) -> dict:
    """Write the PNG; returns {run: {"loss": (x, y), "lr": (x, y), key: (epochs, y) for each AP key}}."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, (loss_ax, lr_ax, ap_ax) = plt.subplots(1, 3, figsize=(16, 4.8))
    plotted = {}
    for i, run in enumerate(runs):
        records, color, name = read_log(run), f"C{i % 10}", Path(run).name if Path(run).is_dir() else Path(run).parent.name
        kind = "train" if any(r.get("kind") == "train" for r in records) else "train_epoch"
        curves = {"loss": series(records, kind, "loss"), "lr": series(records, kind, "lr")}
        steps, loss = curves["loss"]
        loss_ax.plot(steps, loss, color=color, alpha=0.25, linewidth=0.8)
        loss_ax.plot(steps, moving_average(loss, max(smooth, 1)), color=color, label=name)
        lr_ax.plot(*curves["lr"], color=color, label=name)
        keys = ap_keys or [k for k in DEFAULT_AP if any(k in r for r in records if r.get("kind") == "val")]
        for j, key in enumerate(keys):
            curves[key] = series(records, "val", key, x="epoch")
            ap_ax.plot(*curves[key], STYLES[j % len(STYLES)], color=color, marker="o", markersize=3,
                       label=f"{name} {key}")
        plotted[name] = curves
    for ax, title, xlabel in ((loss_ax, f"training loss (moving average of {smooth})", "iteration"),
                              (lr_ax, "learning rate", "iteration"), (ap_ax, "val", "epoch")):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ap_ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return plotted


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (or their log.jsonl files)")
    p.add_argument("--out", default="curves.png", help="the PNG to write")
    p.add_argument("--smooth", type=int, default=10, help="moving-average window of the loss, in logged points")
    p.add_argument("--ap", nargs="*", default=[], help=f"val keys to plot (default: those of {DEFAULT_AP} logged)")
    args = p.parse_args(argv)
    try:
        plotted = plot_runs(args.runs, args.out, args.smooth, args.ap)
    except FileNotFoundError as e:
        p.error(str(e))
    print(f"{args.out}: {', '.join(plotted)}")
    return plotted


if __name__ == "__main__":
    main()
