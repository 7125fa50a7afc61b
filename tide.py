"""TIDE error breakdown of a detector's predictions (paper 4.5.1, Table 3, Figure 1), in numpy.

Section 4.5.1 stratifies the fine-tuned detectors' errors with TIDE (Bolya et al., ECCV 2020, paper ref. [16]):
each error type is the AP50 gained when an oracle fixes every error of that type (dAP), the other errors left as
they are. This file is our own implementation of the definitions in the TIDE paper, checked against the public
tidecv code for the details the paper leaves open (error order, thresholds, AP integration, oracle fixes).

Symbols
-------
=============  =================================================================================================
t_f            foreground IoU threshold (fg_iou = 0.5): a detection is a true positive at IoU >= t_f
t_b            background IoU threshold (bg_iou = 0.1)
IoU            box IoU on COCO [x, y, w, h] boxes, or mask IoU on RLEs (pycocotools.mask.iou)
D, G           detections / non-crowd ground truths of one image (detections sorted by score, at most 100)
AP50           TIDE's own AP: per class, 101-point COCO-style interpolation at t_f, averaged over the classes
               that have a ground truth or a prediction; dAPs are measured on it
dAP_e          AP50(all errors of type e fixed by the oracle) - AP50, clamped at 0 as TIDE does
=============  =================================================================================================

Error of a false-positive detection d (tested in this order, as tidecv does; IoU_c = IoU with gts of d's class):
    Loc   t_b <= max IoU_c <= t_f                   (oracle: d becomes a TP of its class, see "target" below)
    Cls   max IoU with a gt of another class >= t_f (oracle: d becomes a TP of that gt's class)
    Dupe  max IoU_c over gts already matched >= t_f (oracle: d is removed)
    Bkg   max IoU with every gt <= t_b              (oracle: d is removed)
    Both  anything else (right class badly placed is Loc; so: wrong class and t_b < IoU < t_f) (oracle: removed)
    Miss  a gt that no detection matched and that no Loc/Cls error targets (oracle: the gt is removed)
A Loc/Cls error "targets" its argmax gt when that gt is unmatched; of several errors targeting one gt only the
highest-scoring becomes a TP, the others are removed (one fix per gt). FalsePos: every TP scored 1 and every FP 0
(perfect precision at the same recall). FalseNeg: every unmatched gt removed (perfect recall). These two are not
clamped at 0.

Checked once (not a test: tidecv is no dependency): on 40 random box sets with crowds and 8 mask sets every
number equals tidecv 1.0.1's with its crowd rule set to the current repository's (below). Bounds are inclusive
as in tidecv's code (t_b <= IoU <= t_f for Loc, IoU <= t_b for Bkg).
Simplifications (documented, not flags): detections with equal scores keep their input order (image, then rank);
tidecv orders ties by an internal id. Crowd gts (iscrowd=1) are ignore regions: an unmatched detection of the same
class whose crowd IoU exceeds t_f is dropped from AP and errors, as in tidecv's current code (the 1.0.1 release on
PyPI still classified such detections as errors). With no predictions every dAP is 0 (tidecv divides by zero).

Public
------
- ``tide_errors(coco_gt, results, iou_type="bbox", fg_iou=0.5, bg_iou=0.1, max_dets=100) -> dict``
  AP50, Cls, Loc, Both, Dupe, Bkg, Miss, FalsePos, FalseNeg (percent) and counts (number of errors of each type).
- ``ap101(scores, tps, n_gt) -> float`` TIDE's per-class AP in percent.
eval.py validates the inputs (known image and category ids, finite scores) and exposes ``eval.tide``;
figures.py draws the Figure 1 bar chart (``plot_tide``).

Project-local dependencies: none (numpy, pycocotools only): the file can be copied alone.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
from pycocotools import mask as mask_utils

MAIN_ERRORS = ("Cls", "Loc", "Both", "Dupe", "Bkg", "Miss")
SPECIAL_ERRORS = ("FalsePos", "FalseNeg")
TP = "TP"  # error code of a true positive
RECALL_STEPS = 100  # COCO's 101-point recall grid 0, 0.01, ..., 1


def ap101(scores, tps, n_gt: int) -> float:
    """TIDE / COCO 101-point AP of one class in percent. scores (P,), tps (P,) bool, n_gt positives.

    Precision is made non-increasing from the right; at each recall r in {0, 0.01, ..., 1} it takes the precision
    of the first detection whose recall is >= r (0 past the last one). n_gt = 0 gives 0, as in tidecv.
    """
    if n_gt <= 0:
        return 0.0
    scores = np.asarray(scores, dtype=np.float64)  # (P,)
    tps = np.asarray(tps, dtype=bool)[np.argsort(-scores, kind="stable")]  # (P,) in score order
    if len(tps) == 0:
        return 0.0
    ctp = np.cumsum(tps)
    precision = ctp / np.arange(1, len(tps) + 1)  # (P,)
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    recall = ctp / n_gt  # (P,)
    grid = np.arange(RECALL_STEPS + 1) / RECALL_STEPS  # (101,)
    idx = np.searchsorted(recall, grid, side="left")
    y = np.where(idx < len(precision), precision[np.minimum(idx, len(precision) - 1)], 0.0)
    return float(y.mean() * 100)


def _mean_ap(cls, score, tp, n_gt: dict) -> float:
    """mAP over the classes that have a gt or a detection. cls, score, tp (P,); n_gt {class: count}."""
    classes = {c for c, n in n_gt.items() if n > 0} | set(np.unique(cls).tolist())
    if not classes:
        return 0.0
    return float(np.mean([ap101(score[cls == c], tp[cls == c], n_gt.get(c, 0)) for c in sorted(classes)]))


def _iou(dets, gts, crowd: bool):
    """pycocotools IoU (D, G) of boxes [x,y,w,h] or RLEs; crowd gts use intersection / detection area."""
    if len(dets) == 0 or len(gts) == 0:
        return np.zeros((len(dets), len(gts)))
    return np.asarray(mask_utils.iou(dets, gts, [int(crowd)] * len(gts)), dtype=np.float64).reshape(len(dets), -1)


def _match(iou, d_cls, g_cls, fg_iou):
    """TIDE's greedy matching: each detection, in score order, takes its best unmatched same-class gt at IoU >= t_f.

    iou (D, G); d_cls (D,); g_cls (G,) -> matched (D,) gt index or -1, used (G,) bool.
    """
    buf = iou * (d_cls[:, None] == g_cls[None, :])  # (D, G) same-class IoU
    matched, used = np.full(len(d_cls), -1), np.zeros(len(g_cls), dtype=bool)
    for i in range(len(d_cls)):
        if buf.shape[1] == 0:
            break
        j = int(np.argmax(buf[i]))
        if buf[i, j] >= fg_iou:
            matched[i], used[j] = j, True
            buf[:, j] = 0
    return matched, used


def _classify(i, iou, same, used, fg_iou, bg_iou):
    """Error type of unmatched detection i and the gt it targets (Loc/Cls) or -1. Order as in tidecv."""
    if iou.shape[1] == 0:
        return "Bkg", -1
    iou_cls = iou[i] * same[i]  # (G,)
    j = int(np.argmax(iou_cls))
    if bg_iou <= iou_cls[j] <= fg_iou:
        return "Loc", j
    iou_other = iou[i] * ~same[i]
    j = int(np.argmax(iou_other))
    if iou_other[j] >= fg_iou:
        return "Cls", j
    if np.max(iou_cls * used) >= fg_iou:
        return "Dupe", -1
    if np.max(iou[i]) <= bg_iou:
        return "Bkg", -1
    return "Both", -1


def _image(dets, gts, crowds, geom, fg_iou, bg_iou, max_dets):
    """Analyse one image. dets / gts / crowds: lists of dicts with category_id, score (dets), and geom key.

    Returns detections [(class, score, error, fixed_class)] with error in {TP, Cls, Loc, ...} and fixed_class the
    class after a Loc/Cls fix (None: removed), and gts [(class, used, usable)].
    """
    dets = sorted(dets, key=lambda d: -d["score"])[:max_dets]
    d_cls = np.array([d["category_id"] for d in dets], dtype=np.int64)  # (D,)
    g_cls = np.array([g["category_id"] for g in gts], dtype=np.int64)  # (G,)
    iou = _iou([d[geom] for d in dets], [g[geom] for g in gts], crowd=False)  # (D, G)
    matched, used = _match(iou, d_cls, g_cls, fg_iou)
    crowd_iou = _iou([d[geom] for d in dets], [c[geom] for c in crowds], crowd=True)  # (D, C)
    crowd_same = d_cls[:, None] == np.array([c["category_id"] for c in crowds], dtype=np.int64)[None, :]
    same = d_cls[:, None] == g_cls[None, :]  # (D, G)
    usable, best = np.zeros(len(gts), dtype=bool), np.full(len(gts), -1)
    out = []
    for i, d in enumerate(dets):
        if matched[i] >= 0:
            out.append([int(d_cls[i]), float(d["score"]), TP, None])
            continue
        if np.any((crowd_iou[i] > fg_iou) & crowd_same[i]):
            continue  # inside a crowd region of its class: ignored
        err, j = _classify(i, iou, same, used, fg_iou, bg_iou)
        out.append([int(d_cls[i]), float(d["score"]), err, None])
        if j >= 0 and not used[j]:
            usable[j] = True
            if best[j] < 0:  # detections come in score order: the first is the highest-scoring
                best[j] = len(out) - 1
                out[-1][3] = int(g_cls[j]) if err == "Cls" else int(d_cls[i])
    return out, list(zip(g_cls.tolist(), used.tolist(), usable.tolist()))


def tide_errors(coco_gt, results, iou_type="bbox", fg_iou=0.5, bg_iou=0.1, max_dets=100) -> dict:
    """TIDE dAPs (percent) of validated COCO results against a pycocotools COCO ground truth.

    coco_gt: pycocotools.coco.COCO; results: list of dicts (image_id, category_id, score, bbox [x,y,w,h] and/or
    segmentation RLE). iou_type "bbox" or "segm". Returns AP50, the six main dAPs, FalsePos, FalseNeg and counts.
    """
    geom = {"bbox": "bbox", "segm": "segmentation"}[iou_type]
    by_image = defaultdict(list)
    for r in results:
        by_image[r["image_id"]].append(r)
    dets, gts = [], []
    for img in coco_gt.getImgIds():
        anns = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[img]))
        if geom == "segmentation":
            anns = [dict(a, segmentation=coco_gt.annToRLE(a)) for a in anns]
        d, g = _image(by_image.get(img, []), [a for a in anns if not a.get("iscrowd", 0)],
                      [a for a in anns if a.get("iscrowd", 0)], geom, fg_iou, bg_iou, max_dets)
        dets += d
        gts += g
    return _fix_all(dets, gts)


def _fix_all(dets, gts) -> dict:
    """AP50 and each oracle's dAP from the per-detection and per-gt records of _image."""
    cls = np.array([d[0] for d in dets], dtype=np.int64)  # (P,)
    score = np.array([d[1] for d in dets], dtype=np.float64)  # (P,)
    err = np.array([d[2] for d in dets], dtype=object)  # (P,)
    fixed = np.array([-1 if d[3] is None else d[3] for d in dets], dtype=np.int64)  # (P,) class after a fix
    tp = err == TP
    g_cls = np.array([g[0] for g in gts], dtype=np.int64)  # (G,)
    g_used = np.array([g[1] for g in gts], dtype=bool)
    g_miss = ~g_used & ~np.array([g[2] for g in gts], dtype=bool)
    n_gt = {int(c): int(n) for c, n in zip(*np.unique(g_cls, return_counts=True))}
    base = _mean_ap(cls, score, tp, n_gt)
    out = {"AP50": base}
    for e in MAIN_ERRORS:
        c, s, t, n = cls, score, tp, n_gt
        if e == "Miss":
            n = {k: v - int(np.sum(g_miss & (g_cls == k))) for k, v in n_gt.items()}
        elif e in ("Cls", "Loc"):
            keep = (err != e) | (fixed >= 0)
            c = np.where(err == e, fixed, cls)[keep]
            s, t = score[keep], (tp | (err == e))[keep]
        else:
            keep = err != e
            c, s, t = cls[keep], score[keep], tp[keep]
        out[e] = max(_mean_ap(c, s, t, n) - base, 0.0) if len(dets) else 0.0
    fn = {k: v - int(np.sum(~g_used & (g_cls == k))) for k, v in n_gt.items()}
    out["FalsePos"] = _mean_ap(cls, tp.astype(np.float64), tp, n_gt) - base if len(dets) else 0.0
    out["FalseNeg"] = _mean_ap(cls, score, tp, fn) - base if len(dets) else 0.0
    counts = {e: int(np.sum(err == e)) for e in MAIN_ERRORS if e != "Miss"}
    out["counts"] = dict(counts, Miss=int(g_miss.sum()), TP=int(tp.sum()))
    return out
