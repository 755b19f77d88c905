"""The components `tools/benchmark.py --component NAME` times on their own (see its --help):
attention (the backbones' attention shapes, torch's fused kernel vs the written-out form),
msda (the deformable sampling kernel against the grid_sample reference), dge_train (a DGE
backbone's training step, dense vs sparse form), gather (the token core's row gather vs
torch.gather), spa (SPA's packed attention per selected token vs window attention per token)
and swin_timm (our Swin-T backbone vs timm's, installed apart). Each takes the parsed
arguments and returns its rows, printing a table."""
from __future__ import annotations

import torch

from detr_sparse.backbones import build_backbone
from engine.benchmark import peak_memory, time_call, time_calls
from engine.config import BackboneConfig
from engine.distributed import resolve_device
from engine.train import autocast


def msda_inputs(size: tuple[int, int], batch: int, d_model: int = 256, heads: int = 8,
                points: int = 4, strides=(8, 16, 32, 64)) -> tuple:
    """The deformable encoder's sampling inputs for one image size: every token of 4 levels
    queries 8 heads x 4 levels x 4 points around itself."""
    g = torch.Generator().manual_seed(0)
    shapes = torch.tensor([[-(-size[0] // s), -(-size[1] // s)] for s in strides])
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    n, levels = int(sizes.sum()), len(strides)
    value = torch.randn(batch, n, heads, d_model // heads, generator=g)
    locations = torch.rand(batch, n, heads, levels, points, 2, generator=g) * 1.1 - 0.05
    weights = torch.randn(batch, n, heads, levels * points, generator=g).softmax(-1)
    return value, shapes, starts, locations, weights.view(batch, n, heads, levels, points)


def msda_component(args) -> list[dict]:
    """Median seconds and peak memory (MB above the inputs) of the deformable attention's
    sampling: the kernel a model runs on the device (MSDeformAttn.impl, by default the
    environment's DETR_SPARSE_MSDA or "auto": CPU the C++ kernel, "fast"; CUDA Triton) against
    the grid_sample reference (plain autograd), forward and forward + backward, batches 1 and
    2, in each --precision (default fp32: value, locations and weights in that dtype; the C++
    kernel computes in fp32)."""
    from detr_sparse.transformers.ms_deform_attn import MSDeformAttn, ms_deform_attn_core, resolve
    from detr_sparse.transformers.msda_ops import grid_sample_core

    device = resolve_device("auto")
    kernel = resolve(MSDeformAttn.impl, device)
    if kernel == "reference":
        print(f"no deformable attention kernel for {device.type} here: the reference against itself")
    cores = {kernel: lambda *inputs: ms_deform_attn_core(*inputs, impl=kernel), "reference": grid_sample_core}
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    rows = []
    print(f"precision | batch | queries | forward {kernel} / reference s | x | MB | "
          f"forward+backward {kernel} / reference s | x | MB")
    for precision in args.precision or ["fp32"]:
        for batch in (1, 2):
            value, shapes, starts, locations, weights = (
                t.to(device, dtypes[precision]) if t.is_floating_point() else t.to(device)
                for t in msda_inputs(tuple(args.size), batch))
            row = {"component": "msda", "device": str(device), "kernel": kernel, "precision": precision,
                   "size": list(args.size), "batch": batch, "queries": value.shape[1]}
            for name, core in cores.items():
                leaves = [t.clone().requires_grad_(True) for t in (value, locations, weights)]
                steps = {"forward": torch.no_grad()(lambda: core(value, shapes, starts, locations, weights)),
                         "train": lambda: core(leaves[0], shapes, starts, *leaves[1:]).sum().backward()}
                for step, run in steps.items():
                    row[f"{step}_{name}_s"] = time_call(run, args.runs, args.warmup)
                    with peak_memory(device) as mem:
                        run()
                    row[f"{step}_{name}_mb"] = round(mem["mb"], 1)
            for step in ("forward", "train"):
                row[f"{step}_speedup"] = row[f"{step}_reference_s"] / row[f"{step}_{kernel}_s"]
            rows.append(row)
            print(" | ".join([precision, str(batch), str(row["queries"])] + [
                f"{row[f'{step}_{kernel}_s']:.4f} / {row[f'{step}_reference_s']:.4f} | "
                f"{row[f'{step}_speedup']:.2f} | {row[f'{step}_{kernel}_mb']:.0f} / {row[f'{step}_reference_mb']:.0f}"
                for step in ("forward", "train")]))
    return rows


def dge_component(args) -> list[dict]:
    """Median seconds of a DGE backbone's training step (forward + backward of the maps'
    sum and the budget loss) in its exact dense form and in the sparse form, against the
    dense backbone, at a forced operating point (--dge-budget, default 0.5) on random input
    of --size, --batch images: what decides the training form."""

    name = args.dge_backbone
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, *args.size)
    dense = build_backbone(BackboneConfig(name=name.removesuffix("_dge")), ("res2", "res3", "res4", "res5"))
    dge = build_backbone(BackboneConfig(name=name), ("res2", "res3", "res4", "res5"))
    dge.force_budget(args.dge_budget or 0.5, x[:1])

    def step(model):
        model.train()
        if hasattr(model, "forward_with_losses"):
            maps, extra = model.forward_with_losses(x, [{}] * args.batch)
            loss = extra["loss_budget"] + sum(m.float().mean() for m in maps.values())
        else:
            loss = sum(m.float().mean() for m in model(x).values())
        loss.backward()

    row = {"component": "dge_train", "backbone": name, "size": list(args.size), "batch": args.batch,
           "forced": dge.forced}
    row["dense_backbone_s"] = time_call(lambda: step(dense), args.runs, args.warmup)
    for form, sparse in (("dense_form", False), ("sparse_form", True)):
        dge.sparse_train = sparse
        row[f"{form}_s"] = time_call(lambda: step(dge), args.runs, args.warmup)
    row["beta"] = round(float(dge.cost_shares()["dge_beta"]), 4)
    print("backbone | size | batch | beta | dense backbone s | DGE dense form s (x) | DGE sparse form s (x)")
    print(f"{name} | {args.size[0]}x{args.size[1]} | {args.batch} | {row['beta']:.3f} | {row['dense_backbone_s']:.3f} | "
          f"{row['dense_form_s']:.3f} ({row['dense_form_s'] / row['dense_backbone_s']:.2f}) | "
          f"{row['sparse_form_s']:.3f} ({row['sparse_form_s'] / row['dense_backbone_s']:.2f})")
    return [row]


def gather_component(args) -> list[dict]:
    """Median seconds of the token core's `gather_tokens` (whole rows by index_select)
    against torch.gather with the index expanded over the channels, at the sizes of a DGE
    put-back on PVT-S stages 1-3 at 800x1280 (every token takes one of ~0.45 N queries),
    forward and forward + backward."""
    from detr_sparse.sparsity.tokens import gather_tokens

    def reference(x, index):
        return x.gather(1, index[..., None].expand(*index.shape, x.shape[-1]))

    rows = []
    print("tokens | rows | channels | forward ours / torch.gather s | x | +backward ours / torch.gather s | x")
    g = torch.Generator().manual_seed(0)
    for n, c in ((64000, 64), (16000, 128), (4000, 320)):
        q = int(0.45 * n)
        values, index = torch.randn(args.batch, q, c, generator=g), torch.randint(0, q, (args.batch, n), generator=g)
        row = {"component": "gather", "tokens": n, "rows": q, "channels": c, "batch": args.batch}
        for name, fn in (("ours", gather_tokens), ("torch_gather", reference)):
            row[f"forward_{name}_s"] = time_call(lambda: fn(values, index), args.runs, args.warmup)
            leaf = values.clone().requires_grad_(True)
            row[f"train_{name}_s"] = time_call(lambda: fn(leaf, index).sum().backward(), args.runs, args.warmup)
        rows.append(row)
        print(f"{n} | {q} | {c} | {row['forward_ours_s']:.4f} / {row['forward_torch_gather_s']:.4f} | "
              f"{row['forward_torch_gather_s'] / row['forward_ours_s']:.1f} | {row['train_ours_s']:.4f} / "
              f"{row['train_torch_gather_s']:.4f} | {row['train_torch_gather_s'] / row['train_ours_s']:.1f}")
    return rows


def spa_component(args) -> list[dict]:
    """Cost per token of the attention half of a Swin-T stage-3 block (random weights, one
    image at --size, a shifted block): window attention over every token against SPA's
    packed attention over the selected ones (gathering, packing and putting back included;
    sdpa and flex kernels), at selected shares 0.25, 0.5 and 1; forward, no gradient."""
    from detr_sparse.backbones.spt import SPTBackbone
    from detr_sparse.sparsity import spa

    block = SPTBackbone("spt_t12", out_features=("res2", "res3", "res4")).eval().features[5][1]
    h, w = -(-args.size[0] // 16), -(-args.size[1] // 16)
    g = torch.Generator().manual_seed(0)
    x, score = torch.randn(1, h, w, 384, generator=g), torch.randn(1, h, w, generator=g)
    layout = spa.stage_layout([(h, w)], w, 7, block.attn.shift_size[0], x.device)
    rows = []
    with torch.no_grad():
        normed = block.norm1(x)
        window = time_call(lambda: x + block.attn(normed), args.runs, args.warmup)
        print(f"window attention: {h * w} tokens, {window * 1e3:.1f} ms, {window / (h * w) * 1e6:.2f} us per token")
        print("selected share | tokens | containers | kernel | ms | us per selected token | x window's per token")
        for share in (0.25, 0.5, 1.0):
            picked = spa.select(score, None, False, 0.01, 1.0, forced=share)
            packing = spa.packing_of(picked, layout)
            count = len(packing.rows)
            for backend in ("sdpa", "flex"):
                spa.spa_attention(block, x, normed, score, picked, packing, layout, backend)  # compiles flex
                t = time_call(lambda: spa.spa_attention(block, x, normed, score, picked, packing, layout, backend),
                              args.runs, args.warmup)
                ratio = (t / count) / (window / (h * w))
                rows.append({"component": "spa", "size": list(args.size), "share": share, "tokens": count,
                             "containers": packing.shape[0], "kernel": backend, "seconds": t,
                             "window_seconds": window, "per_token_ratio": ratio})
                print(f"{share} | {count} | {packing.shape[0]} | {backend} | {t * 1e3:.1f} | {t / count * 1e6:.2f} | "
                      f"{ratio:.2f}")
    return rows


def swin_timm_component(args) -> list[dict]:
    """This project's Swin-T backbone (res3-res5) against timm's `swin_tiny_patch4_window7_224`
    features (the official Swin's layout, Sparse DETR's backbone) at --size, random weights,
    batch --batch, median seconds of each in --precision. timm is not a dependency: install it
    apart (pip install --target DIR timm huggingface_hub safetensors; PYTHONPATH=DIR)."""

    try:
        import timm
    except ImportError as e:
        raise SystemExit(f"--component swin_timm needs timm ({e}); install it apart, see --help") from e
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, *args.size)
    ours = build_backbone(BackboneConfig(name="swin_t"), ("res3", "res4", "res5")).eval()
    theirs = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, features_only=True,
                               out_indices=(1, 2, 3), img_size=tuple(args.size), strict_img_size=False).eval()
    rows = []
    print("precision | ours s | timm s | ours / timm")
    for precision in args.precision or ["fp32"]:
        with torch.no_grad(), autocast(x.device, precision, "--precision"):  # in turns: drift cancels
            ours_s, timm_s = time_calls([lambda: ours(x), lambda: theirs(x)], args.runs, args.warmup)
        row = {"component": "swin_timm", "size": list(args.size), "batch": args.batch, "precision": precision,
               "ours_s": ours_s, "timm_s": timm_s}
        row["ratio"] = row["ours_s"] / row["timm_s"]
        rows.append(row)
        print(f"{precision} | {row['ours_s']:.3f} | {row['timm_s']:.3f} | {row['ratio']:.2f}")
    return rows


def attention_component(args) -> list[dict]:
    """The backbones' attention shapes at 800x1280, each form (torch's fused kernel, the
    written-out matrix products and softmax) in each --precision: median seconds, and the form
    `detr_sparse.transformers.attention` picks."""
    from torch.nn import functional as F

    from detr_sparse.transformers.attention import WRITTEN_OUT_MAX_KEYS, written_out

    g = torch.Generator().manual_seed(0)
    # name, (batch, heads, queries, keys, channels per head)
    shapes = [("Swin-T stage 1 windows", (1360, 3, 49, 49, 32)), ("Swin-T stage 3 windows", (88, 12, 49, 49, 32)),
              ("PVT-S stage 1 (keys 8x reduced)", (1, 1, 16000, 250, 64)),
              ("DeiT-S global", (1, 6, 4000, 4000, 64))]
    rows = []
    print("shape | precision | fused s | written-out s | written / fused | picked")
    for name, (b, h, n, m, c) in shapes:
        q, k, v = (torch.randn(b, h, length, c, generator=g) for length in (n, m, m))
        for precision in args.precision or ["fp32"]:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
            tq, tk, tv = q.to(dtype), k.to(dtype), v.to(dtype)
            fused, written = time_calls([lambda: F.scaled_dot_product_attention(tq, tk, tv),
                                         lambda: written_out(tq, tk, tv)], args.runs, args.warmup)
            picked = "written-out" if dtype != torch.float32 and m <= WRITTEN_OUT_MAX_KEYS else "fused"
            rows.append({"component": "attention", "shape": name, "precision": precision, "fused_s": fused,
                         "written_out_s": written, "picked": picked})
            print(f"{name} | {precision} | {fused:.4f} | {written:.4f} | {written / fused:.2f} | {picked}")
    return rows


COMPONENTS = {"attention": attention_component, "msda": msda_component, "dge_train": dge_component,
              "gather": gather_component, "spa": spa_component, "swin_timm": swin_timm_component}
