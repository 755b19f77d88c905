"""Sparse DETR (Roh et al. 2022): Deformable DETR+ whose encoder updates only a share rho of
each image's tokens, the ones a scoring network ranks highest; every layer's queries are the
kept tokens, its keys and values the whole current map, and the other tokens keep their
backbone features. The scorer learns the decoder's cross-attention map (DAM) or, with
saliency "os", is an objectness detection head on the backbone tokens. Detection heads on
the kept tokens of the earlier encoder layers add Hungarian losses (encoder auxiliary loss).

Same detector contract as Deformable DETR; training also returns statistics: the kept share
(overall and per level) and, per level, the share of the decoder-referenced tokens the
encoder updated (`dam_in_kept_level{l}`)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .deformable_detr import DeformableDETR, build_deformable_detr, detection_head
from .detr import normalized_targets
from .sparsity.sparse_detr import (SCORING_LOSS_NORMS, ScoringNetwork, attention_map, binarize_top,
                                   reference_correlation, scoring_loss)
from .sparsity.tokens import (KeptTokens, box_shares, gather_tokens, keep_counts, keep_statistics,
                              kept_in_boxes, scatter_tokens, select_top)
from .transformers.deformable_transformer import TokenMap, encoder_proposals

SALIENCY = ("dam", "os")


class SparseDETR(DeformableDETR):
    """rho: share of each image's valid tokens the encoder updates (int(valid * rho) + 1);
    0 runs the dense encoder (Deformable DETR+). It can be changed at any time
    (`model.rho = 0.2`): a model trained at one rho runs at another."""

    def __init__(self, *args, rho: float = 0.1, saliency: str = "dam", enc_aux_loss: bool = True,
                 mask_loss_weight: float = 1.0, scoring_loss_norm: str = "image", **kwargs):
        super().__init__(*args, **kwargs)
        if not self.two_stage:
            raise ValueError("model.two_stage: Sparse DETR is built on two-stage Deformable DETR+")
        if saliency not in SALIENCY:
            raise ValueError(f"model.sparse.saliency: '{saliency}' not in {SALIENCY}")
        d, num_classes = self.transformer.d_model, self.class_embed[0].out_features
        if scoring_loss_norm not in SCORING_LOSS_NORMS:
            raise ValueError(f"model.sparse.scoring_loss_norm: '{scoring_loss_norm}' not in {SCORING_LOSS_NORMS}")
        self.rho, self.saliency, self.mask_loss_weight = rho, saliency, mask_loss_weight
        self.scoring_loss_norm = scoring_loss_norm
        if saliency == "dam":
            self.scoring = ScoringNetwork(d)
        else:
            self.objectness_class, self.objectness_box = detection_head(d, num_classes)
        heads = [detection_head(d, num_classes) for _ in range(len(self.transformer.encoder) - 1)
                 if enc_aux_loss]
        self.enc_aux_class = nn.ModuleList(h[0] for h in heads)
        self.enc_aux_box = nn.ModuleList(h[1] for h in heads)
        for layer in self.transformer.decoder:
            layer.cross_attn.record_sampling = True  # the DAM of the same forward pass

    def encode(self, t: TokenMap) -> tuple[Tensor, dict]:
        if self.rho <= 0:
            return self.transformer.encode(t), {}
        tr = self.transformer
        proposals, has_proposal = encoder_proposals(t.mask, t.shape_list)
        # the backbone tokens through the two-stage projection, as the official code scores them
        tokens = tr.enc_output_norm(tr.enc_output((t.src + t.pos).masked_fill(~has_proposal[..., None], 0.0)))
        extra = {}
        if self.saliency == "dam":
            scores = self.scoring(tokens, t.mask)
            extra["token_scores"] = scores
        else:
            logits = self.objectness_class(tokens)
            scores = logits.max(-1).values
            if self.training:  # ranking needs the class scores only; the loss needs boxes too
                boxes = (self.objectness_box(tokens) + proposals).sigmoid()
                extra["os"] = {"pred_logits": logits, "pred_boxes": boxes, "query_mask": has_proposal}
        kept = select_top(scores, keep_counts(t.mask, self.rho), t.mask)
        memory, aux = self.sparse_encoder(t, kept, proposals)
        extra.update(kept=kept, token_map=t)
        extra_outputs = {f"encaux{i}": a for i, a in enumerate(aux)}
        if "os" in extra:
            extra_outputs["os"] = extra.pop("os")
        return memory, {**extra, "extra_outputs": extra_outputs}

    def sparse_encoder(self, t: TokenMap, kept: KeptTokens, proposals: Tensor) -> tuple[Tensor, list[dict]]:
        """Each layer updates the kept tokens only (sampling from the whole current map) and
        writes them back. -> memory (B, S, C), in training the auxiliary outputs of the
        earlier layers on the kept tokens (boxes relative to the tokens' proposals)."""
        memory = t.src
        query = gather_tokens(t.src, kept.index)
        pos, reference = gather_tokens(t.pos, kept.index), gather_tokens(t.reference_points, kept.index)
        proposals = gather_tokens(proposals, kept.index)
        # a kept token without a proposal (image border) has no box to learn from
        has_proposal = torch.isfinite(proposals).all(-1) & kept.mask
        aux = []
        for i, layer in enumerate(self.transformer.encoder):
            query = layer(query, pos, reference, t.shapes, t.starts, t.mask, memory)
            memory = scatter_tokens(memory, kept, query)
            if self.training and i < len(self.enc_aux_class):  # only the loss reads them
                aux.append({"pred_logits": self.enc_aux_class[i](query),
                            "pred_boxes": (self.enc_aux_box[i](query) + proposals).sigmoid(),
                            "query_mask": has_proposal})
        return memory, aux

    def forward(self, images, targets: list[dict] | None = None):
        if not self.training:
            return super().forward(images)
        if targets is None:
            raise ValueError("Sparse DETR in training mode needs targets")
        if self.rho <= 0:  # its scorer and auxiliary heads would get no gradient (DDP fails)
            raise ValueError("model.sparse.rho: Sparse DETR trains with rho > 0; for the dense "
                             "encoder train deformable_detr_plus (rho 0 is for evaluation)")
        out = self.forward_raw(images)
        losses = self.criterion(out, normalized_targets(targets, images.sizes))
        if "kept" in out:
            losses.update(self.sparsity_losses(out))
            t = out["token_map"]
            where = kept_in_boxes(out["kept"].dense(t.mask.shape[1]), ~t.mask, t.shapes, targets,
                                  tuple(images.tensors.shape[-2:]))
            losses.update(box_shares(where, "keep"))
        return losses

    def decoder_attention_map(self, t: TokenMap) -> Tensor:
        """The DAM (B, S) of the last forward pass, from its decoder's recorded sampling."""
        sampling = [layer.cross_attn.sampling for layer in self.transformer.decoder]
        return attention_map([s[0] for s in sampling], [s[1] for s in sampling], t.shapes, t.starts)

    def token_maps(self, out: dict) -> dict | None:
        """For pictures, from forward_raw's outputs: {"maps": {"kept": (B, S), "DAM": (B, S)},
        "kept" (the encoder's tokens), "valid", "shapes", "starts", "counts"}; None when the
        encoder was dense."""
        if "kept" not in out:
            return None
        t = out["token_map"]
        kept = out["kept"].dense(t.mask.shape[1])
        return {"maps": {"kept": kept, "DAM": self.decoder_attention_map(t)}, "kept": kept,
                "valid": ~t.mask, "shapes": t.shapes, "starts": t.starts, "counts": out["kept"].counts}

    def sparsity_losses(self, out: dict) -> dict[str, Tensor]:
        """The scorer's loss against the binarised DAM (saliency "dam") and statistics."""
        kept, t = out["kept"], out["token_map"]
        dam = self.decoder_attention_map(t)
        target = binarize_top(dam, kept.counts, t.mask)
        stats = keep_statistics(kept, t.mask, t.starts)
        corr = reference_correlation(target, kept.dense(t.mask.shape[1]), t.mask, t.starts, t.shapes)
        stats.update({f"dam_in_kept_level{i}": c for i, c in enumerate(corr[:-1])})
        stats["dam_in_kept"] = corr[-1]
        if self.saliency == "dam":
            stats["loss_mask"] = self.mask_loss_weight * scoring_loss(out["token_scores"], target, t.mask,
                                                                      self.scoring_loss_norm)
        return stats


def build_sparse_detr(cfg, num_classes: int) -> SparseDETR:
    """model.name "sparse_detr": Deformable DETR+ (two-stage, memory-initialised queries)
    with model.sparse settings."""
    s = cfg.sparse
    return build_deformable_detr(cfg, num_classes, query_init="memory", model_cls=SparseDETR,
                                 rho=s.rho, saliency=s.saliency, enc_aux_loss=s.enc_aux_loss,
                                 mask_loss_weight=s.mask_loss_weight, scoring_loss_norm=s.scoring_loss_norm)
