"""The console while a progress bar is drawn: log lines above the bar, never through it, and
no bar at all where no terminal is attached (a log file); the training step's use of the
grad scaler (fp16 on CUDA)."""
import io
import logging
import re
import sys
from types import SimpleNamespace

import pytest
import torch

from engine.logger import setup_logging
from engine.train import TrainState, _train_step, progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def _console_lines(text: str) -> list[str]:
    """What a terminal shows line by line: a carriage return starts the line over."""
    return [re.split(r"\r", line)[-1] for line in text.split("\n")]


def _run(monkeypatch, tmp_path, stream) -> None:
    monkeypatch.setattr(sys, "stdout", stream)
    monkeypatch.setattr(sys, "stderr", stream)
    log = setup_logging(tmp_path, is_main=True)
    with progress(range(3), "epoch 0", enabled=True) as batches:
        for i in batches:
            log.info("logged at step %d", i)
    for handler in log.handlers:
        handler.flush()


def test_log_lines_are_written_above_the_bar_not_through_it(monkeypatch, tmp_path):
    terminal = Terminal()
    _run(monkeypatch, tmp_path, terminal)
    text = terminal.getvalue()
    assert "epoch 0" in text  # a bar was drawn
    for i in range(3):
        # every log line starts a line of its own: no bar text before it on that line
        starts = [m.start() for m in re.finditer(f"logged at step {i}", text)]
        assert starts, text
        for start in starts:
            line = text[:start].rsplit("\n", 1)[-1].rsplit("\r", 1)[-1]
            assert re.fullmatch(r"[\d:]+ detr_sparse INFO: ", line), repr(line)
    assert "logged at step 2" in (tmp_path / "log.txt").read_text()


def test_no_bar_without_a_terminal(monkeypatch, tmp_path):
    redirected = io.StringIO()  # e.g. `> run.log 2>&1`
    _run(monkeypatch, tmp_path, redirected)
    text = redirected.getvalue()
    assert "\r" not in text and "epoch 0" not in text and "it/s" not in text
    assert text.count("logged at step") == 3


class _Linear(torch.nn.Module):
    """loss = w . x, with the gradient times `blowup` (inf: an fp16 overflow in the backward)."""

    def __init__(self, blowup=1.0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        self.w.register_hook(lambda grad: grad * blowup)

    def forward(self, x, targets):
        return {"loss_linear": (self.w * x).sum()}


def _scaled_step(model, scaler):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train_cfg = SimpleNamespace(amp="none", clip_max_norm=1.0, warmup_iters=0, warmup_ratio=1.0, lr_schedule="step")
    return _train_step(model, [(torch.tensor([3.0, 4.0]), [])], optimizer, scaler, train_cfg, TrainState(),
                       torch.device("cpu"))


def test_a_scaled_step_clips_the_true_gradients_and_skips_an_overflowed_one():
    """fp16 on CUDA trains through a GradScaler (engine/trainer.py); the step must unscale
    the gradients before clipping them (clip and logged norm see the true gradients, 5 here)
    and skip a step whose gradients overflowed. The CPU's GradScaler has the CUDA one's logic."""
    plain, scaled = _Linear(), _Linear()
    unscaled_stats = _scaled_step(plain, torch.amp.GradScaler("cpu", enabled=False))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    stats = _scaled_step(scaled, scaler)
    assert stats["grad_norm"] == unscaled_stats["grad_norm"] == 5.0
    torch.testing.assert_close(scaled.w.detach(), plain.w.detach())  # stepped by the clipped gradient
    torch.testing.assert_close(plain.w.detach(), torch.tensor([1 - 0.1 * 3 / 5, -2 - 0.1 * 4 / 5]))
    overflowed = _Linear(blowup=float("inf"))
    _scaled_step(overflowed, scaler)
    assert overflowed.w.tolist() == [1.0, -2.0] and scaler.get_scale() == 2.0**11  # skipped, scale halved


def test_four_accumulated_batches_step_as_one_batch_four_times_larger():
    """Equal image sizes and one box per image: the DETR losses' normalisers (queries, boxes)
    are then the same per image, and the mean of four batches' losses is the big batch's."""
    import copy

    from detr_sparse import build_model
    from detr_sparse.image_batch import ImageBatch
    from engine.config import load_config
    from helpers import TINY_MODEL

    cfg = load_config(None, TINY_MODEL + ["model.transformer.dropout=0.0", "train.clip_max_norm=0.1"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 3).train()
    pixels = [torch.randn(3, 64, 64) for _ in range(4)]
    targets = [{"boxes": torch.tensor([[4.0 + 8 * i, 6.0, 40.0, 30.0 + 4 * i]]), "labels": torch.tensor([i % 3])}
               for i in range(4)]
    runs = []
    for batches in ([(ImageBatch.from_images(pixels), targets)],
                    [(ImageBatch.from_images([p]), [t]) for p, t in zip(pixels, targets)]):
        net = copy.deepcopy(model)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        stats = _train_step(net, batches, optimizer, scaler, cfg.train, TrainState(), torch.device("cpu"))
        runs.append((stats, dict(net.named_parameters())))
    (big, big_params), (accumulated, params) = runs
    assert accumulated["loss"] == pytest.approx(big["loss"], rel=1e-5)
    assert accumulated["grad_norm"] == pytest.approx(big["grad_norm"], rel=1e-4)
    for name, p in params.items():
        assert torch.allclose(p, big_params[name], atol=1e-6), name
