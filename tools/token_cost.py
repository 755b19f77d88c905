"""What a computed token costs on the token-sparse backbones' sparse path against the dense
path, per method (random weights, one random image, evaluation, no gradient):

    python tools/token_cost.py [--methods dge svit svit_adapter spt] [--size 800 1280] [--runs 5] \
        [--precision fp32 bf16]

Three latencies of the backbone, timed in turns (median of --runs rounds): the dense backbone (T_dense); the sparse one computing every
token (T_full: every SViT gate keeps all, every DGE region finest, every SPT token selected);
and at the method's operating point (T_op: SViT's keep targets, DGE beta 0.5, SPT 25% of the
tokens selected in every SPA block). N counts the tokens the sparse blocks compute, summed
over them: SViT the kept tokens of the gated blocks, DGE the queries of the DGE blocks, SPT
the selected tokens of the SPA blocks. Then

- the sparse path's cost per 1,000 computed tokens, its slope: (T_full - T_op) / (N_full - N_op);
- the part that does not scale with the tokens (stem, adapter or pyramid, other blocks,
  gates): fixed = T_op - slope * N_op;
- the dense path's cost per 1,000 tokens: (T_dense - fixed) / N_full;

and their ratio (above 1: the sparse path pays per token for gathers, put-backs, masks or
smaller matrix products), with T_full / T_dense (what the sparse path costs when it prunes
nothing)."""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detr_sparse.backbones import build_backbone  # noqa: E402
from detr_sparse.sparsity.dge import SPLITS  # noqa: E402
from engine.benchmark import time_calls  # noqa: E402
from engine.config import BackboneConfig  # noqa: E402
from engine.memory import reuse_freed_memory  # noqa: E402
from engine.train import autocast  # noqa: E402

# method -> (dense backbone, sparse backbone)
METHODS = {"dge": ("pvt_s", "pvt_s_dge"), "svit": ("deit_s", "deit_s_svit"),
           "svit_adapter": ("deit_s_adapter", "deit_s_adapter_svit"), "spt": ("swin_t", "spt_t12")}
_MAPS = ("res2", "res3", "res4", "res5")


def force(backbone, full: bool, x: torch.Tensor, svit_targets: list[float]) -> None:
    """Every token computed (full) or the method's operating point (SViT: `svit_targets`,
    the backbone's own keep targets)."""
    if hasattr(backbone, "keep_shares"):  # SViT
        backbone.forced = True
        backbone.targets = [1.0] * len(svit_targets) if full else list(svit_targets)
    elif hasattr(backbone, "force_budget"):  # DGE
        if full:
            backbone.forced = (1.0, 0.0, 0.0)
        else:
            backbone.force_budget(0.5, x)
    else:  # SPT
        backbone.forced = 1.0 if full else 0.25


def computed_tokens(backbone) -> int:
    """The tokens the sparse blocks computed in the last pass, summed over them."""
    if hasattr(backbone, "keep_shares"):
        return int(sum(k.sum() for k in backbone.keeps))
    if hasattr(backbone, "force_budget"):
        queries = torch.tensor([n * n for n in SPLITS] + [0])  # index -1: padding
        return int(sum(queries[choice].sum() for _, choice, _ in backbone.choices))
    return int(sum(p.sum() for _, _, p in backbone.record if p is not None))


def token_cost(method: str, size: tuple[int, int], runs: int, precision: str) -> dict:
    dense_name, sparse_name = METHODS[method]
    torch.manual_seed(0)
    x = torch.randn(1, 3, *size)
    dense = build_backbone(BackboneConfig(name=dense_name), _MAPS).eval()
    sparse = build_backbone(BackboneConfig(name=sparse_name), _MAPS).eval()
    row = {"method": method, "dense": dense_name, "sparse": sparse_name, "size": list(size), "precision": precision}
    targets = list(getattr(sparse, "targets", []))
    forced = {"full": sparse, "op": copy.deepcopy(sparse)}  # the same weights at the two points
    with autocast(x.device, precision, "--precision"), torch.no_grad():
        for point, backbone in forced.items():
            force(backbone, point == "full", x, targets)
            backbone(x)
            row[f"tokens_{point}"] = computed_tokens(backbone)
        # in turns, so a machine's drift during the measurement moves the three alike
        row["dense_s"], row["full_s"], row["op_s"] = time_calls(
            [lambda: dense(x), lambda: forced["full"](x), lambda: forced["op"](x)], runs)
    slope = (row["full_s"] - row["op_s"]) / max(row["tokens_full"] - row["tokens_op"], 1)
    fixed = row["op_s"] - slope * row["tokens_op"]
    row["sparse_ms_per_1k"] = slope * 1e6
    row["dense_ms_per_1k"] = (row["dense_s"] - fixed) / row["tokens_full"] * 1e6
    row["fixed_s"] = fixed
    row["per_token_ratio"] = row["sparse_ms_per_1k"] / row["dense_ms_per_1k"]
    row["full_over_dense"] = row["full_s"] / row["dense_s"]
    return row


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--size", nargs=2, type=int, default=[800, 1280], metavar=("H", "W"))
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32"])
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    reuse_freed_memory()
    rows = [token_cost(m, tuple(args.size), args.runs, prec) for prec in args.precision for m in args.methods]
    print("method | precision | dense s | full s | op s | tokens full / op | fixed s | "
          "sparse ms per 1k tokens | dense ms per 1k | x per token | full / dense")
    for r in rows:
        print(f"{r['method']} | {r['precision']} | {r['dense_s']:.3f} | {r['full_s']:.3f} | {r['op_s']:.3f} | "
              f"{r['tokens_full']} / {r['tokens_op']} | {r['fixed_s']:.3f} | {r['sparse_ms_per_1k']:.2f} | "
              f"{r['dense_ms_per_1k']:.2f} | {r['per_token_ratio']:.2f} | {r['full_over_dense']:.2f}")
    if args.json:
        for r in rows:
            print(json.dumps(r))
    return rows


if __name__ == "__main__":
    main()
