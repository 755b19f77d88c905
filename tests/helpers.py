"""Shared test constants and config overrides (fixtures live in conftest.py)."""
import json
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

TINY_MODEL = ["model.backbone.name=resnet18", "model.backbone.norm=gn", "model.backbone.lr=1e-4",
              "model.num_queries=8", "model.transformer.hidden_dim=64", "model.transformer.nheads=4",
              "model.transformer.enc_layers=1", "model.transformer.dec_layers=2",
              "model.transformer.dim_feedforward=128"]


def tiny_overrides(data_root, output_dir, **extra) -> list[str]:
    """A tiny DETR on the tiny synthetic set, one process, CPU."""
    opts = TINY_MODEL + [
        f"data.root={data_root}", f"output_dir={output_dir}", "data.train_scales=[64,80]",
        "data.max_size=128", "data.crop_resize_scales=[64]", "data.crop_size=[48,64]",
        "data.val_size=80", "data.num_workers=0", "train.batch_size=2", "eval.batch_size=2",
        "train.log_every=1", "train.lr=1e-4", "device=cpu"]
    return opts + [f"{k}={v}" for k, v in extra.items()]


def one_line_error(fn, *args, **kwargs) -> str:
    """The message of the ConversionError or CheckpointError that fn(*args, **kwargs) raises,
    checked to be one line."""
    import pytest

    from detr_sparse.official import ConversionError
    from engine.checkpoint import CheckpointError

    with pytest.raises((ConversionError, CheckpointError)) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


def run_checked(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run that, when the command fails, fails the test with the end of its
    output (a launch's error is in its stderr, which pytest would not otherwise show)."""
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)
    if done.returncode:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-60:])
        raise AssertionError(f"{' '.join(map(str, cmd[:4]))} ... exited {done.returncode}:\n{tail}")
    return done


def train_losses(out) -> list[float]:
    """The loss of every logged training step of a run (log.jsonl)."""
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def checkpoint_model(out) -> dict:
    """The model weights of a run's newest checkpoint."""
    return torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)["model"]

def sampling_inputs(batch, level_shapes, queries, heads=2, dim=3, points=2, dtype=torch.float64, seed=0):
    """Random inputs of the deformable attention's sampling core: (value, spatial_shapes,
    level_start_index, sampling_locations, attention_weights), shapes in msda_ops."""
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(level_shapes)
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    levels = len(level_shapes)
    value = torch.randn(batch, int(sizes.sum()), heads, dim, generator=g, dtype=dtype)
    # some samples fall outside the maps (they read zeros), some on partial corners
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=g, dtype=dtype) * 1.4 - 0.2
    weights = torch.rand(batch, queries, heads, levels, points, generator=g, dtype=dtype)
    return value, shapes, starts, locations, weights


def record_host_reads(monkeypatch) -> list[str]:
    """A list that records, from now on, every call of a tensor method that reads values back
    to the host (on CUDA each waits for the device: a sync), by name."""
    reads = []
    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "nonzero"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *args, _f=original, _n=name, **kwargs:
                            reads.append(_n) or _f(self, *args, **kwargs))
    return reads


# A tiny Deformable DETR (3 backbone levels + 0 extra by default, 2 sampling points)
TINY_DEFORMABLE = ["model.name=deformable_detr", "model.backbone.name=resnet18",
                   "model.backbone.norm=gn", "model.backbone.out_features=[res3,res4,res5]",
                   "model.num_queries=10", "model.transformer.hidden_dim=64",
                   "model.transformer.nheads=4", "model.transformer.enc_layers=1",
                   "model.transformer.dec_layers=2", "model.transformer.dim_feedforward=64",
                   "model.transformer.num_feature_levels=3", "model.transformer.enc_n_points=2",
                   "model.transformer.dec_n_points=2", "model.loss.cls_weight=2",
                   "model.loss.cost_class=2"]


def padded_feature_batch(model, images: list) -> tuple[list, list, list]:
    """A deformable model's projected maps of each image alone (model.features), and the
    same maps batched with 10x noise in the padding, with their masks: what a padded batch
    must reproduce from the maps on (a CNN sees the zero-padded image differently at the
    valid border, so the backbone is left out of such comparisons).
    -> (per image (srcs, masks), batched srcs, batched masks)."""
    from detr_sparse.image_batch import ImageBatch

    alone = [model.features(ImageBatch.from_images([img])) for img in images]
    srcs, masks = [], []
    for level in range(len(alone[0][0])):
        maps = [a[0][level][0] for a in alone]
        h, w = max(m.shape[1] for m in maps), max(m.shape[2] for m in maps)
        src = 10 * torch.randn(len(maps), maps[0].shape[0], h, w)
        mask = torch.ones(len(maps), h, w, dtype=torch.bool)
        for i, m in enumerate(maps):
            src[i, :, :m.shape[1], :m.shape[2]] = m
            mask[i, :m.shape[1], :m.shape[2]] = False
        srcs.append(src)
        masks.append(mask)
    return alone, srcs, masks


@torch.no_grad()
def predict_batched_and_alone(model, images: list) -> tuple[dict, list[dict], list]:
    """A deformable model's raw outputs for `images` as one padded batch (from the maps on,
    see padded_feature_batch) and for each image alone; and the batch's per-level masks."""
    alone, srcs, masks = padded_feature_batch(model, images)
    return model.predict(srcs, masks), [model.predict(s, m) for s, m in alone], masks


def two_image_batch(size_a=(64, 96), size_b=(96, 64)):
    """Two images of different sizes (so one is padded) with 1 and 2 boxes (absolute xyxy)."""
    from detr_sparse.image_batch import ImageBatch

    torch.manual_seed(1)
    images = ImageBatch.from_images([torch.randn(3, *size_a), torch.randn(3, *size_b)])
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 50.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[5.0, 5.0, 40.0, 30.0], [20.0, 60.0, 50.0, 90.0]]),
                "labels": torch.tensor([0, 2])}]
    return images, targets


def train_steps(model, images, targets, steps: int, lr: float = 1e-3) -> list[float]:
    """The total loss of each of `steps` AdamW steps on one fixed batch."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = sum(v for k, v in model(images, targets).items() if k.startswith("loss"))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
