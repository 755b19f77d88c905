"""Triton kernels of multi-scale deformable attention's sampling: forward, and backward to the
value, the sampling locations and the attention weights. Layouts, contiguous: value
(B, S, M, D); spatial_shapes (L, 2) int64 as (H, W); level_start_index (L,) int64;
sampling_locations (B, Q, M, L, P, 2) as (x, y) in [0, 1]; attention_weights (B, Q, M, L, P);
output (B, Q, M, D). Bilinear sampling as grid_sample(align_corners=False, padding_mode=
"zeros"): pixel x = loc_x * W - 0.5, a corner off the map reads zero.

One program takes BLOCK_Q queries of one (image, head) and all D channels (BLOCK_D, masked
beyond D). Sums run in fp32 (fp64 for fp64 inputs) whatever the input dtype. The backward
adds into the value gradient with atomics (many queries read one value row): the caller
hands it a zeroed fp32 (fp64) buffer.

`msda_triton.py` loads this file once per mode (compiled, or Triton's interpreter), since
`triton.jit` decides which when it decorates. The kernels call triton.language builtins
only: its functions that are themselves @triton.jit (tl.zeros, tl.sum, tl.max, ...) are
decorated when triton is imported, and the interpreter cannot call them unless
TRITON_INTERPRET=1 was set by then (the tests set it later, in one pytest process)."""
import triton
import triton.language as tl


@triton.jit
def _sample(shapes, starts, loc, attn, bqm, live, lp, L, P, ACC: tl.constexpr):
    """Sample lp (= level * P + point) of the queries bqm: its level's H, W and first token;
    its index s in attention_weights and its weight a; its top-left corner (x0, y0) as
    integers, its fractions (fx, fy), and whether any of its corners can be on the map (False
    for NaN and far-off samples, whose floor would not fit an integer)."""
    level = lp // P
    h = tl.load(shapes + 2 * level)
    w = tl.load(shapes + 2 * level + 1)
    start = tl.load(starts + level)
    s = bqm * (L * P) + lp
    a = tl.load(attn + s, mask=live, other=0.0).to(ACC)
    x = tl.load(loc + 2 * s, mask=live, other=0.0).to(ACC) * w - 0.5
    y = tl.load(loc + 2 * s + 1, mask=live, other=0.0).to(ACC) * h - 0.5
    # inclusive: at x == -1 the corner x = 0 has weight 0 but a derivative, as in grid_sample
    near = live & (x >= -1.0) & (y >= -1.0) & (x <= w) & (y <= h)
    x = tl.where(near, x, -2.0)
    y = tl.where(near, y, -2.0)
    x0 = tl.floor(x)
    y0 = tl.floor(y)
    return h, w, start, s, a, x0.to(tl.int64), y0.to(tl.int64), x - x0, y - y0, near


@triton.jit
def _corner(x0, y0, fx, fy, near, h, w, start, s_total, DX: tl.constexpr, DY: tl.constexpr):
    """Corner (x0 + DX, y0 + DY): its token row (level start + y * W + x), whether it is on
    the map, its bilinear weight and the weight's derivatives by pixel x and y."""
    xi = x0 + DX
    yi = y0 + DY
    row = start + yi * w + xi
    # the row tests keep every read inside value even when the shapes do not tile it
    valid = near & (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h) & (row >= 0) & (row < s_total)
    wx = fx if DX else 1.0 - fx
    wy = fy if DY else 1.0 - fy
    return tl.where(valid, row, 0), valid, wx * wy, (wy if DX else -wy), (wx if DY else -wx)


@triton.jit
def _program(n_queries, n_heads, D, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's image b, head m, query ids q (BLOCK_Q,) with their mask, (b, q, m)
    flat ids, channels (BLOCK_D,) with their mask."""
    bm = tl.program_id(1).to(tl.int64)
    b = bm // n_heads
    m = bm % n_heads
    q = tl.program_id(0).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    channels = tl.arange(0, BLOCK_D)
    return b, m, q, q < n_queries, (b * n_queries + q) * n_heads + m, channels, channels < D


@triton.jit
def msda_forward_kernel(value, shapes, starts, loc, attn, out, S, Q, M, D, L, P,
                        ACC: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    b, m, q, live, bqm, channels, dmask = _program(Q, M, D, BLOCK_Q, BLOCK_D)
    head = value + (b * S * M + m) * D  # (b, token 0, m, channel 0); a token is M * D further
    acc = tl.full((BLOCK_Q, BLOCK_D), 0.0, ACC)
    for lp in range(L * P):
        h, w, start, s, a, x0, y0, fx, fy, near = _sample(shapes, starts, loc, attn, bqm, live, lp, L, P, ACC)
        for k in tl.static_range(4):
            row, valid, wk, _, _ = _corner(x0, y0, fx, fy, near, h, w, start, S, k % 2, k // 2)
            v = tl.load(head + row[:, None] * (M * D) + channels[None, :],
                        mask=valid[:, None] & dmask[None, :], other=0.0)
            acc += (a * wk)[:, None] * v.to(ACC)
    tl.store(out + bqm[:, None] * D + channels[None, :], acc.to(out.dtype.element_ty),
             mask=live[:, None] & dmask[None, :])


@triton.jit
def msda_backward_kernel(grad_out, value, shapes, starts, loc, attn, grad_value, grad_loc, grad_attn,
                         S, Q, M, D, L, P, ACC: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    b, m, q, live, bqm, channels, dmask = _program(Q, M, D, BLOCK_Q, BLOCK_D)
    offset = (b * S * M + m) * D
    g = tl.load(grad_out + bqm[:, None] * D + channels[None, :], mask=live[:, None] & dmask[None, :],
                other=0.0).to(ACC)
    for lp in range(L * P):
        h, w, start, s, a, x0, y0, fx, fy, near = _sample(shapes, starts, loc, attn, bqm, live, lp, L, P, ACC)
        d_attn = tl.full((BLOCK_Q,), 0.0, ACC)
        d_x = tl.full((BLOCK_Q,), 0.0, ACC)
        d_y = tl.full((BLOCK_Q,), 0.0, ACC)
        for k in tl.static_range(4):
            row, valid, wk, dwdx, dwdy = _corner(x0, y0, fx, fy, near, h, w, start, S, k % 2, k // 2)
            rows = offset + row[:, None] * (M * D) + channels[None, :]
            vmask = valid[:, None] & dmask[None, :]
            # tl.sum's own reduction (see the module docstring)
            dot = tl.reduce(g * tl.load(value + rows, mask=vmask, other=0.0).to(ACC), 1, tl.standard._sum_combine)
            d_attn += wk * dot
            d_x += dwdx * dot
            d_y += dwdy * dot
            tl.atomic_add(grad_value + rows, (a * wk)[:, None] * g, mask=vmask)
        tl.store(grad_attn + s, d_attn.to(grad_attn.dtype.element_ty), mask=live)
        # d pixel x / d loc x = W (y: H)
        tl.store(grad_loc + 2 * s, (a * d_x * w).to(grad_loc.dtype.element_ty), mask=live)
        tl.store(grad_loc + 2 * s + 1, (a * d_y * h).to(grad_loc.dtype.element_ty), mask=live)
