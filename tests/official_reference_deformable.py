"""The Deformable family (fundamentalvision/Deformable-DETR, kakaobrain/sparse-detr) and the
Swin-T body of Sparse DETR as small models with the authors' state-dict names, written for
the tests from what the authors' code computes (see official_reference.py for the rules)."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from official_reference import Body, box_sine, logit, MLP, randomise, resized_mask, sine_embedding, Stack

# config overrides that build the project's model of the same sizes as ReferenceDeformableDETR
# with its defaults
DEFORMABLE_OPTS = ["model.backbone.name=resnet18", "model.transformer.hidden_dim=64", "model.transformer.nheads=4",
                   "model.transformer.enc_layers=2", "model.transformer.dec_layers=2",
                   "model.transformer.dim_feedforward=64", "model.transformer.enc_n_points=2",
                   "model.transformer.dec_n_points=2", "model.num_queries=10"]


class SwinAttention(nn.Module):
    """Window attention with the relative-position bias (index: (dy + w - 1) * (2w - 1) + dx + w - 1)."""

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads = heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
        coords = torch.stack([ys.flatten(), xs.flatten()])
        delta = (coords[:, :, None] - coords[:, None, :]) + window - 1  # (2, N, N)
        self.register_buffer("relative_position_index", delta[0] * (2 * window - 1) + delta[1])
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, windows: Tensor, mask: Tensor | None) -> Tensor:  # (B * nW, N, C), (nW, N, N)
        b, n, c = windows.shape
        q, k, v = self.qkv(windows).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        scores = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)
        scores = scores + self.relative_position_bias_table[self.relative_position_index.flatten()].view(
            n, n, -1).permute(2, 0, 1)
        if mask is not None:
            scores = (scores.view(-1, mask.shape[0], self.heads, n, n) + mask[None, :, None]).view(b, -1, n, n)
        return self.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.window = window
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SwinAttention(dim, heads, window)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor, shift: int, mask: Tensor) -> Tensor:  # x (B, H, W, C)
        b, h, w, c = x.shape
        ws = self.window
        y = F.pad(self.norm1(x), (0, 0, 0, -w % ws, 0, -h % ws))
        hp, wp = y.shape[1:3]
        y = torch.roll(y, (-shift, -shift), (1, 2))
        windows = y.view(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
        y = self.attn(windows, mask if shift else None)
        y = y.view(b, hp // ws, wp // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
        x = x + torch.roll(y, (shift, shift), (1, 2))[:, :h, :w]
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class SwinMerging(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.reduction, self.norm = nn.Linear(4 * dim, 2 * dim, bias=False), nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        x = F.pad(x, (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2))
        parts = [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]]
        return self.reduction(self.norm(torch.cat(parts, -1)))


def shift_mask(hp: int, wp: int, window: int) -> Tensor:
    """The shifted windows' mask (nW, N, N): -100 between tokens of different regions."""
    shift = window // 2
    region = torch.zeros(hp, wp)
    bounds = [(0, -window), (-window, -shift), (-shift, None)]
    for i, (hs, he) in enumerate(bounds):
        for j, (ws, we) in enumerate(bounds):
            region[slice(hs, he), slice(ws, we)] = 3 * i + j
    labels = region.view(hp // window, window, wp // window, window).permute(0, 2, 1, 3).reshape(-1, window ** 2)
    return (labels[:, None, :] != labels[:, :, None]).float() * -100.0


class SwinBody(nn.Module):
    """backbone.0.body: the detection Swin (patch embedding with its norm; stages of
    alternately shifted window blocks, each but the last ending in a patch merging; a norm
    per output, `norm1`..`norm3` for stages 2-4), by default a quarter-width Swin-T."""

    def __init__(self, embed: int = 32, depths=(2, 2, 4, 2), heads=(1, 2, 4, 8), window: int = 7):
        super().__init__()
        self.window = window
        body = self.body = nn.Module()
        body.patch_embed = nn.Module()
        body.patch_embed.proj, body.patch_embed.norm = nn.Conv2d(3, embed, 4, stride=4), nn.LayerNorm(embed)
        body.layers = nn.ModuleList()
        for i, (depth, n_heads) in enumerate(zip(depths, heads)):
            layer = nn.Module()
            layer.blocks = nn.ModuleList(SwinBlock(embed * 2 ** i, n_heads, window) for _ in range(depth))
            if i < len(depths) - 1:
                layer.downsample = SwinMerging(embed * 2 ** i)
            body.layers.append(layer)
        for i in range(1, len(depths)):
            setattr(body, f"norm{i}", nn.LayerNorm(embed * 2 ** i))

    def forward(self, images: Tensor, mask: Tensor) -> list[tuple[Tensor, Tensor]]:
        body, ws = self.body, self.window
        x = F.pad(images, (0, -images.shape[3] % 4, 0, -images.shape[2] % 4))
        x = body.patch_embed.norm(body.patch_embed.proj(x).permute(0, 2, 3, 1))
        outs = []
        for i, layer in enumerate(body.layers):
            regions = shift_mask(-(-x.shape[1] // ws) * ws, -(-x.shape[2] // ws) * ws, ws)
            for j, block in enumerate(layer.blocks):
                x = block(x, (j % 2) * (ws // 2), regions)
            if i > 0:
                out = getattr(body, f"norm{i}")(x).permute(0, 3, 1, 2)
                outs.append((out, resized_mask(mask, out.shape[-2:])))
            if hasattr(layer, "downsample"):
                x = layer.downsample(x)
        return outs



# --------------------------------------------------------------------------- Deformable family
def sample_levels(value: Tensor, shapes, locations: Tensor, weights: Tensor) -> Tensor:
    """Deformable attention's sampling: per level, bilinear samples of the value map (zeros
    outside, pixel centres at (i + 0.5) / size) at the locations, weighted and summed.
    value (B, S, M, D), locations (B, Q, M, L, P, 2) as (x, y) in [0, 1], weights
    (B, Q, M, L, P) -> (B, Q, M * D)."""
    b, _, m, dim = value.shape
    q = locations.shape[1]
    out, start = 0, 0
    for lvl, (h, w) in enumerate(shapes):
        v = value[:, start:start + h * w].permute(0, 2, 3, 1).reshape(b * m, dim, h, w)
        grid = locations[:, :, :, lvl].transpose(1, 2).reshape(b * m, q, -1, 2) * 2 - 1
        sampled = F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out = out + (sampled * weights[:, :, :, lvl].transpose(1, 2).reshape(b * m, 1, q, -1)).sum(-1)
        start += h * w
    return out.view(b, m * dim, q).transpose(1, 2)


class DeformAttn(nn.Module):
    def __init__(self, d, levels, heads, points):
        super().__init__()
        self.heads, self.levels, self.points = heads, levels, points
        self.sampling_offsets = nn.Linear(d, heads * levels * points * 2)
        self.attention_weights = nn.Linear(d, heads * levels * points)
        self.value_proj, self.output_proj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, query, reference, inputs, shapes, pad):
        b, q, _ = query.shape
        m, lv, p = self.heads, self.levels, self.points
        value = self.value_proj(inputs).masked_fill(pad[..., None], 0.0).view(b, inputs.shape[1], m, -1)
        offsets = self.sampling_offsets(query).view(b, q, m, lv, p, 2)
        weights = self.attention_weights(query).view(b, q, m, lv * p).softmax(-1).view(b, q, m, lv, p)
        ref = reference[:, :, None, :, None]
        if reference.shape[-1] == 2:
            sizes = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)
            locations = ref + offsets / sizes[None, None, None, :, None]
        else:
            locations = ref[..., :2] + offsets / p * ref[..., 2:] * 0.5
        return self.output_proj(sample_levels(value, shapes, locations, weights))


class DeformEncoderLayer(nn.Module):
    def __init__(self, d, heads, ffn, levels, points):
        super().__init__()
        self.self_attn = DeformAttn(d, levels, heads, points)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, query, pos, reference, inputs, shapes, pad):
        x = self.norm1(query + self.self_attn(query + pos, reference, inputs, shapes, pad))
        return self.norm2(x + self.linear2(F.relu(self.linear1(x))))


class DeformDecoderLayer(nn.Module):
    """The authors' order: self-attention -> norm2, cross-attention -> norm1, FFN -> norm3."""

    def __init__(self, d, heads, ffn, levels, points):
        super().__init__()
        self.cross_attn = DeformAttn(d, levels, heads, points)
        self.self_attn = nn.MultiheadAttention(d, heads)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, t, query_pos, reference, memory, shapes, pad):
        q = (t + query_pos).transpose(0, 1)
        t = self.norm2(t + self.self_attn(q, q, t.transpose(0, 1))[0].transpose(0, 1))
        t = self.norm1(t + self.cross_attn(t + query_pos, reference, memory, shapes, pad))
        return self.norm3(t + self.linear2(F.relu(self.linear1(t))))


class ScoringNet(nn.Module):
    """Sparse DETR's enc_mask_predictor: LN, linear, GELU; the second half of the features
    averaged over all the image's tokens; then linear-GELU-linear-GELU-linear to one logit."""

    def __init__(self, d):
        super().__init__()
        self.layer1 = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU())
        self.layer2 = nn.Sequential(nn.Linear(d, d // 2), nn.GELU(), nn.Linear(d // 2, d // 4), nn.GELU(),
                                    nn.Linear(d // 4, 1))

    def forward(self, x):
        z = self.layer1(x)
        local, glob = z.split(z.shape[-1] // 2, -1)
        return self.layer2(torch.cat([local, glob.mean(1, keepdim=True).expand_as(glob)], -1)).squeeze(-1)


class ReferenceDeformableDETR(nn.Module):
    """Deformable DETR (+ box refinement, + two-stage) with the authors' names; memory_queries
    (kakaobrain/sparse-detr --eff_query_init --eff_specific_head), rho > 0 its sparse encoder
    with the scoring network, enc_aux its encoder auxiliary heads (in the head lists' tail);
    swin: on SwinBody (ResNet-18 otherwise)."""

    def __init__(self, d=64, heads=4, layers=2, ffn=64, levels=4, points=2, queries=10, rows=91,
                 refine=False, two_stage=False, memory_queries=False, rho=0.0, enc_aux=False, swin=False):
        super().__init__()
        self.d, self.levels, self.queries, self.rho = d, levels, queries, rho
        self.two_stage, self.memory_queries = two_stage, memory_queries
        body = SwinBody() if swin else Body({"layer2": "0", "layer3": "1", "layer4": "2"})
        self.backbone = nn.ModuleList([body])
        channels = (64, 128, 256) if swin else (128, 256, 512)
        projs = [nn.Sequential(nn.Conv2d(c, d, 1), nn.GroupNorm(32, d)) for c in channels]
        projs += [nn.Sequential(nn.Conv2d(channels[-1] if i == 0 else d, d, 3, stride=2, padding=1),
                                nn.GroupNorm(32, d)) for i in range(levels - 3)]
        self.input_proj = nn.ModuleList(projs)
        tr = self.transformer = nn.Module()
        tr.level_embed = nn.Parameter(torch.empty(levels, d))
        if rho:
            tr.enc_mask_predictor = ScoringNet(d)
        tr.encoder = Stack([DeformEncoderLayer(d, heads, ffn, levels, points) for _ in range(layers)])
        tr.decoder = Stack([DeformDecoderLayer(d, heads, ffn, levels, points) for _ in range(layers)])
        if two_stage:
            tr.enc_output, tr.enc_output_norm = nn.Linear(d, d), nn.LayerNorm(d)
            width = d if memory_queries else 2 * d
            tr.pos_trans, tr.pos_trans_norm = nn.Linear(2 * d, width), nn.LayerNorm(width)
        else:
            tr.reference_points = nn.Linear(d, 2)
            self.query_embed = nn.Embedding(queries, 2 * d)
        count = layers + int(two_stage) + (layers - 1 if enc_aux else 0)
        if refine or enc_aux:
            self.class_embed = nn.ModuleList(nn.Linear(d, rows) for _ in range(count))
            self.bbox_embed = nn.ModuleList(MLP(d, 4) for _ in range(count))
        else:
            shared_class, shared_box = nn.Linear(d, rows), MLP(d, 4)
            self.class_embed = nn.ModuleList([shared_class] * count)
            self.bbox_embed = nn.ModuleList([shared_box] * count)
        # the transformer holds the lists a second time, and its decoder refines the boxes
        # with them: box refinement, and every two-stage model of kakaobrain/sparse-detr
        self.refining = refine or (two_stage and memory_queries)
        if self.refining:
            tr.decoder.bbox_embed = self.bbox_embed
        if two_stage:
            tr.decoder.class_embed = self.class_embed
        if enc_aux:
            tr.encoder.class_embed = self.class_embed[-(layers - 1):]
            tr.encoder.bbox_embed = self.bbox_embed[-(layers - 1):]
        randomise(self, 0.1)

    # ------------------------------------------------------------------ pieces
    def maps(self, images, mask):
        features = self.backbone[0](images, mask)
        srcs = [proj(x) for proj, (x, _) in zip(self.input_proj, features)]
        masks = [m for _, m in features]
        for lvl in range(len(features), self.levels):
            srcs.append(self.input_proj[lvl](features[-1][0] if lvl == len(features) else srcs[-1]))
            masks.append(resized_mask(mask, srcs[-1].shape[-2:]))
        return srcs, masks

    @staticmethod
    def centres(h: int, w: int) -> tuple[Tensor, Tensor]:
        y, x = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        return x.flatten(), y.flatten()

    def proposals(self, pad, shapes):
        """A box per token (centre over the valid extent, side 0.05 * 2^level) as logits, inf
        where padded or not inside (0.01, 0.99); and that validity."""
        boxes, start = [], 0
        for lvl, (h, w) in enumerate(shapes):
            m = pad[:, start:start + h * w].view(-1, h, w)
            start += h * w
            x, y = self.centres(h, w)
            cx = x[None] / (~m[:, 0, :]).sum(1, keepdim=True)
            cy = y[None] / (~m[:, :, 0]).sum(1, keepdim=True)
            side = torch.full_like(cx, 0.05 * 2 ** lvl)
            boxes.append(torch.stack([cx, cy, side, side], -1))
        boxes = torch.cat(boxes, 1)
        valid = ((boxes > 0.01) & (boxes < 0.99)).all(-1, keepdim=True)
        out = torch.log(boxes / (1 - boxes)).masked_fill(pad[..., None], float("inf"))
        return out.masked_fill(~valid, float("inf")), valid

    def project(self, x, pad, valid):
        x = x.masked_fill(pad[..., None], 0.0).masked_fill(~valid, 0.0)
        return self.transformer.enc_output_norm(self.transformer.enc_output(x))

    # ------------------------------------------------------------------ forward
    def forward(self, images: Tensor, mask: Tensor) -> dict:
        tr = self.transformer
        srcs, masks = self.maps(images, mask)
        shapes = [tuple(s.shape[-2:]) for s in srcs]
        pos = [sine_embedding(m, self.d // 2, -0.5) for m in masks]
        src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        pad = torch.cat([m.flatten(1) for m in masks], 1)
        pos = torch.cat([p.flatten(2).transpose(1, 2) + tr.level_embed[lvl] for lvl, p in enumerate(pos)], 1)
        ratios = torch.stack([torch.stack([(~m[:, 0, :]).sum(1) / m.shape[2], (~m[:, :, 0]).sum(1) / m.shape[1]], -1)
                              for m in masks], 1).float()  # (B, L, 2) as (w, h)
        refs = []
        for lvl, (h, w) in enumerate(shapes):
            x, y = self.centres(h, w)
            refs.append(torch.stack([x[None] / (ratios[:, None, lvl, 0] * w),
                                     y[None] / (ratios[:, None, lvl, 1] * h)], -1))
        refs = torch.cat(refs, 1)[:, :, None] * ratios[:, None]  # (B, S, L, 2)
        # encoder: dense, or Sparse DETR's: the scored tokens only, queries into the whole map
        memory = src
        if self.rho:
            proposals, valid = self.proposals(pad, shapes)
            scores = tr.enc_mask_predictor(self.project(src + pos, pad, valid))
            scores = scores.masked_fill(pad, scores.min())
            counts = ((~pad).sum(1) * self.rho).int() + 1
            top = scores.topk(int(counts.max()), dim=1).indices
            take = lambda t: torch.stack([t[i, top[i]] for i in range(len(t))])  # noqa: E731
            query, qpos, qref = take(src), take(pos), take(refs)
            for layer in tr.encoder.layers:
                query = layer(query, qpos, qref, memory, shapes, pad)
                memory = torch.stack([memory[i].index_copy(0, top[i, :counts[i]], query[i, :counts[i]])
                                      for i in range(len(memory))])
        else:
            for layer in tr.encoder.layers:
                memory = layer(memory, pos, refs, memory, shapes, pad)
        # queries: learnt, or the best encoder proposals
        n = len(tr.decoder.layers)
        if self.two_stage:
            proposals, valid = self.proposals(pad, shapes)
            out_memory = self.project(memory, pad, valid)
            enc_logits = self.class_embed[n](out_memory)
            enc_boxes = self.bbox_embed[n](out_memory) + proposals
            score = enc_logits.max(-1).values if self.memory_queries else enc_logits[..., 0]
            top = score.topk(self.queries, dim=1).indices
            boxes = torch.stack([enc_boxes[i, top[i]] for i in range(len(top))])
            reference = boxes.sigmoid()
            embedded = tr.pos_trans_norm(tr.pos_trans(box_sine(boxes, self.d // 2)))
            if self.memory_queries:
                query_pos, t = embedded, torch.stack([memory[i, top[i]] for i in range(len(top))])
            else:
                query_pos, t = embedded.split(self.d, -1)
        else:
            query_pos, t = self.query_embed.weight.split(self.d, -1)
            query_pos, t = query_pos.expand(len(src), -1, -1), t.expand(len(src), -1, -1)
            reference = tr.reference_points(query_pos).sigmoid()
        logits, boxes = [], []
        for lid, layer in enumerate(tr.decoder.layers):
            scale = ratios if reference.shape[-1] == 2 else torch.cat([ratios, ratios], -1)
            t = layer(t, query_pos, reference[:, :, None] * scale[:, None], memory, shapes, pad)
            delta = self.bbox_embed[lid](t)
            if reference.shape[-1] == 4:
                box = (delta + logit(reference)).sigmoid()
            else:
                box = torch.cat([delta[..., :2] + logit(reference), delta[..., 2:]], -1).sigmoid()
            logits.append(self.class_embed[lid](t))
            boxes.append(box)
            if self.refining:
                reference = box.detach()
        return {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
