"""Faster, Mask and Cascade R-CNN assembled from the pre-trained modules, for fine-tuning (paper 4.3, 4.4).

The pre-trained network of sections 3.1-3.4 is a whole two-stage detector minus its class-specific layers: f
(model.FeatureExtractor, P6 added at fine-tuning: a max-pool, no parameters), the RPN c, o, d (rpn.RPNHead) and the
Fast R-CNN head g (roi_head.BoxHead, 4conv1fc with BN as SoCo's detectron2 configs). This file adds what fine-tuning
needs around them: the box predictor, the mask head (Mask R-CNN [18], COCO in 4.3), three cascade stages
(Cascade R-CNN [25], SODA10M in 4.3) and the Faster R-CNN [19] inference path (VOC few-shot in 4.4).
`load_pretrained` loads a pretrained.pth (model.export_pretrained's keys) and reports what was initialised fresh.

Images: the model takes a list of float (3, H, W) RGB images in [0, 1] of any sizes and does the resize inside,
like torchvision: short side min_size (one drawn per image in training: multi-scale), long side <= max_size, test
short side test_size; ImageNet mean/std; zero padding (after normalisation) to a multiple of 32. Outputs and
targets are in the original image pixels.

Symbols
    B            images in the batch; (h_i, w_i) resized size of image i, (sx_i, sy_i) its resize factors
    P2..P6       FPN levels, strides 4..64; anchors 32..512 px, ratios 0.5 / 1 / 2 (3 per location)
    C            object classes; labels 1..C (0 = background)
    k            cascade stage (IoU 0.5 / 0.6 / 0.7, box coder weights (10,10,5,5) x 1, 2, 3)

Public
    DetectorConfig                       every hyper-parameter, the paper's / detectron2's values as defaults
    Detector(cfg, weights_path=None)     .losses(images, targets) -> dict of scalar losses ("loss" = their sum)
                                         .forward(images) -> list of dict(boxes (n,4), labels (n,), scores (n,)
                                         [, masks (n,1,H,W) float in [0,1]]) in original pixels (torchvision's form)
    CascadeStage(cfg)                    one cascade stage: its own box_head g and class-agnostic box_predictor
    load_pretrained(detector, path, verbose=True) -> dict(loaded, fresh, unused, mismatched, meta)
    format_report(report, path) -> str   load_pretrained's report as the lines it prints (loaded / fresh / unused)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import detector_heads as dh
import model as model_lib
import roi_head
import rpn

KINDS = ("faster", "mask", "cascade")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class DetectorConfig:
    """Fine-tuning detector settings (detectron2's R50-FPN 1x values where the paper is silent)."""
    num_classes: int = 80
    kind: str = "faster"                    # faster | mask | cascade
    depth: int = 50                         # ResNet depth (paper: 50)
    fpn_norm: str = "bn"                    # SoCo / ADePT pre-train the FPN with BN
    head: str = "4conv1fc"                  # the pre-trained g; "2fc" the usual Faster R-CNN head
    head_norm: str = "bn"
    fpn_channels: int = model_lib.FPN_CHANNELS  # d (FPN paper: 256); DEVIATION in the CPU study only: 128
    mask_dim: int = 256                     # mask head conv width (Mask R-CNN: 256); DEVIATION, CPU study: 64
    mask_norm: str = "bn"                   # SoCo's configs: SyncBN in every head
    min_size: tuple = (640, 672, 704, 736, 768, 800)  # multi-scale training short sides (COCO 1x)
    max_size: int = 1333
    test_size: int = 800
    size_divisible: int = 32
    anchor_sizes: tuple = (32, 64, 128, 256, 512)    # P2..P6
    anchor_ratios: tuple = (0.5, 1.0, 2.0)
    rpn_pre_nms_train: int = 2000           # per level and image
    rpn_post_nms_train: int = 1000          # per image
    rpn_pre_nms_test: int = 1000
    rpn_post_nms_test: int = 1000
    rpn_nms: float = 0.7
    rpn_batch: int = 256                    # sampled anchors per image, half positive at most
    rpn_positive_fraction: float = 0.5
    rpn_box_beta: float = 0.0               # L1 RPN box loss: detectron2's SMOOTH_L1_BETA 0 (SoCo); torchvision 1/9
    roi_batch: int = 512                    # sampled RoIs per image
    roi_positive_fraction: float = 0.25
    fg_iou: float = 0.5
    box_beta: float = 0.0                   # 0 = L1 box loss (detectron2); torchvision: smooth L1 with 1/9
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    max_dets: int = 100
    cascade_ious: tuple = dh.CASCADE_IOUS
    cascade_weights: tuple = dh.CASCADE_WEIGHTS
    sampling_ratio: int = 0                 # RoIAlign: adaptive (detectron2 ROIAlignV2); aligned=True
    extra: dict = field(default_factory=dict)  # free-form notes saved with checkpoints

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown detector kind {self.kind!r}: expected one of {KINDS}")
        self.min_size = tuple(self.min_size) if isinstance(self.min_size, (list, tuple)) else (int(self.min_size),)


class CascadeStage(nn.Module):
    """One cascade stage: its own g (box_head) and class-agnostic box predictor (Cascade R-CNN, detectron2)."""

    def __init__(self, cfg: DetectorConfig):
        super().__init__()
        self.box_head = roi_head.BoxHead(cfg.fpn_channels, kind=cfg.head, conv_dim=cfg.fpn_channels, norm=cfg.head_norm)
        self.box_predictor = dh.BoxPredictor(self.box_head.out_channels, cfg.num_classes, cls_agnostic=True)


class Detector(nn.Module):
    """Faster / Mask / Cascade R-CNN with an FPN (P2-P6 for the RPN, P2-P5 for RoIs; level of a RoI by the FPN
    paper's rule, k0 = 4, canonical 224)."""

    def __init__(self, cfg: DetectorConfig, weights_path: str | None = None):
        super().__init__()
        self.cfg = cfg
        self.extractor = model_lib.FeatureExtractor(cfg.depth, cfg.fpn_norm, p6=True, weights_path=weights_path,
                                                    channels=cfg.fpn_channels)
        self.rpn = rpn.RPNHead(self.extractor.out_channels, num_anchors=len(cfg.anchor_ratios))
        if cfg.kind == "cascade":
            self.stages = nn.ModuleList(CascadeStage(cfg) for _ in cfg.cascade_ious)
        else:
            self.box_head = roi_head.BoxHead(cfg.fpn_channels, kind=cfg.head, conv_dim=cfg.fpn_channels,
                                             norm=cfg.head_norm)
            self.box_predictor = dh.BoxPredictor(self.box_head.out_channels, cfg.num_classes)
        if cfg.kind == "mask":
            self.mask_head = dh.MaskHead(cfg.fpn_channels, cfg.num_classes, conv_dim=cfg.mask_dim, norm=cfg.mask_norm)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(3, 1, 1), persistent=False)

    # ------------------------------------------------------------------ images
    def preprocess(self, images: list[torch.Tensor]):
        """list of (3, H_i, W_i) in [0, 1] -> x (B, 3, H, W) normalised, padded to size_divisible; sizes [(h_i, w_i)];
        scales [(sx_i, sy_i)] = resized / original."""
        cfg, out, sizes, scales = self.cfg, [], [], []
        for img in images:
            h, w = img.shape[-2:]
            short = cfg.min_size[int(torch.randint(len(cfg.min_size), ()))] if self.training else cfg.test_size
            s = min(short / min(h, w), cfg.max_size / max(h, w))
            nh, nw = max(1, round(h * s)), max(1, round(w * s))
            x = F.interpolate(img[None].float(), size=(nh, nw), mode="bilinear", align_corners=False)[0]
            out.append((x - self.pixel_mean) / self.pixel_std)  # (3, nh, nw)
            sizes.append((nh, nw))
            scales.append((nw / w, nh / h))
        d = cfg.size_divisible
        H = int(math.ceil(max(s[0] for s in sizes) / d) * d)
        W = int(math.ceil(max(s[1] for s in sizes) / d) * d)
        batch = out[0].new_zeros((len(out), 3, H, W))
        for i, x in enumerate(out):
            batch[i, :, : x.shape[1], : x.shape[2]] = x
        return batch, sizes, scales

    def anchors(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(rpn.cached_anchors(tuple(tuple(f.shape[-2:]) for f in feats), tuple(self.extractor.strides),
                                       tuple(self.cfg.anchor_sizes), tuple(self.cfg.anchor_ratios), feats[0].device))

    def proposals(self, logits, deltas, anchors, sizes) -> list[torch.Tensor]:
        """RPN proposals per image (B tensors (k_i, 4) in resized pixels; no gradient)."""
        cfg = self.cfg
        pre, post = ((cfg.rpn_pre_nms_train, cfg.rpn_post_nms_train) if self.training
                     else (cfg.rpn_pre_nms_test, cfg.rpn_post_nms_test))
        return [b for b, _ in rpn.generate_proposals(logits, deltas, anchors, list(sizes), pre, post, cfg.rpn_nms)]

    def pool(self, feats, boxes: list[torch.Tensor], size: int = 7) -> torch.Tensor:
        """RoIAlign of boxes (B tensors (K_i, 4)) on P2..P5, one FPN level per box -> (sum K_i, 256, size, size)."""
        return roi_head.multilevel_roi_align(feats[:4], boxes, self.extractor.strides[:4], size,
                                             self.cfg.sampling_ratio, mode="fpn")

    # ------------------------------------------------------------------ training
    def losses(self, images: list[torch.Tensor], targets: list[dict]) -> dict[str, torch.Tensor]:
        """images: B float (3, H, W) in [0, 1]; targets: B dicts boxes (M, 4) xyxy original pixels, labels (M,) in
        1..C, masks (M, H, W) uint8 (Mask R-CNN). Returns scalar losses; "loss" is their sum."""
        x, sizes, scales = self.preprocess(images)
        gt = [dh.scale_boxes(t["boxes"].to(x.device).float(), sx, sy) for t, (sx, sy) in zip(targets, scales)]
        gl = [t["labels"].to(x.device).long() for t in targets]
        feats = self.extractor(x)  # P2..P6
        logits, deltas = self.rpn(feats)  # (B, N), (B, N, 4)
        anchors = self.anchors(feats)
        M = max([len(g) for g in gt] + [0])
        boxes_pad, valid = x.new_zeros((len(gt), M, 4)), torch.zeros(len(gt), M, dtype=torch.bool, device=x.device)
        for i, g in enumerate(gt):
            boxes_pad[i, : len(g)] = g
            valid[i, : len(g)].fill_(True)  # fill_: no host scalar tensor (tests/sync_ops.py counts those)
        labels, target_deltas = rpn.rpn_targets(torch.cat(anchors), boxes_pad, valid, self.cfg.rpn_batch,
                                                self.cfg.rpn_positive_fraction)
        loss_rpn_cls, loss_rpn_box = rpn.rpn_loss(logits, deltas, labels, target_deltas,  # Eq. 1
                                                  beta=self.cfg.rpn_box_beta)
        losses = {"loss_rpn_cls": loss_rpn_cls, "loss_rpn_box": loss_rpn_box}
        props = self.proposals(logits.detach(), deltas.detach(), anchors, sizes)
        fg_iou = self.cfg.cascade_ious[0] if self.cfg.kind == "cascade" else self.cfg.fg_iou
        samples = [dh.sample_rois(p, g, lab, self.cfg.roi_batch, self.cfg.roi_positive_fraction, fg_iou)
                   for p, g, lab in zip(props, gt, gl)]
        if self.cfg.kind == "cascade":
            losses.update(self._cascade_losses(feats, samples, gt, gl, sizes))
        else:
            losses.update(self._box_losses(feats, samples, gt))
        if self.cfg.kind == "mask":
            losses["loss_mask"] = self._mask_loss(feats, samples, targets, scales)
        losses["loss"] = sum(losses.values())
        return losses

    def _box_losses(self, feats, samples, gt) -> dict:
        rois = [s["boxes"] for s in samples]
        logits, deltas = self.box_predictor(self.box_head(self.pool(feats, rois)))  # (S, C+1), (S, 4(C+1))
        labels = torch.cat([s["labels"] for s in samples])
        targets = torch.cat([dh.box_targets(s["boxes"], _matched(g, s["matched"], s["boxes"]), s["labels"])
                             for s, g in zip(samples, gt)])
        loss_cls, loss_box = dh.fast_rcnn_loss(logits, deltas, labels, targets, self.cfg.box_beta)
        return {"loss_cls": loss_cls, "loss_box": loss_box}

    def _cascade_losses(self, feats, samples, gt, gl, sizes) -> dict:
        """Stage 1 on the sampled RoIs (IoU 0.5); stage k > 1 on stage k-1's refined boxes (detached), relabelled
        at its own IoU, no resampling (Cascade R-CNN / detectron2). A refined box clipped to nothing counts in no
        later stage's loss; unlike detectron2, which drops it, it still goes through the later heads (a fixed shape,
        no host sync), so their BN statistics see it. Gradient into the features / stages."""
        cfg, out = self.cfg, {}
        boxes = [s["boxes"] for s in samples]
        labels, matched = [s["labels"] for s in samples], [s["matched"] for s in samples]
        for k, (stage, iou, w) in enumerate(zip(self.stages, cfg.cascade_ious, cfg.cascade_weights)):
            if k > 0:
                lm = [dh.label_rois(b, g, lab, iou) for b, g, lab in zip(boxes, gt, gl)]
                labels, matched = [a for a, _ in lm], [m for _, m in lm]
            pooled = dh.scale_grad(self.pool(feats, boxes), 1.0 / len(self.stages))
            logits, deltas = stage.box_predictor(stage.box_head(pooled))  # (S, C+1), (S, 4)
            targets = torch.cat([dh.box_targets(b, _matched(g, m, b), lab, w)
                                 for b, g, m, lab in zip(boxes, gt, matched, labels)])
            rois = torch.cat(boxes)  # (S, 4)
            # stages 2-3: boxes clipped to nothing do not count (detectron2 drops them from the stage's input)
            keep = dh.nonempty(rois) if k > 0 else None
            lc, lb = dh.fast_rcnn_loss(logits, deltas, torch.cat(labels), targets, cfg.box_beta, keep)
            out[f"loss_cls_s{k + 1}"], out[f"loss_box_s{k + 1}"] = lc, lb
            refined = rpn.decode_boxes(deltas.detach().float(), rois, w)  # (S, 4)
            boxes = [dh.clip_boxes(r, s) for r, s in zip(refined.split([len(b) for b in boxes]), sizes)]
        return out

    def _mask_loss(self, feats, samples, targets, scales) -> torch.Tensor:
        fg = [s["labels"] > 0 for s in samples]
        rois = [s["boxes"][f] for s, f in zip(samples, fg)]
        # the head runs also without a foreground RoI (an empty batch): under SyncBN every process joins its syncs
        logits = self.mask_head(self.pool(feats, rois, size=14))  # (P, C+1, 28, 28)
        if len(logits) == 0:  # zero loss whose graph still reaches every mask-head parameter (DDP)
            return logits.sum() * 0.0
        labels = torch.cat([s["labels"][f] for s, f in zip(samples, fg)])
        mt = [dh.mask_targets(t["masks"].to(r.device), s["matched"][f], dh.scale_boxes(r, sx, sy, divide=True))
              for t, s, f, r, (sx, sy) in zip(targets, samples, fg, rois, scales)]  # gt masks: original pixels
        return dh.mask_loss(logits, labels, torch.cat(mt))

    # ------------------------------------------------------------------ inference
    def forward(self, images: list[torch.Tensor]) -> list[dict]:
        """Detections for B float (3, H, W) images in [0, 1], in their original pixels (torchvision's convention)."""
        orig = [tuple(img.shape[-2:]) for img in images]
        x, sizes, scales = self.preprocess(images)
        feats = self.extractor(x)
        logits, deltas = self.rpn(feats)
        props = self.proposals(logits, deltas, self.anchors(feats), sizes)
        if self.cfg.kind == "cascade":
            boxes, scores = self._cascade_predict(feats, props, sizes)
        else:
            boxes, scores = self._box_predict(feats, props)
        outputs, per_image = [], [len(p) for p in props]
        for b, s, size in zip(boxes.split(per_image), scores.split(per_image), sizes):
            db, ds, dl = dh.postprocess(b, s, size, self.cfg.score_thresh, self.cfg.nms_thresh, self.cfg.max_dets)
            outputs.append({"boxes": db, "scores": ds, "labels": dl})
        if self.cfg.kind == "mask":
            self._predict_masks(feats, outputs, scales, orig)
        for o, (sx, sy), (H, W) in zip(outputs, scales, orig):
            o["boxes"] = dh.clip_boxes(dh.scale_boxes(o["boxes"], sx, sy, divide=True), (H, W))
        return outputs

    def _box_predict(self, feats, props):
        """-> boxes (N, C, 4) per foreground class, scores (N, C) softmax."""
        logits, deltas = self.box_predictor(self.box_head(self.pool(feats, props)))
        rois = torch.cat(props)  # (N, 4)
        deltas = deltas.float().view(len(rois), self.cfg.num_classes + 1, 4)  # (N, C+1, 4)
        boxes = rpn.decode_boxes(deltas, rois[:, None], dh.BOX_WEIGHTS)  # (N, C+1, 4)
        return boxes[:, 1:], F.softmax(logits.float(), dim=1)[:, 1:]

    def _cascade_predict(self, feats, props, sizes):
        """Scores averaged over the stages, each on its own input boxes; boxes from the last stage's regression."""
        boxes, all_scores = props, []
        for k, (stage, w) in enumerate(zip(self.stages, self.cfg.cascade_weights)):
            logits, deltas = stage.box_predictor(stage.box_head(self.pool(feats, boxes)))
            all_scores.append(F.softmax(logits.float(), dim=1))
            refined = rpn.decode_boxes(deltas.float(), torch.cat(boxes), w)  # (N, 4)
            boxes = [dh.clip_boxes(b, s) for b, s in zip(refined.split([len(b) for b in boxes]), sizes)]
        scores = torch.stack(all_scores).mean(dim=0)[:, 1:]  # (N, C)
        return torch.cat(boxes)[:, None].expand(-1, self.cfg.num_classes, -1), scores

    def _predict_masks(self, feats, outputs, scales, orig) -> None:
        boxes = [o["boxes"] for o in outputs]  # resized pixels
        if sum(len(b) for b in boxes) == 0:
            for o, (H, W) in zip(outputs, orig):
                o["masks"] = feats[0].new_zeros((0, 1, H, W), dtype=torch.float32)
            return
        logits = self.mask_head(self.pool(feats, boxes, size=14))  # (n, C+1, 28, 28)
        labels = torch.cat([o["labels"] for o in outputs])
        probs = torch.sigmoid(logits[torch.arange(len(labels), device=labels.device), labels].float())
        for o, p, (sx, sy), (H, W) in zip(outputs, probs.split([len(b) for b in boxes]), scales, orig):
            o["masks"] = dh.paste_masks(p, dh.scale_boxes(o["boxes"], sx, sy, divide=True), H, W)


def _matched(gt: torch.Tensor, matched: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
    """Each RoI's matched gt box (N, 4); the RoI itself when the image has no gt (all background then)."""
    return gt[matched] if len(gt) else rois


def _targets_for(key: str, detector: Detector) -> list[str]:
    """Where a pretrained.pth key goes in the detector (several places for a cascade's per-stage heads)."""
    if key.startswith(("backbone.", "fpn.")):
        return ["extractor." + key]
    if key.startswith("rpn."):
        return [key]
    if key.startswith("box_head."):
        if detector.cfg.kind == "cascade":  # every stage starts from the pre-trained g
            return [f"stages.{i}.{key}" for i in range(len(detector.stages))]
        return [key]
    return []


def load_pretrained(detector: Detector, path, verbose: bool = True) -> dict:
    """Load an ADePT pretrained.pth ({"state_dict": {backbone.*, fpn.*, rpn.*, box_head.*}, "meta"}) into the
    detector; everything else keeps its fresh initialisation. Prints and returns the report.

    ValueError naming the file unless it covers the whole backbone and FPN with matching shapes (another ResNet
    depth, FPN norm or a non-ADePT file fail); a box head of another kind (4conv1fc vs 2fc) or another RPN anchor
    count is reported and left fresh.
    """
    ck = model_lib.load_weights(path, "pretrained weights file")  # ValueError naming the file if unreadable
    state, meta = (ck["state_dict"], ck.get("meta", {})) if "state_dict" in ck else (ck, {})
    own = detector.state_dict()
    new, loaded, unused, mismatched = {}, [], [], []
    file_head = "4conv1fc" if any(k.startswith("box_head.convs.") for k in state) else "2fc"
    for k, v in state.items():
        if k.startswith("box_head.") and file_head != detector.cfg.head:  # same FC shape, other meaning: skip
            mismatched.append(f"{k}: a {file_head} head in the file, {detector.cfg.head} in the model")
            continue
        dests = [d for d in _targets_for(k, detector) if d in own]
        if not dests:
            unused.append(k)
        for d in dests:
            if own[d].shape == v.shape:
                new[d] = v
                loaded.append(d)
            else:
                mismatched.append(f"{k}: file {tuple(v.shape)} vs model {tuple(own[d].shape)}")
    bad_core = [m for m in mismatched if m.startswith(("backbone.", "fpn."))]
    bad_core += [f"{k}: not in the file" for k in own if k.startswith(("extractor.backbone.", "extractor.fpn."))
                 and k not in new] + [f"{k}: not in the model" for k in unused if k.startswith(("backbone.", "fpn."))]
    if bad_core:
        raise ValueError(f"{path}: not pretrained weights for this extractor (ResNet-{detector.cfg.depth}, FPN d "
                         f"{detector.cfg.fpn_channels} "
                         f"{detector.cfg.fpn_norm}; file meta {meta}): {bad_core[:3]}")
    detector.load_state_dict(new, strict=False)
    fresh = [k for k in own if k not in new]
    report = {"loaded": loaded, "fresh": fresh, "unused": unused, "mismatched": mismatched, "meta": meta}
    if verbose:
        print(format_report(report, path), flush=True)
    return report


def _groups(keys) -> str:
    counts: dict[str, int] = {}
    for k in keys:
        parts = k.split(".")
        g = ".".join(parts[:3] if parts[0] == "stages" else parts[:2] if parts[0] == "extractor" else parts[:1])
        counts[g] = counts.get(g, 0) + 1
    return ", ".join(f"{g} ({n})" for g, n in counts.items()) or "none"


def format_report(report: dict, path) -> str:
    lines = [f"init from {path} (meta {report['meta']})",
             f"  loaded: {_groups(report['loaded'])}",
             f"  fresh:  {_groups(report['fresh'])}  [P6 = max-pool of P5: no parameters]"]
    if report["mismatched"]:
        lines.append(f"  shape mismatch, left fresh: {report['mismatched'][:4]}")
    if report["unused"]:
        lines.append(f"  in the file, not used: {_groups(report['unused'])}")
    return "\n".join(lines)
