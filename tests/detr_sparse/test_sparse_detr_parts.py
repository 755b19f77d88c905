import pytest
import torch
import torch.nn.functional as F

from detr_sparse.sparsity.sparse_detr import (ScoringNetwork, attention_map, binarize_top,
                                              reference_correlation, scoring_loss)

D = torch.float64


def _layout(level_shapes):
    shapes = torch.tensor(level_shapes, dtype=torch.int64)
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    return shapes, starts


def _single_point_per_level(points):
    """points: per level (x_pixel, y_pixel, weight, (H, W)) -> loc (1,1,1,L,1,2), w (1,1,1,L,1)."""
    loc = torch.tensor([[x / w, y / h] for x, y, _, (h, w) in points], dtype=D)
    weights = torch.tensor([a for _, _, a, _ in points], dtype=D)
    return loc.view(1, 1, 1, len(points), 1, 2), weights.view(1, 1, 1, len(points), 1)


def test_dam_hand_made_two_levels_and_two_layers():
    shapes, starts = _layout([(3, 4), (2, 2)])
    # level 0: pixel (1.25, 0.5) weight 0.8; level 1: the integer corner (1, 1) weight 0.2
    loc, w = _single_point_per_level([(1.25, 0.5, 0.8, (3, 4)), (1.0, 1.0, 0.2, (2, 2))])
    dam = attention_map([loc], [w], shapes, starts)
    expected = torch.zeros(1, 16, dtype=D)
    expected[0, 0 * 4 + 1] = 0.8 * 0.75 * 0.5   # (x=1, y=0)
    expected[0, 0 * 4 + 2] = 0.8 * 0.25 * 0.5   # (2, 0)
    expected[0, 1 * 4 + 1] = 0.8 * 0.75 * 0.5   # (1, 1)
    expected[0, 1 * 4 + 2] = 0.8 * 0.25 * 0.5   # (2, 1)
    expected[0, 12 + 1 * 2 + 1] = 0.2           # level 1, (1, 1): all of it, the rest is off-map
    assert dam.shape == (1, 16)
    torch.testing.assert_close(dam, expected)
    assert dam.sum().item() == pytest.approx(1.0)
    # summed over decoder layers: the same layer twice doubles the map
    torch.testing.assert_close(attention_map([loc, loc], [w, w], shapes, starts), 2 * expected)


def test_dam_drops_off_map_neighbours():
    shapes, starts = _layout([(3, 4), (2, 2)])
    # level 0: x = 3.5 on a 4-wide map, y = 1.5 -> the x = 4 neighbours are dropped;
    # level 1: x = -0.5 -> the x = -1 neighbours are dropped
    loc, w = _single_point_per_level([(3.5, 1.5, 0.6, (3, 4)), (-0.5, 0.0, 0.4, (2, 2))])
    dam = attention_map([loc], [w], shapes, starts)
    expected = torch.zeros(1, 16, dtype=D)
    expected[0, 1 * 4 + 3] = 0.6 * 0.5 * 0.5
    expected[0, 2 * 4 + 3] = 0.6 * 0.5 * 0.5
    expected[0, 12 + 0] = 0.4 * 0.5             # (0, 0); fy = 0 so row 1 gets nothing
    torch.testing.assert_close(dam, expected)


def test_dam_matches_kernel_definition_and_keeps_mass_inside():
    g = torch.Generator().manual_seed(0)
    level_shapes = [(3, 4), (2, 3)]
    shapes, starts = _layout(level_shapes)
    b, q, m, levels, p = 2, 5, 2, 2, 3
    size = torch.tensor([[w, h] for h, w in level_shapes], dtype=D).view(1, 1, 1, levels, 1, 2)
    # all 4 neighbours on the map: pixel coordinates in [0, W - 1) x [0, H - 1)
    layers = [(torch.rand(b, q, m, levels, p, 2, generator=g, dtype=D) * (size - 1) / size,
               torch.rand(b, q, m, levels, p, generator=g, dtype=D)) for _ in range(2)]
    locs, weights = [x for x, _ in layers], [a for _, a in layers]
    dam = attention_map(locs, weights, shapes, starts)
    torch.testing.assert_close(dam.sum(1), sum(a.flatten(1).sum(1) for a in weights))
    # the appendix's definition: sum over samples of A * max(0, 1-|dx|) * max(0, 1-|dy|)
    expected = []
    for (h, w) in level_shapes:
        ys, xs = torch.meshgrid(torch.arange(h, dtype=D), torch.arange(w, dtype=D), indexing="ij")
        expected.append((xs.flatten(), ys.flatten(), h, w))
    ref = torch.zeros_like(dam)
    for loc, attn in layers:
        for level, (xs, ys, h, w) in enumerate(expected):
            px = loc[:, :, :, level, :, 0].reshape(b, -1, 1) * w
            py = loc[:, :, :, level, :, 1].reshape(b, -1, 1) * h
            kernel = (1 - (xs - px).abs()).clamp(min=0) * (1 - (ys - py).abs()).clamp(min=0)
            part = (attn[:, :, :, level].reshape(b, -1, 1) * kernel).sum(1)
            ref[:, starts[level]:starts[level] + h * w] += part
    torch.testing.assert_close(dam, ref)
    assert not dam.requires_grad


def test_binarize_top_counts_and_padding():
    dam = torch.tensor([[0.1, 0.5, 0.3, 0.0, 0.2, 0.4],
                        [0.3, 0.1, 0.2, 0.0, 9.0, 8.0]])
    padding = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    target = binarize_top(dam, torch.tensor([2, 3]), padding)
    assert target.dtype == torch.float32
    assert target.sum(1).tolist() == [2.0, 3.0]
    assert target[0].tolist() == [0, 1, 0, 0, 0, 1]
    assert target[1].tolist() == [1, 1, 1, 0, 0, 0]   # the padded 9.0 and 8.0 are never chosen
    # more than the valid tokens asked for: all valid ones, still no padding
    assert binarize_top(dam, torch.tensor([0, 6]), padding).tolist() == [[0] * 6, [1] * 4 + [0] * 2]


def test_scoring_network_shapes_padding_invariance_and_global_context():
    torch.manual_seed(0)
    net = ScoringNetwork(d_model=16, hidden=32).eval()
    linears = [mod for mod in net.modules() if isinstance(mod, torch.nn.Linear)]
    assert [mod.out_features for mod in linears] == [32, 16, 8, 1]
    x = torch.randn(2, 7, 16)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 4:] = True
    x[1, 4:] = 1e3   # large garbage at padding must not leak into the global mean
    with torch.no_grad():
        out = net(x, padding)
        assert out.shape == (2, 7)
        torch.testing.assert_close(out[0], net(x[:1])[0])
        torch.testing.assert_close(out[1, :4], net(x[1:, :4])[0])
        changed = x.clone()
        changed[0, 3] = 5 * torch.randn(16)
        other = net(changed, padding)
    assert (other[0, 0] - out[0, 0]).abs() > 1e-4    # token 0 sees token 3 via the mean
    torch.testing.assert_close(other[1], out[1])          # images stay independent


def test_scoring_network_initialised_as_the_official_transformer_reset():
    net = ScoringNetwork(d_model=256, hidden=256)
    for linear in (m for m in net.modules() if isinstance(m, torch.nn.Linear)):
        # xavier_uniform; PyTorch's default bound 1 / sqrt(fan_in) is lower for these shapes
        bound = (6 / (linear.in_features + linear.out_features)) ** 0.5
        assert 0.9 * bound < linear.weight.abs().max() <= bound


def test_reference_correlation_per_level_and_overall():
    shapes, starts = _layout([(2, 2), (1, 2), (1, 1)])   # S = 7
    referenced = torch.tensor([[1., 1., 0., 1., 1., 0., 0.],
                               [0., 1., 1., 0., 1., 1., 0.]])
    kept = torch.tensor([[1, 0, 1, 1, 0, 1, 1],
                         [0, 1, 0, 0, 1, 0, 1]], dtype=torch.bool)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    corr = reference_correlation(referenced, kept, padding, starts, shapes)
    # level 0: referenced 5, kept among them 3; level 1: 3 and 1; level 2: none -> 0
    torch.testing.assert_close(corr, torch.tensor([3 / 5, 1 / 3, 0.0, 4 / 8]))
    # padded tokens are never counted as referenced
    padding[1, 5] = True
    corr = reference_correlation(referenced, kept, padding, starts, shapes)
    torch.testing.assert_close(corr, torch.tensor([3 / 5, 1 / 2, 0.0, 4 / 7]))
    # a raw DAM gives the DAM-weighted share
    raw = torch.tensor([[3., 1., 0., 0., 0., 0., 0.]])
    weighted = reference_correlation(raw, kept[:1], padding[:1], starts, shapes)
    torch.testing.assert_close(weighted, torch.tensor([0.75, 0.0, 0.0, 0.75]))


def test_scoring_loss_ignores_padding():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, requires_grad=True)
    target = (torch.rand(2, 6) > 0.5).float()
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[0, 4:] = True
    loss = scoring_loss(logits, target, padding, "token")
    valid = ~padding
    expected = F.binary_cross_entropy_with_logits(logits[valid], target[valid])
    torch.testing.assert_close(loss, expected)
    garbage = logits.detach().clone()
    garbage[padding] = torch.tensor([float("inf"), -1e4])
    garbage.requires_grad_(True)
    again = scoring_loss(garbage, target, padding, "token")
    torch.testing.assert_close(again, loss.detach())
    again.backward()
    assert torch.isfinite(garbage.grad).all() and (garbage.grad[padding] == 0).all()


def test_scoring_loss_by_default_averages_each_image_over_its_padded_grid_as_the_official():
    torch.manual_seed(0)
    logits = torch.randn(2, 6)
    target = (torch.rand(2, 6) > 0.5).float()
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[0, 4:] = True
    target[0, 4:] = 1.0  # whatever the target says at padding, the official code has 0 there
    # the official: padded logits at the batch minimum, target 0, per-image mean over all S
    # tokens (multilabel_soft_margin_loss), then the mean over images
    filled = logits.masked_fill(padding, logits[~padding].min())
    per_token = F.binary_cross_entropy_with_logits(filled, target.masked_fill(padding, 0.0), reduction="none")
    expected = per_token.mean(1).mean()
    torch.testing.assert_close(scoring_loss(logits, target, padding), expected)
    assert not torch.allclose(scoring_loss(logits, target, padding, "token"), expected)
    garbage = logits.clone()
    garbage[padding] = float("nan")
    garbage.requires_grad_(True)
    loss = scoring_loss(garbage, target, padding)
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    assert torch.isfinite(garbage.grad).all() and (garbage.grad[padding] == 0).all()
    with pytest.raises(ValueError, match="scoring_loss_norm"):
        scoring_loss(logits, target, padding, "pixel")
