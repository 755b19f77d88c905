import math

import pytest
import torch

from detr_sparse.transformers import msda_ops
from detr_sparse.transformers.ms_deform_attn import MSDeformAttn, ms_deform_attn_core
from helpers import sampling_inputs as _inputs


SHAPES = [(1, [(5, 7)], 4), (2, [(6, 7), (3, 4)], 9), (2, [(9, 5), (5, 3), (3, 2), (1, 1)], 13)]


@pytest.mark.parametrize("batch,levels,queries", SHAPES)
def test_fast_kernel_equals_grid_sample_reference_with_gradients(batch, levels, queries):
    inputs = _inputs(batch, levels, queries)
    leaves = [inputs[0], inputs[3], inputs[4]]
    results = []
    for core in (msda_ops.msda_fast, msda_ops.grid_sample_core):
        xs = [t.clone().requires_grad_(True) for t in leaves]
        out = core(xs[0], inputs[1], inputs[2], xs[1], xs[2])
        grads = torch.autograd.grad(out, xs, torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
        results.append((out, *grads))
    for fast, ref in zip(*results):
        torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)


def test_fast_kernel_register_blocks_and_query_split_equal_the_reference():
    # 40 channels: two register blocks of 16 and a partial one; 600 queries x 3 heads x 2
    # images: forward tasks of 256 queries cross head and image boundaries
    value, shapes, starts, locations, weights = _inputs(2, [(9, 11), (4, 6)], 600, heads=3, dim=40,
                                                        dtype=torch.float32)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            fast = msda_ops.msda_fast(value, shapes, starts, locations, weights)
            ref = msda_ops.grid_sample_core(value, shapes, starts, locations, weights)
            torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(threads)


def test_fast_kernel_passes_gradcheck():
    value, shapes, starts, locations, weights = _inputs(2, [(4, 5), (2, 3)], 3)
    args = [t.requires_grad_(True) for t in (value, locations, weights)]
    assert torch.autograd.gradcheck(lambda v, l, w: msda_ops.msda_fast(v, shapes, starts, l, w), args)


def test_reference_operator_passes_gradcheck():
    value, shapes, starts, locations, weights = _inputs(1, [(3, 4)], 2)
    args = [t.requires_grad_(True) for t in (value, locations, weights)]
    assert torch.autograd.gradcheck(lambda v, l, w: msda_ops.msda_reference(v, shapes, starts, l, w), args)


def test_fast_kernel_runs_bf16_through_fp32():
    value, shapes, starts, locations, weights = _inputs(1, [(4, 5)], 3, dtype=torch.float32)
    expected = msda_ops.msda_fast(value, shapes, starts, locations, weights)
    out = msda_ops.msda_fast(value.bfloat16(), shapes, starts, locations.bfloat16(), weights.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.05)


def test_unknown_implementation_is_named():
    with pytest.raises(ValueError, match="'fastest'"):
        ms_deform_attn_core(*_inputs(1, [(2, 2)], 1), impl="fastest")


def _module(impl="auto"):
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2).double()
    attn.impl = impl
    return attn


def _module_inputs(batch=2, reference_dim=2):
    g = torch.Generator().manual_seed(1)
    shapes = torch.tensor([[6, 8], [3, 4]])
    starts = torch.tensor([0, 48])
    query = torch.randn(batch, 5, 16, generator=g, dtype=torch.float64)
    refs = torch.rand(batch, 5, 2, reference_dim, generator=g, dtype=torch.float64)
    value = torch.randn(batch, 60, 16, generator=g, dtype=torch.float64)
    return query, refs, value, shapes, starts


def test_initial_offsets_ring_and_uniform_attention():
    attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=8, n_points=3)
    ring = attn.sampling_offsets.bias.view(8, 2, 3, 2)
    # head 0 looks right, head 1 up-right on the square's border (tan 45 deg), points at 1, 2, 3
    torch.testing.assert_close(ring[0, 0, :, 0], torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(ring[1, 1, 2], torch.tensor([3.0, 3.0]))
    assert (attn.attention_weights.weight == 0).all() and (attn.attention_weights.bias == 0).all()
    assert math.isclose(ring[2, 0, 0, 1].item(), 1.0, abs_tol=1e-6)  # head 2: straight down (+y)


@pytest.mark.parametrize("reference_dim", [2, 4])
def test_module_fast_equals_reference(reference_dim):
    inputs = _module_inputs(reference_dim=reference_dim)
    if reference_dim == 4:  # boxes: small sizes so that samples stay near the centres
        inputs[1][..., 2:] *= 0.5
    torch.testing.assert_close(_module("fast")(*inputs), _module("reference")(*inputs), atol=1e-10, rtol=0)


def test_padded_values_do_not_reach_the_output():
    query, refs, value, shapes, starts = _module_inputs()
    padding = torch.zeros(2, 60, dtype=torch.bool)
    padding[1, 40:48] = True  # the right part of level 0's last row, and all of level 1
    padding[1, 48:] = True
    attn = _module()
    out = attn(query, refs, value, shapes, starts, padding)
    changed = value.clone()
    changed[padding] = 1e6
    torch.testing.assert_close(attn(query, refs, changed, shapes, starts, padding), out)


def test_batched_equals_per_image():
    query, refs, value, shapes, starts = _module_inputs()
    attn = _module()
    batched = attn(query, refs, value, shapes, starts)
    for i in range(2):
        single = attn(query[i:i + 1], refs[i:i + 1], value[i:i + 1], shapes, starts)
        torch.testing.assert_close(single, batched[i:i + 1])


def test_sampling_flops_are_counted_alike_by_both_paths():
    inputs = [t.float() for t in _module_inputs()[:3]] + list(_module_inputs()[3:])
    totals = []
    for impl in ("fast", "reference"):
        attn = _module(impl).float()
        counter = torch.utils.flop_counter.FlopCounterMode(display=False)
        with counter, torch.no_grad():
            attn(*inputs)
        ops = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
        sampling = sum(n for op, n in ops.items() if op.startswith("detr_sparse.msda"))
        # batch 2, 5 queries, 2 heads, 2 levels, 2 points, 8 channels: 5 multiply-adds each
        assert sampling == 2 * 5 * (2 * 5 * 2 * 2 * 2 * 8)
        totals.append(counter.get_total_flops())
    assert totals[0] == totals[1]


def test_the_kernel_refuses_shapes_that_would_read_outside_the_value():
    value, shapes, starts, locations, weights = _inputs(1, [(4, 5), (2, 3)], 3)
    with pytest.raises(RuntimeError, match="cover 26 tokens"):
        msda_ops.msda_fast(value[:, :20], shapes, starts, locations, weights)
    with pytest.raises(RuntimeError, match="heads"):
        msda_ops.msda_fast(value[:, :, :1], shapes, starts, locations, weights)
