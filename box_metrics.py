"""VOC mAP50 (paper 4.4, Table 2) and class-agnostic proposal recall (3.2, 4.1.3), in numpy.

eval.py checks its inputs and re-exports these; this file needs only numpy (and a pycocotools COCO for voc_map50's
ground truth), so it can be copied alone. Project-local dependencies: none.

Symbols
    mAP50      VOC AP at IoU > 0.5: area under the interpolated PR curve (VOC2010+), or the 11-point VOC07 mean
    AR@k       recall averaged over IoU 0.50:0.05:0.95 with the top k proposals per image, class-agnostic

Public
    voc_ap(recall, precision, use_07_metric=False) -> float in [0, 1]
    voc_map50(coco, res, class_ids=None, novel_ids=None, use_07_metric=False, iou_thresh=0.5, plus_one=False) -> dict
    proposal_recall(gt_boxes, proposals, max_dets=(10, 100, 1000), iou_thresholds=COCO_IOUS) -> dict
    box_iou(a, b, plus_one=0.0) -> (N, M) IoU of xyxy boxes; xywh_to_xyxy(bbox) for a COCO [x, y, w, h] list
"""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

COCO_IOUS = np.linspace(0.5, 0.95, 10)  # IoU 0.50:0.05:0.95, built as COCOeval builds it
VOC07_RECALLS = np.arange(0.0, 1.1, 0.1)  # the 11 recall points 0, 0.1, ..., 1, built as the VOC devkit builds them


# ---------------- VOC mAP50 (Table 2) -----------------------------------------------------------------------------
def voc_ap(recall, precision, use_07_metric=False) -> float:
    """AP in [0, 1] of one PR curve (recall, precision: (P,) in detection order).

    VOC2010+: area under the curve whose precision is made non-increasing (max precision at recall >= r).
    VOC07: mean over r in {0, 0.1, ..., 1} of the max precision at recall >= r (0 if none).
    """
    recall, precision = np.asarray(recall, dtype=np.float64), np.asarray(precision, dtype=np.float64)
    if use_07_metric:
        pts = [precision[recall >= t].max() if np.any(recall >= t) else 0.0 for t in VOC07_RECALLS]
        return float(np.mean(pts))
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[0.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]  # envelope
    step = np.nonzero(r[1:] != r[:-1])[0]  # where recall changes
    return float(np.sum((r[step + 1] - r[step]) * p[step + 1]))


def box_iou(a, b, plus_one=0.0):
    """IoU (N, M) of xyxy boxes a (N, 4), b (M, 4); plus_one=1 uses VOC's inclusive pixel widths."""
    lo = np.maximum(a[:, None, :2], b[None, :, :2])  # (N, M, 2) top-left of the intersection
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])  # (N, M, 2) bottom-right
    inter = np.prod(np.clip(hi - lo + plus_one, 0, None), axis=-1)  # (N, M)
    area_a = np.prod(a[:, 2:] - a[:, :2] + plus_one, axis=-1)  # (N,)
    area_b = np.prod(b[:, 2:] - b[:, :2] + plus_one, axis=-1)  # (M,)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def xywh_to_xyxy(bbox):
    """COCO [x, y, w, h] -> [x1, y1, x2, y2]."""
    return [bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3]]


def _voc_class_ap(gts: dict, dets: list, iou_thresh, use_07_metric, plus_one) -> float:
    """VOC AP (fraction) of one class. gts {image: (boxes (M, 4) xyxy, difficult (M,) bool)}; dets [(image,
    score, box xyxy)]. A detection on a difficult (crowd) gt counts neither way; NaN without positives."""
    npos = sum(int((~d).sum()) for _, d in gts.values())
    if npos == 0:
        return float("nan")
    taken = {img: np.zeros(len(b), dtype=bool) for img, (b, _) in gts.items()}
    flags = []  # True = TP, False = FP, in score order
    for img, _, box in sorted(dets, key=lambda d: -d[1]):
        boxes, difficult = gts.get(img, (np.zeros((0, 4)), np.zeros(0, dtype=bool)))
        ov = box_iou(np.asarray([box], dtype=np.float64), boxes, plus_one)[0] if len(boxes) else np.zeros(0)
        j = int(np.argmax(ov)) if len(ov) else -1
        if j >= 0 and ov[j] > iou_thresh:  # VOC: strictly above 0.5
            if difficult[j]:
                continue
            flags.append(not taken[img][j])
            taken[img][j] = True
        else:
            flags.append(False)
    tp = np.cumsum(flags) if flags else np.zeros(0)
    fp = np.cumsum(np.logical_not(flags)) if flags else np.zeros(0)
    return voc_ap(tp / npos, tp / np.maximum(tp + fp, 1e-12), use_07_metric)


def voc_map50(coco, res, class_ids=None, novel_ids=None, use_07_metric=False, iou_thresh=0.5,
              plus_one=False) -> dict:
    """PASCAL VOC mAP50 in percent: {"per_class": {id: AP}, "mAP": all, "nAP": novel, "bAP": base}.

    coco: a pycocotools COCO of the ground truth; res: checked COCO result dicts (eval.voc_map50 checks them).

    class_ids: classes to evaluate (default: all the gt's); novel_ids: the few-shot novel classes (nAP/bAP are NaN
    without them). Classes without positives are NaN and left out of the means. iscrowd gts act as "difficult".
    """
    # plus_one=False (continuous pixels) on voc_data.voc_to_coco's boxes (x1 - 1, y1 - 1, as detectron2 loads VOC)
    # gives the IoU of detectron2's VOC evaluator behind TFA's numbers, which adds 1 back to x1, y1 and uses the
    # devkit's +1 widths (tests/test_eval.py). plus_one=True: the devkit's rule, for boxes kept in VOC's 1-based pixels.
    class_ids = list(class_ids) if class_ids is not None else coco.getCatIds()
    gts = defaultdict(dict)
    for img in coco.getImgIds():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img]))
        for c in class_ids:
            a = [x for x in anns if x["category_id"] == c]
            if a:
                gts[c][img] = (np.array([xywh_to_xyxy(x["bbox"]) for x in a], dtype=np.float64).reshape(-1, 4),
                               np.array([bool(x.get("iscrowd", 0) or x.get("difficult", 0)) for x in a]))
    dets = defaultdict(list)
    for i, r in enumerate(res):
        if "bbox" not in r:
            raise ValueError(f"voc_map50: result {i} (image_id={r['image_id']!r}) has no bbox")
        dets[r["category_id"]].append((r["image_id"], r["score"], xywh_to_xyxy(r["bbox"])))
    per = {c: 100 * _voc_class_ap(gts[c], dets[c], iou_thresh, use_07_metric, float(plus_one)) for c in class_ids}
    novel = [c for c in class_ids if novel_ids is not None and c in set(novel_ids)]
    base = [c for c in class_ids if c not in novel]
    split = novel_ids is not None
    return {"per_class": per, "mAP": _nanmean(per, class_ids), "nAP": _nanmean(per, novel) if split else math.nan,
            "bAP": _nanmean(per, base) if split else math.nan}


def _nanmean(per: dict, ids) -> float:
    """Mean of per[c] over ids, NaNs left out; NaN when none is finite."""
    vals = [per[c] for c in ids if math.isfinite(per[c])]
    return float(np.mean(vals)) if vals else math.nan


# ---------------- Proposal recall (3.2, 4.1.3) --------------------------------------------------------------------
def proposal_recall(gt_boxes, proposals, max_dets=(10, 100, 1000), iou_thresholds=COCO_IOUS) -> dict:
    """Class-agnostic AR@k in percent: recall of the gts by the top k proposals, averaged over IoU thresholds.

    gt_boxes, proposals: per image (M_i, 4) / (N_i, 4) xyxy, proposals in rank order (best first). Matching as
    COCOeval's: each proposal in rank order takes the unmatched gt of highest IoU >= t (each gt matched once).
    Selective-search boxes carry no rank (selective_search.py sorts them by coordinates): for them only a k at
    least their count is meaningful; RPN proposals come ranked by objectness.
    """
    ks = sorted(int(k) for k in max_dets)
    thr = np.minimum(np.asarray(iou_thresholds, dtype=np.float64), 1 - 1e-10)  # (T,) COCOeval's cap
    hits, total = np.zeros((len(ks), len(thr))), 0
    for g, p in zip(gt_boxes, proposals):
        g = np.asarray(g, dtype=np.float64).reshape(-1, 4)  # (M, 4)
        p = np.asarray(p, dtype=np.float64).reshape(-1, 4)[: ks[-1]]  # (N, 4)
        total += len(g)
        iou = box_iou(p, g) if len(g) and len(p) else np.zeros((len(p), len(g)))  # (N, M)
        taken = np.zeros((len(thr), len(g)), dtype=bool)  # (T, M)
        counts = np.zeros((len(p) + 1, len(thr)))  # matched gts after the first i proposals
        for i in range(len(p)):
            cand = np.where(~taken & (iou[i][None, :] >= thr[:, None]), iou[i][None, :], -1.0)  # (T, M)
            j = np.argmax(cand, axis=1) if len(g) else np.zeros(len(thr), dtype=int)
            ok = cand[np.arange(len(thr)), j] >= 0 if len(g) else np.zeros(len(thr), dtype=bool)
            taken[np.nonzero(ok)[0], j[ok]] = True
            counts[i + 1] = taken.sum(1)
        for a, k in enumerate(ks):
            hits[a] += counts[min(k, len(p))]
    return {f"AR@{k}": float(100 * np.mean(hits[a] / max(total, 1))) for a, k in enumerate(ks)}
