"""DGE's parts on one PVT block: router start, dense parity, training form = inference
form, padding, the query count's gradient and the MAC count against the FLOP counter."""
import pytest
import torch

from detr_sparse.backbones.pvt import PVTBlock
from detr_sparse.sparsity.dge import (REGION, SPLITS, GrainRouter, block_macs, dge_update, grain_gates,
                                      grain_pools, query_counts, region_layout)
from engine.benchmark import count_flops

GRID = (8, 12)  # 2 x 3 regions


def _block(sr: int = 2) -> PVTBlock:
    torch.manual_seed(0)
    return PVTBlock(32, heads=2, mlp_ratio=4, sr_ratio=sr, drop_path=0.0).eval()


def _run(block, x, gates, layout, token_valid=None, sparse=False, keep=None, key_mask=None):
    return dge_update(lambda q: block.forward_queries(q, x, GRID, keep, key_mask, change=True), x, GRID, gates,
                      layout, grain_pools(x, GRID, token_valid), sparse)


def _gates(choice: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(choice, len(SPLITS)).float()


def test_router_starts_at_the_finest_granularity_with_p_095():
    torch.manual_seed(0)
    router = GrainRouter(64)
    probs = router(grain_pools(torch.randn(2, 96, 64), (8, 12), None)[-1]).softmax(-1)
    assert probs.shape == (2, 2, 3, 3)
    torch.testing.assert_close(probs[..., 0].mean(), torch.tensor(0.95), atol=5e-3, rtol=0)


@pytest.mark.parametrize("sr", [1, 2])
@pytest.mark.parametrize("sparse", [False, True])
def test_the_finest_granularity_everywhere_is_the_dense_block(sr, sparse):
    block = _block(sr)
    x = torch.randn(2, GRID[0] * GRID[1], 32)
    layout = region_layout(None, GRID, 2, x.device)
    gates = _gates(torch.zeros(2, 2, 3, dtype=torch.long))
    with torch.no_grad():
        torch.testing.assert_close(_run(block, x, gates, layout, sparse=sparse), block(x, GRID, None, None),
                                   atol=1e-5, rtol=1e-5)


def test_training_form_equals_inference_form_for_the_same_gates():
    block = _block()
    torch.manual_seed(1)
    x = torch.randn(2, GRID[0] * GRID[1], 32)
    layout = region_layout(None, GRID, 2, x.device)
    gates = _gates(torch.randint(0, 3, (2, 2, 3)))
    assert gates[..., 2].any() and gates[..., 0].any()
    with torch.no_grad():
        dense, sparse = _run(block, x, gates, layout), _run(block, x, gates, layout, sparse=True)
    torch.testing.assert_close(dense, sparse, atol=1e-5, rtol=1e-5)
    # a coarse region's tokens all moved by the same change
    region = torch.nonzero(gates[0, ..., 2])[0]
    rows = slice(region[0] * REGION, (region[0] + 1) * REGION)
    cols = slice(region[1] * REGION, (region[1] + 1) * REGION)
    change = (sparse - x)[0].view(*GRID, 32)[rows, cols].reshape(-1, 32)
    torch.testing.assert_close(change, change[:1].expand_as(change))


def test_regions_wholly_in_padding_compute_nothing_and_padding_does_not_reach_the_image():
    block = _block()
    torch.manual_seed(2)
    x = torch.randn(2, GRID[0] * GRID[1], 32)
    # image 1 holds the top-left 5 x 6 tokens: 2 x 2 of its regions, 2 of them across the border
    token_valid = torch.ones(2, *GRID, dtype=torch.bool)
    token_valid[1, 5:], token_valid[1, :, 6:] = False, False
    token_valid = token_valid.flatten(1)
    layout = region_layout(token_valid, GRID, 2, x.device)
    assert layout.regions[1].tolist() == [[True, True, False], [True, True, False]]
    gates = grain_gates(torch.zeros(2, 2, 3, 3), layout.regions, training=False)  # argmax: the finest
    seen = []

    def block_fn(q):
        seen.append(q.shape[1])
        return block.forward_queries(q, x, GRID, token_valid, None, change=True)

    with torch.no_grad():
        out = dge_update(block_fn, x, GRID, gates, layout, grain_pools(x, GRID, token_valid),
                         sparse=True)
        # padding with other content gives the same image tokens
        noisy = torch.where(token_valid[..., None], x, 100 * torch.randn_like(x))
        again = dge_update(lambda q: block.forward_queries(q, noisy, GRID, token_valid, None, change=True), noisy, GRID,
                           gates, layout, grain_pools(noisy, GRID, token_valid), sparse=True)
    assert seen == [96]  # image 0: 6 regions x 16; image 1: its 30 tokens (padded to 96)
    assert query_counts(gates, layout).tolist() == [96, 30]  # image 1: its 5 x 6 tokens only
    inside = token_valid[1]
    torch.testing.assert_close(again[1][inside], out[1][inside])


def test_grain_pools_average_each_options_patches():
    x = torch.randn(2, 96, 16)
    x_map = x.view(2, 8, 12, 16)
    pools = grain_pools(x, (8, 12), None)
    assert [p.shape[1:3] for p in pools] == [(8, 12), (4, 6), (2, 3)] and pools[0].data_ptr() == x.data_ptr()
    torch.testing.assert_close(pools[1][1, 2, 3], x_map[1, 4:6, 6:8].mean((0, 1)))
    torch.testing.assert_close(pools[2][0, 1, 2], x_map[0, 4:8, 8:12].mean((0, 1)))
    assert all(p.is_contiguous() for p in pools)  # flattened into queries without a copy
    # tokens outside the image count as zeros
    valid = torch.ones(2, 8, 12, dtype=torch.bool)
    valid[1, :, 5:] = False
    torch.testing.assert_close(grain_pools(x, (8, 12), valid.flatten(1))[2][1, 0, 1],
                               x_map[1, :4, 4:5].sum((0, 1)) / 16)


def test_query_count_gradient_reaches_the_router_through_the_straight_through_gates():
    torch.manual_seed(0)
    router = GrainRouter(32)
    x = torch.randn(2, GRID[0] * GRID[1], 32)
    layout = region_layout(None, GRID, 2, x.device)
    gates = grain_gates(router(grain_pools(x, GRID, None)[-1]), layout.regions, training=True)
    assert ((gates == 0) | (gates == 1)).all() and (gates.sum(-1) == 1).all()
    query_counts(gates, layout).sum().backward()
    assert router.gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("sr", [1, 2])
def test_block_macs_are_what_the_flop_counter_counts_on_the_sparse_form(sr):
    block = _block(sr)
    x = torch.randn(1, GRID[0] * GRID[1], 32)
    layout = region_layout(None, GRID, 1, x.device)
    gates = _gates(torch.tensor([[[0, 1, 2], [2, 2, 1]]]))
    queries = query_counts(gates, layout)
    assert queries.item() == 16 + 4 + 1 + 1 + 1 + 4

    class Wrapped(torch.nn.Module):
        def forward(self, inputs):
            return _run(block, inputs, gates, layout, sparse=True)

    counted = count_flops(Wrapped(), x).total * 1e9
    expected = block_macs(queries, GRID[0] * GRID[1], 32, 128, sr).item()
    assert abs(counted - expected) / expected < 1e-3, (counted, expected)


def test_a_grid_that_is_no_multiple_of_the_region_completes_its_last_regions_with_zeros():
    block = _block()
    torch.manual_seed(3)
    grid = (6, 9)  # 2 x 3 regions, the last row and column of regions partly outside the map
    x = torch.randn(2, 54, 32)
    layout = region_layout(None, grid, 2, x.device)
    assert layout.regions.shape == (2, 2, 3) and layout.regions.all()
    assert query_counts(_gates(torch.zeros(2, 2, 3, dtype=torch.long)), layout).tolist() == [54, 54]
    pools = grain_pools(x, grid, None)
    assert [p.shape[1:3] for p in pools] == [(6, 9), (3, 5), (2, 3)]
    torch.testing.assert_close(pools[2][0, 1, 2], x.view(2, 6, 9, 32)[0, 4:, 8:].sum((0, 1)) / 16)  # zeros beyond
    gates = _gates(torch.randint(0, 3, (2, 2, 3)))
    with torch.no_grad():
        outs = [dge_update(lambda q: block.forward_queries(q, x, grid, None, None, change=True), x, grid, gates, layout,
                           pools, sparse) for sparse in (False, True)]
        finest = dge_update(lambda q: block.forward_queries(q, x, grid, None, None, change=True), x, grid,
                            _gates(torch.zeros(2, 2, 3, dtype=torch.long)), layout, pools, True)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(finest, block(x, grid, None, None), atol=1e-5, rtol=1e-5)
