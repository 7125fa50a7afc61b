"""Region proposal network: anchors, matching, sampling, box coding, Eq. 1 and proposals (paper 3.1, 3.2, 4.1.3).

Section 3.1 defines the RPN (Ren et al. [19]): p = o . c . f(x), t = d . c . f(x), trained with Eq. 1. Section 3.2
trains it on K selective-search boxes per image instead of human boxes; section 4.1.3 fixes the anchors (areas
24^2..192^2 on P2..P5, ratios 0.5/1/2) and the proposal counts (top 64 before NMS, top K = 4 after).

Symbols (paper -> code)
    f        feature extractor (model.py)             features: list of (B, C, H_l, W_l), P2 first
    c        shared 3x3 conv + ReLU                   RPNHead.c
    o        objectness 1x1 conv (A per location)     RPNHead.o -> logits (B, N); p = sigmoid(logits)
    d        delta 1x1 conv (4A per location)         RPNHead.d -> deltas (B, N, 4)
    p, t     predicted objectness and deltas of anchor i
    p*, t*   anchor i's label {1, 0} and target deltas labels (B, N), target_deltas (B, N, 4) (rpn_targets)
    lambda   weight of the regression term            lam = 1.0
    N_cls    normaliser of the log loss               number of sampled anchors (labels >= 0) in the batch
    N_reg    normaliser of the smooth-L1 term         the same count (torchvision's convention; [19] uses N_cls = 256,
                                                      N_reg ~ 2400 anchor locations and lambda = 10, a similar balance)
    N        anchors of one image, levels concatenated; A = anchors per location (3 ratios x 1 size)

# DEVIATION (interpretation; rpn_loss(lam=), no flag): Eq. 1's lambda, N_cls and N_reg are not given by the paper
("see [19]"); torchvision's RPN convention above is used.

# DEVIATION (interpretation; flag train.py --ignore-border-anchors): anchors that cross the image border are labelled
like the others (torchvision's and detectron2's default). [19]'s training ignored them (rpn_targets(image_size=));
at 224 px that would leave P5 with ~3 % of its anchors (P4 29 %), so the paper's "see [19]" is not read as that
rule by default.

Public
    make_anchors(feature_sizes, strides, sizes, ratios, device, dtype) -> list of (H_l*W_l*A, 4)
    cached_anchors(feature_sizes, strides, sizes, ratios, device) -> the same as a tuple, built once per key
    match_anchors(anchors, boxes, valid, pos_thresh, neg_thresh) -> labels (B, N), matched (B, N)
    sample_anchors(labels, batch_size_per_image, positive_fraction, generator) -> labels (B, N)
    encode_boxes(boxes, anchors, weights) / decode_boxes(deltas, anchors, weights, clamp)
    scale_pairs(x (..., 2), (w_0, w_1), divide) -> (..., 2)   per-coordinate factors, Python floats (no host copy)
    inside_image(anchors, image_size) -> (N,) bool          anchors wholly inside the (H, W) image ([19]'s rule)
    rpn_targets(anchors, boxes, valid, ..., image_size) -> labels (B, N), target_deltas (B, N, 4)
    rpn_loss(logits, deltas, labels, target_deltas, lam, beta) -> (loss_cls, loss_reg)      Eq. 1
    RPNHead(in_channels, num_anchors)                        c, o, d
    generate_proposals(logits, deltas, anchors, image_size, pre_nms_top_n, post_nms_top_n, nms_thresh, min_size)
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

# Faster R-CNN / torchvision / detectron2: exp(dw) is capped so that a box is at most 1000/16 x its anchor.
BBOX_CLAMP = math.log(1000.0 / 16)


PRETRAIN_ANCHOR_SIZES = (24, 48, 96, 192)  # 4.1.3: one anchor side per level P2..P5 for 224 px views
# Anchor sets kept by cached_anchors: fine-tuning pads images to multiples of 32, so a multi-scale schedule sees a
# few dozen feature sizes at most; 32 sets of ~270k anchors at 1333 x 800 are ~140 MB.
ANCHOR_CACHE_SIZE = 32


def make_anchors(feature_sizes, strides=(4, 8, 16, 32), sizes=PRETRAIN_ANCHOR_SIZES, ratios=(0.5, 1.0, 2.0),
                 device=None, dtype=torch.float32) -> list[torch.Tensor]:
    """Anchors per FPN level (section 4.1.3): one size per level, `ratios` = h / w, area = size^2.

    feature_sizes: one (H_l, W_l) per level, P2 first. Fine-tuning uses strides (4..64), sizes (32..512) on P2-P6.
    Returns a list of (H_l * W_l * A, 4) xyxy image pixels, ordered row y, column x, then ratio (as torchvision's
    AnchorGenerator), the anchor at grid cell (y, x) centred at (x * s, y * s). Unlike torchvision the base anchors
    are not rounded to integers, so areas are exactly size^2.
    """
    if not len(feature_sizes) == len(strides) == len(sizes):
        raise ValueError(f"{len(feature_sizes)} feature sizes, {len(strides)} strides, {len(sizes)} sizes")
    r = torch.as_tensor(ratios, dtype=dtype, device=device)  # (A,)
    h_ratio, w_ratio = torch.sqrt(r), 1.0 / torch.sqrt(r)  # h / w = r and h * w = 1
    out = []
    for (h, w), s, size in zip(feature_sizes, strides, sizes):
        half_w, half_h = size * w_ratio / 2, size * h_ratio / 2
        base = torch.stack([-half_w, -half_h, half_w, half_h], dim=1)  # (A, 4) centred at 0
        ys = torch.arange(int(h), dtype=dtype, device=device) * s
        xs = torch.arange(int(w), dtype=dtype, device=device) * s
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")  # (H, W) each
        shifts = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 1, 4)  # (H*W, 1, 4)
        out.append((shifts + base[None]).reshape(-1, 4))  # (H*W*A, 4)
    return out


@functools.lru_cache(maxsize=ANCHOR_CACHE_SIZE)
def cached_anchors(feature_sizes: tuple, strides: tuple = (4, 8, 16, 32), sizes: tuple = PRETRAIN_ANCHOR_SIZES,
                   ratios: tuple = (0.5, 1.0, 2.0), device=None) -> tuple:
    """make_anchors, built once per (feature sizes, strides, sizes, ratios, device) and shared: do not modify.

    The anchors never change for a feature size, and building them costs ~100 small ops and a host -> device copy of
    the ratios (a synchronising copy on CUDA) per step. Arguments must be hashable (tuples, torch.device)."""
    return tuple(make_anchors(feature_sizes, strides, sizes, ratios, device=device))


def pairwise_iou(boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """IoU of boxes (B, M, 4) with anchors (N, 4), xyxy -> (B, M, N)."""
    area_b = (boxes[..., 2:] - boxes[..., :2]).clamp(min=0).prod(dim=-1)  # (B, M): w * h
    area_a = (anchors[:, 2:] - anchors[:, :2]).prod(dim=-1)  # (N,)
    lt = torch.maximum(boxes[..., None, :2], anchors[:, :2])  # (B, M, N, 2)
    rb = torch.minimum(boxes[..., None, 2:], anchors[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)  # (B, M, N)
    union = area_b[..., None] + area_a - inter
    return inter / union.clamp(min=torch.finfo(inter.dtype).tiny)  # guard: two empty boxes


def match_anchors(anchors: torch.Tensor, boxes: torch.Tensor, valid: torch.Tensor | None = None,
                  pos_thresh: float = 0.7, neg_thresh: float = 0.3, *, zero_iou_low_quality: bool = False):
    """Label anchors against boxes (section 3.1): 1 positive, 0 negative, -1 ignored.

    anchors (N, 4); boxes (B, M, 4) xyxy; valid (B, M) bool (None = all valid; padded boxes never match).
    Positive if max IoU >= pos_thresh or the anchor is one of a box's best anchors (ties included);
    negative if max IoU < neg_thresh; ignored otherwise. M = 0 or no valid box -> all negative.
    Returns labels (B, N) int64 and matched (B, N) int64: the index into M of the anchor's highest-IoU valid box
    (as torchvision's Matcher, also for low-quality positives), 0 where the image has no valid box.
    """
    B, M, _ = boxes.shape
    N = anchors.shape[0]
    dev = anchors.device
    if M == 0:
        z = torch.zeros(B, N, dtype=torch.long, device=dev)
        return z, z.clone()
    if valid is None:
        valid = torch.ones(B, M, dtype=torch.bool, device=dev)
    iou = pairwise_iou(boxes, anchors)  # (B, M, N)
    iou = torch.where(valid[..., None], iou, -1.0)  # invalid boxes: below every real IoU
    max_iou, matched = iou.max(dim=1)  # (B, N): best box per anchor
    # torch.where, not boolean indexing: no host synchronisation on GPU. No valid box -> max_iou = -1 -> negative.
    # DEVIATION (no flag): positive at IoU >= 0.7 (torchvision's Matcher), the paper's "IoU > 0.7"; they differ
    # only at an IoU of exactly 0.7
    labels = torch.where(max_iou >= pos_thresh, 1, torch.where(max_iou < neg_thresh, 0, -1))  # (B, N) int64
    best_per_box = iou.max(dim=2, keepdim=True).values  # (B, M, 1)
    # DEVIATION: a box whose best IoU is 0 (it overlaps no anchor) gives no low-quality match; torchvision's Matcher
    # would then mark every anchor with IoU 0 to it positive. zero_iou_low_quality=True restores that behaviour.
    usable = valid[..., None] & ((best_per_box > 0) | zero_iou_low_quality)
    low_quality = ((iou == best_per_box) & usable).any(dim=1)  # (B, N); ties included
    labels = torch.where(low_quality, 1, labels)
    matched = torch.where(valid.any(dim=1, keepdim=True), matched, 0)
    return labels, matched


def sample_anchors(labels: torch.Tensor, batch_size_per_image: int = 256, positive_fraction: float = 0.5,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Balanced random sampling (Faster R-CNN): labels (B, N) -> (B, N) with the unsampled anchors set to -1.

    Per image at most int(batch_size_per_image * positive_fraction) positives; negatives fill the rest of
    batch_size_per_image. One sort per batch: positives get random keys in [2, 3), negatives [0, 1), ignored -1,
    so the rank of an anchor in the descending order is its place in a random permutation of its class.
    """
    B, N = labels.shape
    pos, neg = labels == 1, labels == 0
    n_pos_all = pos.sum(dim=1, keepdim=True)  # (B, 1)
    num_pos = n_pos_all.clamp(max=int(batch_size_per_image * positive_fraction))
    num_neg = neg.sum(dim=1, keepdim=True).clamp(max=batch_size_per_image - num_pos)
    gen_dev = generator.device if generator is not None else labels.device
    r = torch.rand(B, N, generator=generator, device=gen_dev).to(labels.device)  # (B, N) in [0, 1)
    key = torch.where(pos, r + 2.0, torch.where(neg, r, -1.0))  # 2.0 puts every positive before every negative
    order = key.argsort(dim=1, descending=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=labels.device).expand(B, N))
    keep = (pos & (rank < num_pos)) | (neg & (rank - n_pos_all < num_neg))
    return torch.where(keep, labels, -1)


def _centre_size(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """xyxy (..., 4) -> centre (..., 2) (x, y) and size (..., 2) (w, h), as pairs: half the operators of four
    coordinates apart (each one a kernel launch on a GPU)."""
    size = b[..., 2:] - b[..., :2]
    return b[..., :2] + 0.5 * size, size


def scale_pairs(x: torch.Tensor, w: tuple, divide: bool = False) -> torch.Tensor:
    """x (..., 2) times (divide: over) the per-coordinate weights w = (w_0, w_1), Python floats: no host -> device
    copy of a weight tensor (a synchronising copy on CUDA)."""
    if w[0] == w[1]:
        return x if w[0] == 1 else (x / w[0] if divide else x * w[0])
    return torch.stack([x[..., i] / w[i] if divide else x[..., i] * w[i] for i in range(2)], dim=-1)


def encode_boxes(boxes: torch.Tensor, anchors: torch.Tensor, weights=(1.0, 1.0, 1.0, 1.0)) -> torch.Tensor:
    """Target deltas t* of boxes (..., 4) relative to anchors (..., 4), xyxy -> (..., 4) (dx, dy, dw, dh).

    dx = wx (x - x_a) / w_a, dy = wy (y - y_a) / h_a, dw = ww log(w / w_a), dh = wh log(h / h_a) (Ren et al. [19]).
    """
    c_a, s_a = _centre_size(anchors)  # (..., 2) each
    c_g, s_g = _centre_size(boxes)
    d_c = scale_pairs(c_g - c_a, weights[:2]) / s_a  # (dx, dy)
    d_s = scale_pairs(torch.log(s_g / s_a), weights[2:])  # (dw, dh)
    return torch.cat([d_c, d_s], dim=-1)


def decode_boxes(deltas: torch.Tensor, anchors: torch.Tensor, weights=(1.0, 1.0, 1.0, 1.0),
                 clamp: float = BBOX_CLAMP) -> torch.Tensor:
    """Inverse of encode_boxes: deltas (..., 4) on anchors (..., 4) -> boxes (..., 4) xyxy.

    dw and dh are clamped from above at `clamp` (log(1000/16)) so exp() cannot overflow. Computed in at least
    float32 (deltas may arrive in bf16 under autocast).
    """
    dtype = torch.promote_types(deltas.dtype, torch.float32)
    deltas, anchors = deltas.to(dtype), anchors.to(dtype)
    c_a, s_a = _centre_size(anchors)  # (..., 2) each
    d_c = scale_pairs(deltas[..., :2], weights[:2], divide=True)  # (dx, dy)
    d_s = scale_pairs(deltas[..., 2:], weights[2:], divide=True).clamp(max=clamp)  # (dw, dh)
    c, s = d_c * s_a + c_a, torch.exp(d_s) * s_a  # (..., 2) centre, size
    return torch.cat([c - 0.5 * s, c + 0.5 * s], dim=-1)


def inside_image(anchors: torch.Tensor, image_size) -> torch.Tensor:
    """anchors (N, 4) xyxy -> (N,) bool: wholly inside the image of image_size (H, W), [19]'s training rule."""
    H, W = image_size
    return (anchors[:, 0] >= 0) & (anchors[:, 1] >= 0) & (anchors[:, 2] <= W) & (anchors[:, 3] <= H)


def rpn_targets(anchors: torch.Tensor, boxes: torch.Tensor, valid: torch.Tensor | None = None,
                batch_size_per_image: int = 256, positive_fraction: float = 0.5,
                generator: torch.Generator | None = None, image_size=None):
    """p* and t* of Eq. 1: anchors (N, 4), boxes (B, M, 4) (section 3.2: the K selective-search boxes per image).

    image_size (H, W): anchors crossing its border are ignored (label -1) before sampling, as [19] trains; None
    (default): labelled like the others (see the module's DEVIATION). Returns labels (B, N) sampled {1, 0, -1} and
    target_deltas (B, N, 4) (zero where the anchor is not positive). Targets need no gradient.
    """
    B, M, _ = boxes.shape
    labels, matched = match_anchors(anchors, boxes.detach(), valid)
    if image_size is not None:
        labels = torch.where(inside_image(anchors, image_size), labels, -1)  # (B, N)
    labels = sample_anchors(labels, batch_size_per_image, positive_fraction, generator)
    anchors_b = anchors.expand(B, -1, -1)  # (B, N, 4)
    if M == 0:
        return labels, torch.zeros_like(anchors_b)
    gathered = torch.gather(boxes.detach(), 1, matched[..., None].expand(-1, -1, 4))  # (B, N, 4)
    # non-positive anchors are "matched" to themselves: zero deltas, no log(0) from padded boxes
    gathered = torch.where((labels == 1)[..., None], gathered, anchors_b)
    return labels, encode_boxes(gathered, anchors_b)


def rpn_loss(logits: torch.Tensor, deltas: torch.Tensor, labels: torch.Tensor, target_deltas: torch.Tensor,
             lam: float = 1.0, beta: float = 1.0 / 9):
    # Eq. 1: L_RPN = 1/N_cls sum_i L_cls(p_i, p*_i) + lambda 1/N_reg sum_i p*_i L_reg(t_i, t*_i)
    """Eq. 1 over the batch: logits (B, N), deltas (B, N, 4), labels (B, N) in {1, 0, -1}, target_deltas (B, N, 4).

    L_cls = binary cross-entropy on the logits (the paper's log loss on p = sigmoid(logit)), summed over the sampled
    anchors (labels >= 0). L_reg = smooth L1 (beta = 1/9, torchvision's RPN) summed over the positive anchors and
    the 4 coordinates. N_cls = N_reg = number of sampled anchors in the batch (torchvision's convention; at least 1,
    so an image with no boxes gives a finite loss and loss_reg = 0). lambda = 1. Masks instead of boolean indexing:
    no host synchronisation on GPU. Returns (loss_cls, loss_reg) scalars; the total is their sum.
    Leading dimensions (V, B, N) are V batches computed together (model.py: views of one size), each normalised
    by its own N_cls; the result is their mean.
    """
    sampled, pos = labels >= 0, labels == 1  # (..., B, N)
    n = sampled.flatten(-2).sum(dim=-1).clamp(min=1).to(torch.float32)  # (...,) N_cls = N_reg of each batch
    bce = F.binary_cross_entropy_with_logits(logits.float(), pos.float(), reduction="none")  # (..., B, N)
    loss_cls = (torch.where(sampled, bce, 0.0).flatten(-2).sum(dim=-1) / n).mean()
    target = torch.where(pos[..., None], target_deltas.float(), 0.0)  # non-positive targets never enter
    reg = F.smooth_l1_loss(deltas.float(), target, beta=beta, reduction="none").sum(dim=-1)  # (..., B, N)
    loss_reg = lam * (torch.where(pos, reg, 0.0).flatten(-2).sum(dim=-1) / n).mean()
    return loss_cls, loss_reg


class RPNHead(nn.Module):
    """c, o, d of section 3.1: p = o . c . f(x), t = d . c . f(x), shared over the FPN levels.

    forward(features: list of (B, C, H_l, W_l)) -> logits (B, N), deltas (B, N, 4), flattened in make_anchors'
    order (level, row y, column x, anchor a), levels concatenated.
    """

    def __init__(self, in_channels: int = 256, num_anchors: int = 3):
        super().__init__()
        self.c = nn.Conv2d(in_channels, in_channels, 3, padding=1)  # shared 3x3 conv (followed by ReLU)
        self.o = nn.Conv2d(in_channels, num_anchors, 1)  # objectness logit per anchor
        self.d = nn.Conv2d(in_channels, 4 * num_anchors, 1)  # (dx, dy, dw, dh) per anchor, channel a * 4 + k
        for conv in (self.c, self.o, self.d):
            nn.init.normal_(conv.weight, std=0.01)  # Ren et al. [19] / torchvision RPNHead: N(0, 0.01^2), bias 0
            nn.init.zeros_(conv.bias)

    def forward(self, features: list[torch.Tensor]):
        all_logits, all_deltas = [], []
        for x in features:
            B, _, H, W = x.shape
            h = F.relu(self.c(x))
            logits = self.o(h)  # (B, A, H, W)
            deltas = self.d(h).view(B, -1, 4, H, W)  # (B, A, 4, H, W)
            all_logits.append(logits.permute(0, 2, 3, 1).reshape(B, -1))  # (B, H*W*A)
            all_deltas.append(deltas.permute(0, 3, 4, 1, 2).reshape(B, -1, 4))  # (B, H*W*A, 4)
        return torch.cat(all_logits, dim=1), torch.cat(all_deltas, dim=1)


@torch.no_grad()
def generate_proposals(logits: torch.Tensor, deltas: torch.Tensor, anchors: list[torch.Tensor], image_size,
                       pre_nms_top_n: int = 64, post_nms_top_n: int = 4, nms_thresh: float = 0.7,
                       min_size: float = 1e-3):
    """RPN proposals: logits (B, N), deltas (B, N, 4), anchors list of (N_l, 4), image_size (H, W) for every image or
    a list of B (H, W).

    Per image: the top pre_nms_top_n anchors by objectness on each level, decode, clip to the image, drop boxes
    with a side < min_size, NMS at nms_thresh per level (torchvision batched_nms, level as the group), then the top
    post_nms_top_n by score. Pre-training (4.1.3): 64 before NMS, K = 4 after.
    # DEVIATION (interpretation; no flag): 4.1.3's "top 64 proposals before non-maximum suppression" is read per
    level, as torchvision and detectron2 apply pre_nms_top_n.
    Fine-tuning (torchvision/detectron2 Faster R-CNN FPN): 2000 per level before NMS, 1000 after. No gradient flows
    through the proposals.
    Returns a list of B tuples (boxes (k, 4) xyxy, scores (k,) sigmoid probabilities), k <= post_nms_top_n,
    sorted by decreasing score.
    """
    B, N = logits.shape
    dev = logits.device
    top_logits, top_deltas, top_anchors, top_levels = [], [], [], []
    start = 0
    for lvl, anc in enumerate(anchors):
        n_l = anc.shape[0]
        k = min(pre_nms_top_n, n_l)
        lg, idx = logits[:, start:start + n_l].topk(k, dim=1)  # (B, k)
        top_logits.append(lg)
        top_deltas.append(torch.gather(deltas[:, start:start + n_l], 1, idx[..., None].expand(-1, -1, 4)))
        top_anchors.append(anc[idx])  # (B, k, 4)
        top_levels.append(torch.full((B, k), lvl, dtype=torch.long, device=dev))
        start += n_l
    if start != N:
        raise ValueError(f"anchors cover {start} positions, logits {N}")
    scores = torch.sigmoid(torch.cat(top_logits, dim=1).float())  # (B, T)
    boxes = decode_boxes(torch.cat(top_deltas, dim=1), torch.cat(top_anchors, dim=1)).clamp_(min=0)  # (B, T, 4)
    per_image = isinstance(image_size[0], (tuple, list, torch.Size))  # [(H, W), ...] rather than one (H, W)
    for rows, (H, W) in (zip(boxes, image_size) if per_image else [(boxes, image_size)]):
        rows[..., 0::2].clamp_(max=float(W))  # clip to the image (Python bounds: no host -> device copy)
        rows[..., 1::2].clamp_(max=float(H))
    T = boxes.shape[1]
    image_id = torch.arange(B, device=dev)[:, None].expand(B, T)
    groups = (image_id * len(anchors) + torch.cat(top_levels, dim=1)).reshape(-1)  # NMS per image and level
    boxes, scores, image_id = boxes.reshape(-1, 4), scores.reshape(-1), image_id.reshape(-1)
    big = ((boxes[:, 2] - boxes[:, 0]) >= min_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_size)
    cand = big.nonzero().squeeze(1)
    keep = cand[torchvision.ops.batched_nms(boxes[cand], scores[cand], groups[cand], nms_thresh)]  # score order
    keep = keep[torch.argsort(image_id[keep], stable=True)]  # grouped by image, still by score inside an image
    counts = torch.bincount(image_id[keep], minlength=B)  # (B,)
    first = torch.cumsum(counts, 0) - counts  # where each image's run starts
    rank = torch.arange(keep.numel(), device=dev) - first[image_id[keep]]
    keep = keep[rank < post_nms_top_n]
    sizes = counts.clamp(max=post_nms_top_n).tolist()
    return [(b, s) for b, s in zip(boxes[keep].split(sizes), scores[keep].split(sizes))]
