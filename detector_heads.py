"""Fine-tuning heads: Fast R-CNN sampling, losses and post-processing, the Mask R-CNN mask head (paper 4.3-4.4).

The paper fine-tunes Mask R-CNN (COCO, 4.3), Cascade R-CNN (SODA10M, 4.3) and Faster R-CNN (VOC few-shot, 4.4) with
their standard heads; the values below are those of Faster R-CNN [19], Mask R-CNN [18], Cascade R-CNN [25] and their
detectron2 / torchvision implementations (reference.md, "Fine-tuning protocols").

Symbols
    C          number of object classes; logits have C + 1 columns, column 0 = background (torchvision's layout)
    K_i        RoIs of image i (proposals + ground-truth boxes, then 512 sampled in training)
    M          ground-truth boxes of an image; P = foreground RoIs (the mask head's inputs)
    t, t*      predicted / target deltas (dx, dy, dw, dh) of a RoI, coded with weights w = (10, 10, 5, 5)
    beta       smooth-L1 transition point; 0 = plain L1 (detectron2's ROI box loss, SoCo's fine-tuning code)

Public
    BOX_WEIGHTS, CASCADE_IOUS, CASCADE_WEIGHTS
    BoxPredictor(in_dim, num_classes, cls_agnostic=False): (N, D) -> logits (N, C+1), deltas (N, 4(C+1) or 4)
    label_rois(rois (K,4), gt_boxes (M,4), gt_labels (M,), iou_thresh=0.5) -> labels (K,), matched (K,)
    sample_rois(proposals, gt_boxes, gt_labels, num=512, positive_fraction=0.25, iou_thresh=0.5, add_gt=True) -> dict
    class_deltas(deltas (N, 4(C+1) or 4), labels (N,)) -> (N, 4)
    fast_rcnn_loss(logits, deltas, labels, target_deltas, beta=0.0, keep=None) -> (loss_cls, loss_box)
    nonempty(boxes (N, 4)) -> (N,) bool
    box_targets(rois, gt_boxes, labels, weights) -> (N, 4)
    scale_boxes(boxes (N,4), sx, sy, divide=False) -> (N, 4); clip_boxes(boxes (...,4), (H, W)) -> (..., 4)
    postprocess(boxes (N,C,4), scores (N,C), image_size, score_thresh, nms_thresh, max_dets) -> boxes, scores, labels
    ConvNormReLU(cin, cout, norm="bn"): 3x3 conv -> norm ("bn", "gn" or "none") -> ReLU, one conv of MaskHead
    MaskHead(in_channels=256, num_classes=80, conv_dim=256, num_convs=4, norm="bn"): (P, 256, 14, 14)
        -> (P, C+1, 28, 28)
    mask_targets(gt_masks (M,H,W), matched (P,), rois (P,4) in mask pixels, size=28) -> (P, 28, 28)
    mask_loss(mask_logits (P, C+1, 28, 28), labels (P,), targets (P, 28, 28)) -> scalar
    paste_masks(probs (n, 28, 28), boxes (n, 4), height, width) -> (n, 1, H, W)
    scale_grad(x, s): identity forward, gradient times s (Cascade R-CNN: 1 / stages into the shared features)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import rpn

BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # Fast R-CNN box coder weights (detectron2 / torchvision)
CASCADE_IOUS = (0.5, 0.6, 0.7)  # Cascade R-CNN [25]: foreground IoU of stages 1-3
CASCADE_WEIGHTS = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))  # stage-wise coders
MIN_DET_SIZE = 1e-2  # px: detections thinner than this are dropped (torchvision's RoIHeads)


class BoxPredictor(nn.Module):
    """cls_score (C+1 logits, background first) and bbox_pred (class-specific 4(C+1), or 4 when class-agnostic).

    Names and layout equal torchvision's FastRCNNPredictor. Init: N(0, 0.01) scores, N(0, 0.001) deltas (detectron2).
    """

    def __init__(self, in_dim: int, num_classes: int, cls_agnostic: bool = False):
        super().__init__()
        self.num_classes, self.cls_agnostic = num_classes, cls_agnostic
        self.cls_score = nn.Linear(in_dim, num_classes + 1)
        self.bbox_pred = nn.Linear(in_dim, 4 if cls_agnostic else 4 * (num_classes + 1))
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, h: torch.Tensor):
        """h (N, D) -> logits (N, C+1), deltas (N, 4(C+1)) or (N, 4)."""
        return self.cls_score(h), self.bbox_pred(h)


def label_rois(rois: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor, iou_thresh: float = 0.5):
    """Fast R-CNN labelling: rois (K, 4), gt (M, 4) xyxy -> labels (K,) class or 0 (IoU < iou_thresh), matched (K,).

    No low-quality matches (unlike the RPN). M = 0 -> everything background, matched 0.
    """
    K = rois.shape[0]
    if gt_boxes.shape[0] == 0:
        zero = torch.zeros(K, dtype=torch.long, device=rois.device)
        return zero, zero.clone()
    iou = torchvision.ops.box_iou(gt_boxes, rois)  # (M, K)
    best, matched = iou.max(dim=0)  # (K,)
    labels = torch.where(best >= iou_thresh, gt_labels[matched], 0)
    return labels, matched


def sample_rois(proposals: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor, num: int = 512,
                positive_fraction: float = 0.25, iou_thresh: float = 0.5, add_gt: bool = True) -> dict:
    """One image's training RoIs: proposals (K, 4) (+ gt boxes (M, 4)), labelled, then `num` sampled, at most
    positive_fraction of them foreground (rpn.sample_anchors' balanced sampler; global RNG).

    Returns dict boxes (S, 4), labels (S,) in 0..C, matched (S,) index into gt (meaningless where label 0).
    """
    rois = torch.cat([proposals, gt_boxes.to(proposals.dtype)]) if add_gt else proposals  # (K + M, 4)
    labels, matched = label_rois(rois, gt_boxes, gt_labels, iou_thresh)
    keep = rpn.sample_anchors((labels > 0).long()[None], num, positive_fraction)[0] >= 0  # (K + M,)
    idx = keep.nonzero().squeeze(1)
    return {"boxes": rois[idx], "labels": labels[idx], "matched": matched[idx]}


def box_targets(rois: torch.Tensor, gt_boxes: torch.Tensor, labels: torch.Tensor, weights=BOX_WEIGHTS):
    """t* of foreground RoIs: rois (N, 4), gt_boxes (N, 4) (each RoI's matched box) -> (N, 4); 0 for background.

    Background rows are coded against a unit box so that log(0) never appears (empty refined cascade boxes).
    """
    fg = (labels > 0)[:, None]  # (N, 1)
    unit = torch.cat([torch.zeros_like(rois[:, :2]), torch.ones_like(rois[:, 2:])], dim=1)  # (N, 4) [0, 0, 1, 1]
    t = rpn.encode_boxes(torch.where(fg, gt_boxes, unit), torch.where(fg, rois, unit), weights)
    return torch.where(fg, t, 0.0)


def class_deltas(deltas: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """deltas (N, 4(C+1)) class-specific or (N, 4) agnostic -> (N, 4) the deltas of each RoI's class."""
    N = deltas.shape[0]
    if deltas.shape[1] == 4:
        return deltas
    return deltas.view(N, -1, 4)[torch.arange(N, device=deltas.device), labels]


def fast_rcnn_loss(logits: torch.Tensor, deltas: torch.Tensor, labels: torch.Tensor, target_deltas: torch.Tensor,
                   beta: float = 0.0, keep: torch.Tensor | None = None):
    """Fast R-CNN [24] loss over the sampled RoIs of the batch: logits (N, C+1), deltas (N, 4(C+1) or 4),
    labels (N,) in 0..C, target_deltas (N, 4); keep (N,) bool: the RoIs that count (None: all).

    loss_cls = softmax cross-entropy, mean over the kept RoIs. loss_box = smooth L1 (beta; 0 = L1) of the gt class's
    deltas, summed over kept foreground RoIs and coordinates, divided by the kept count (detectron2 / torchvision
    normalisation). A RoI outside keep is as if it had been dropped, without a data-dependent shape (no host sync).
    """
    keep = torch.ones_like(labels, dtype=torch.bool) if keep is None else keep  # (N,)
    N = keep.sum().clamp(min=1)  # a tensor: no host sync
    loss_cls = torch.where(keep, F.cross_entropy(logits.float(), labels, reduction="none"), 0.0).sum() / N
    fg = (labels > 0) & keep  # (N,)
    pred = class_deltas(deltas.float(), labels)  # (N, 4)
    target = torch.where(fg[:, None], target_deltas.float(), 0.0)
    if beta > 0:
        reg = F.smooth_l1_loss(pred, target, beta=beta, reduction="none")
    else:
        reg = (pred - target).abs()
    loss_box = torch.where(fg[:, None], reg, 0.0).sum() / N
    return loss_cls, loss_box


def nonempty(boxes: torch.Tensor) -> torch.Tensor:
    """(N, 4) xyxy -> (N,) bool: width and height > 0 (detectron2's Boxes.nonempty; a collapsed cascade box)."""
    wh = boxes[:, 2:] - boxes[:, :2]  # (N, 2)
    return (wh > 0).all(dim=1)


def scale_boxes(boxes: torch.Tensor, sx: float, sy: float, divide: bool = False) -> torch.Tensor:
    """xyxy boxes (N, 4) times (or, divide=True, over) (sx, sy, sx, sy) -> (N, 4). The factors stay Python floats:
    a factor tensor made from them would be copied host -> device, a synchronising copy on CUDA."""
    corners = boxes.reshape(-1, 2, 2)  # (N, 2, 2) [[x1, y1], [x2, y2]]
    return rpn.scale_pairs(corners, (sx, sy), divide).reshape(-1, 4)


def clip_boxes(boxes: torch.Tensor, image_size) -> torch.Tensor:
    """(..., 4) xyxy clipped to an (H, W) image."""
    H, W = image_size
    return torch.stack([boxes[..., 0].clamp(0, W), boxes[..., 1].clamp(0, H),
                        boxes[..., 2].clamp(0, W), boxes[..., 3].clamp(0, H)], dim=-1)


def postprocess(boxes: torch.Tensor, scores: torch.Tensor, image_size, score_thresh: float = 0.05,
                nms_thresh: float = 0.5, max_dets: int = 100):
    """Per-class detections of one image: boxes (N, C, 4), scores (N, C) of the C foreground classes.

    Clip to image_size (H, W), keep score > score_thresh and sides >= MIN_DET_SIZE, NMS per class at nms_thresh,
    then the top max_dets by score. Returns boxes (n, 4), scores (n,), labels (n,) int64 in 1..C.
    """
    N, C = scores.shape
    boxes = clip_boxes(boxes.float(), image_size).reshape(-1, 4)  # (N * C, 4)
    labels = torch.arange(1, C + 1, device=scores.device).repeat(N)  # (N * C,) row-major like boxes
    scores = scores.float().reshape(-1)
    wh = boxes[:, 2:] - boxes[:, :2]
    keep = ((scores > score_thresh) & (wh >= MIN_DET_SIZE).all(dim=1)).nonzero().squeeze(1)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    keep = torchvision.ops.batched_nms(boxes, scores, labels, nms_thresh)[:max_dets]  # sorted by score
    return boxes[keep], scores[keep], labels[keep]


class ConvNormReLU(nn.Sequential):
    """3x3 conv (no bias when normalised) -> norm -> ReLU; `conv` / `norm` map onto Conv2dNormActivation's 0 / 1."""

    def __init__(self, cin: int, cout: int, norm: str = "bn"):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=(norm == "none"))
        norms = {"bn": lambda: nn.BatchNorm2d(cout), "gn": lambda: nn.GroupNorm(32, cout), "none": nn.Identity}
        if norm not in norms:
            raise ValueError(f"unknown norm {norm!r} (expected bn, gn or none)")
        self.norm = norms[norm]()  # GroupNorm: 32 groups (Wu & He)
        self.act = nn.ReLU(inplace=True)


class MaskHead(nn.Module):
    """Mask R-CNN [18] FPN mask head: 4 x ConvNormReLU(256) on 14x14 RoI features -> 2x deconv + ReLU -> 1x1 conv
    to C + 1 per-class mask logits at 28x28 (column 0, background, unused; torchvision's layout).

    norm "bn" follows SoCo's detectron2 configs (SyncBN in the heads) and torchvision's maskrcnn_v2.
    """

    def __init__(self, in_channels: int = 256, num_classes: int = 80, conv_dim: int = 256, num_convs: int = 4,
                 norm: str = "bn"):
        super().__init__()
        chans = [in_channels] + [conv_dim] * num_convs
        self.convs = nn.Sequential(*(ConvNormReLU(a, b, norm) for a, b in zip(chans[:-1], chans[1:])))
        self.deconv = nn.ConvTranspose2d(conv_dim, conv_dim, 2, stride=2)  # 14 -> 28
        self.logits = nn.Conv2d(conv_dim, num_classes + 1, 1)
        for m in self.modules():  # He normal fan_out (detectron2 c2_msra_fill); predictor N(0, 0.001)
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.logits.weight, std=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (P, 256, 14, 14) -> (P, C+1, 28, 28) logits."""
        return self.logits(F.relu(self.deconv(self.convs(x)), inplace=True))


@torch.no_grad()
def mask_targets(gt_masks: torch.Tensor, matched: torch.Tensor, rois: torch.Tensor, size: int = 28) -> torch.Tensor:
    """Binary 28x28 targets: each foreground RoI (P, 4) (in the masks' pixels) cuts its matched gt mask
    (gt_masks (M, H, W) uint8/bool) with RoIAlign (aligned, adaptive sampling) and thresholds at 0.5."""
    if rois.shape[0] == 0:
        return rois.new_zeros((0, size, size))
    masks = gt_masks[:, None].to(rois.dtype)  # (M, 1, H, W)
    idx_rois = torch.cat([matched[:, None].to(rois.dtype), rois], dim=1)  # (P, 5): batch index = gt index
    cut = torchvision.ops.roi_align(masks, idx_rois, size, 1.0, sampling_ratio=0, aligned=True)  # (P, 1, 28, 28)
    return (cut[:, 0] >= 0.5).to(rois.dtype)


def mask_loss(mask_logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mask R-CNN's L_mask: per-pixel sigmoid BCE on the gt class's channel only, mean over P x 28 x 28."""
    if labels.numel() == 0:
        return mask_logits.sum() * 0.0
    picked = mask_logits[torch.arange(labels.numel(), device=labels.device), labels]  # (P, 28, 28)
    return F.binary_cross_entropy_with_logits(picked.float(), targets.float())


def paste_masks(probs: torch.Tensor, boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Paste (n, h, w) mask probabilities into their boxes (n, 4) of an (height, width) image -> (n, 1, H, W).

    The pixels around each box sample the mask bilinearly (mask edges = box edges) with zeros beyond its edges, as
    detectron2 pastes: a pixel whose centre lies inside the box gets more than half the nearest edge value, one whose
    centre lies outside less than half, so a full mask at 0.5 covers exactly the pixels centred in its box. Pixels
    farther away: 0.
    """
    n = probs.shape[0]
    out = probs.new_zeros((n, 1, height, width))
    dev = probs.device
    for i, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        c0, r0 = max(int(math.floor(x1)), 0), max(int(math.floor(y1)), 0)
        c1, r1 = min(int(math.ceil(x2)), width), min(int(math.ceil(y2)), height)
        if c1 <= c0 or r1 <= r0:
            continue
        gx = (torch.arange(c0, c1, device=dev, dtype=probs.dtype) + 0.5 - x1) / max(x2 - x1, 1e-6) * 2 - 1
        gy = (torch.arange(r0, r1, device=dev, dtype=probs.dtype) + 0.5 - y1) / max(y2 - y1, 1e-6) * 2 - 1
        grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)  # (h, w, 2) as (x, y)
        out[i, 0, r0:r1, c0:c1] = F.grid_sample(probs[i][None, None], grid[None], align_corners=False)[0, 0]
    return out


def scale_grad(x: torch.Tensor, s: float) -> torch.Tensor:
    """Forward: x. Backward: gradient times s (Cascade R-CNN scales each stage's gradient into the features)."""
    return x * s + x.detach() * (1.0 - s)
