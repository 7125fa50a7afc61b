"""Tests for eval.py, coco_files.py, predict.py, tide.py and figures.py (paper 4.3-4.5): COCO AP, VOC mAP50, TIDE,
AR, figures, prediction, results and ground-truth files, bad input, CLI."""
import contextlib
import io
import json
import math
import os
import sys

import cv2
import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import coco_files  # noqa: E402
import eval as ev  # noqa: E402
import figures  # noqa: E402
import predict as pr  # noqa: E402
import tide as tide_mod  # noqa: E402

W = H = 200  # image size of the hand-made ground truths
CATS = ({"id": 1, "name": "square"}, {"id": 3, "name": "disc"})  # non-contiguous ids on purpose


def make_gt(boxes_per_image, crowd=()):
    """COCO dict; boxes_per_image: {image_id: [(category_id, [x, y, w, h]), ...]}; crowd: (image, cat, box)."""
    images, anns = [], []
    for img, boxes in boxes_per_image.items():
        images.append({"id": img, "width": W, "height": H, "file_name": f"{img}.png"})
        for c, b in boxes:
            anns.append({"category_id": c, "image_id": img, "bbox": list(b), "iscrowd": 0})
    for img, c, b in crowd:
        anns.append({"category_id": c, "image_id": img, "bbox": list(b), "iscrowd": 1})
    for k, a in enumerate(anns):
        x, y, w, h = a["bbox"]
        a.update(id=k + 1, area=w * h, segmentation=[[x, y, x + w, y, x + w, y + h, x, y + h]])
    return {"images": images, "annotations": anns, "categories": list(CATS)}


def write_gt(tmp_path, gt, name="gt.json"):
    path = tmp_path / name
    path.write_text(json.dumps(gt))
    return path


def det(img, c, b, s):
    return {"image_id": img, "category_id": c, "bbox": list(b), "score": s}


BOX_A, BOX_B = [10, 10, 60, 60], [100, 100, 80, 50]  # two large objects
GT2 = {1: [(1, BOX_A), (3, BOX_B)]}  # one square, one disc on image 1


def perfect(gt):
    return [det(a["image_id"], a["category_id"], a["bbox"], 0.9) for a in gt["annotations"] if not a["iscrowd"]]


def shifted(b, frac):
    """The box moved right by frac of its width."""
    return [b[0] + frac * b[2], b[1], b[2], b[3]]


# ---------------------------------------------------------------- COCO AP
def test_coco_ap_perfect_none_and_hand_computed(tmp_path):
    gt = make_gt({1: [(1, BOX_A), (1, BOX_B)], 2: [(3, BOX_A)]})
    path = write_gt(tmp_path, gt)
    m = ev.coco_eval(path, perfect(gt))
    assert m["AP"] == pytest.approx(100) and m["AP50"] == pytest.approx(100) and m["APm"] == pytest.approx(100)
    assert math.isnan(m["APs"]) and math.isnan(m["APl"])  # every object is medium (32^2 .. 96^2 px)
    with pytest.warns(UserWarning, match="no predictions"):
        empty = ev.coco_eval(path, [])  # 0 where there are objects, NaN (as COCOeval's -1) where there are none
    assert [empty[k] for k in ("AP", "AP50", "AP75", "APm")] == [0, 0, 0, 0]
    assert math.isnan(empty["APs"]) and math.isnan(empty["APl"])
    # class 1: TP (0.9), FP (0.8), TP (0.7) at every IoU -> 101-point AP = (51 * 1 + 50 * 2/3) / 101; class 3: 100
    res = [det(1, 1, BOX_A, 0.9), det(1, 1, [150, 10, 30, 30], 0.8), det(1, 1, BOX_B, 0.7), det(2, 3, BOX_A, 0.9)]
    m = ev.coco_eval(path, res)
    assert m["AP"] == pytest.approx(((51 + 50 * 2 / 3) / 101 * 100 + 100) / 2, abs=1e-6)
    coco = coco_files.load_coco(path)  # the same numbers as pycocotools run by hand
    with contextlib.redirect_stdout(io.StringIO()):
        E = COCOeval(coco, coco.loadRes([dict(r) for r in res]), "bbox")
        E.evaluate(), E.accumulate(), E.summarize()
    expected = [v * 100 if v >= 0 else math.nan for v in E.stats[:6]]  # COCOeval's -1: no gt of that size
    assert [m[k] for k in ev.COCO_KEYS] == pytest.approx(expected, nan_ok=True)


def test_coco_mask_ap_from_rle(tmp_path):
    gt = make_gt(GT2)
    path = write_gt(tmp_path, gt)
    coco = coco_files.load_coco(path)
    res = []
    for a in gt["annotations"]:
        rle = coco.annToRLE(a)
        res.append(dict(det(1, a["category_id"], [0, 0, 1, 1], 0.9),  # a wrong box: segm must ignore it
                        segmentation={"size": rle["size"], "counts": rle["counts"].decode()}))
    assert ev.coco_eval(path, res, "segm")["AP"] == pytest.approx(100)
    assert ev.coco_eval(path, res, "bbox")["AP"] == pytest.approx(0)
    # a medium-size false mask with a tiny box, ranked first: APm must see it (area from the mask, as detectron2)
    fp = mask_utils.encode(np.asfortranarray(np.pad(np.ones((50, 50), np.uint8), ((140, 10), (5, 145)))))
    res.append(dict(det(1, 1, [0, 0, 1, 1], 0.99), segmentation={"size": fp["size"], "counts": fp["counts"].decode()}))
    m = ev.coco_eval(path, res, "segm")
    assert m["APm"] == pytest.approx(m["AP"]) and m["APm"] < 100


# ---------------------------------------------------------------- VOC
def test_voc_ap_hand_computed_curve():
    # TP, FP, TP with 3 positives: recall 1/3, 1/3, 2/3; precision 1, 1/2, 2/3
    rec, prec = np.array([1, 1, 2]) / 3, np.array([1, 1 / 2, 2 / 3])
    assert ev.voc_ap(rec, prec) == pytest.approx(1 / 3 * 1 + 1 / 3 * 2 / 3)  # area under the envelope = 5/9
    assert ev.voc_ap(rec, prec, use_07_metric=True) == pytest.approx((4 * 1 + 3 * 2 / 3) / 11)  # 0, .1, .2, .3 -> 1
    assert ev.voc_ap([], []) == 0.0
    # TP, FP, FP, TP, TP with 4 positives: the envelope lifts the dip at recall 0.25 -> 0.5 to precision 0.6
    rec, prec = np.array([1, 1, 1, 2, 3]) / 4, np.array([1, 1 / 2, 1 / 3, 2 / 4, 3 / 5])
    assert ev.voc_ap(rec, prec) == pytest.approx(0.25 * 1 + 0.25 * 0.6 + 0.25 * 0.6)
    assert ev.voc_ap(rec, prec, use_07_metric=True) == pytest.approx((3 * 1 + 5 * 0.6) / 11)


def test_voc_map50_novel_base_all(tmp_path):
    boxes = [[10, 10, 30, 30], [60, 60, 30, 30], [120, 10, 30, 30]]
    gt = make_gt({1: [(1, b) for b in boxes] + [(3, BOX_B)]})
    path = write_gt(tmp_path, gt)
    res = [det(1, 1, boxes[0], 0.9), det(1, 1, [150, 150, 20, 20], 0.8), det(1, 1, shifted(boxes[1], 0.25), 0.7),
           det(1, 3, BOX_B, 0.95), det(1, 3, BOX_B, 0.5)]  # IoU 0.6 is a TP; the late duplicate costs nothing
    m = ev.voc_map50(path, res, novel_ids=[3])
    assert m["per_class"][1] == pytest.approx(500 / 9) and m["per_class"][3] == pytest.approx(100)
    assert m["nAP"] == pytest.approx(100) and m["bAP"] == pytest.approx(500 / 9)
    assert m["mAP"] == pytest.approx((500 / 9 + 100) / 2)
    assert m["per_class"][1] < ev.voc_map50(path, res[:1] + res[2:])["per_class"][1]  # the FP costs AP
    assert math.isnan(ev.voc_map50(path, res)["nAP"])
    crowd = write_gt(tmp_path, make_gt({1: [(1, boxes[0])]}, crowd=[(1, 1, [100, 100, 50, 50])]), "crowd.json")
    on_crowd = [det(1, 1, [100, 100, 50, 50], 0.95), det(1, 1, boxes[0], 0.9)]  # a "difficult" hit: ignored
    assert ev.voc_map50(crowd, on_crowd, class_ids=[1])["mAP"] == pytest.approx(100)
    m07 = ev.voc_map50(path, res, use_07_metric=True)
    assert m07["per_class"][1] == pytest.approx(600 / 11)


# ---------------------------------------------------------------- TIDE
def run_tide(tmp_path, gt, res):
    out = ev.tide(write_gt(tmp_path, gt), res)
    assert set(tide_mod.MAIN_ERRORS + tide_mod.SPECIAL_ERRORS) <= set(out)
    return out


def only(out, kind):
    """Assert the main error `kind` is the only one with dAP > 0; return its dAP."""
    for e in tide_mod.MAIN_ERRORS:
        if e != kind:
            assert out[e] == pytest.approx(0, abs=1e-9), (e, out)
    assert out[kind] > 1, out
    return out[kind]


def test_tide_perfect_is_all_zero(tmp_path):
    out = run_tide(tmp_path, make_gt(GT2), perfect(make_gt(GT2)))
    assert out["AP50"] == pytest.approx(100)
    assert all(out[e] == pytest.approx(0) for e in tide_mod.MAIN_ERRORS + tide_mod.SPECIAL_ERRORS)
    assert out["counts"]["TP"] == 2 and sum(v for k, v in out["counts"].items() if k != "TP") == 0


def test_tide_loc(tmp_path):
    res = [det(1, 1, BOX_A, 0.9), det(1, 3, shifted(BOX_B, 0.6), 0.8)]  # IoU 0.25 with its own gt
    out = run_tide(tmp_path, make_gt(GT2), res)
    assert out["AP50"] == pytest.approx(50)
    assert only(out, "Loc") == pytest.approx(50) and out["counts"]["Loc"] == 1


def test_tide_cls(tmp_path):
    res = [det(1, 1, BOX_A, 0.9), det(1, 1, BOX_B, 0.8)]  # the disc called a square
    out = run_tide(tmp_path, make_gt(GT2), res)
    assert only(out, "Cls") == pytest.approx(50) and out["counts"]["Cls"] == 1
    assert out["FalseNeg"] == pytest.approx(50)  # the disc class then has nothing left: it drops out of the mean


def test_tide_both(tmp_path):
    box_c = [10, 150, 40, 40]
    gt = make_gt({1: [(1, BOX_A), (1, box_c), (3, BOX_B)]})
    res = [det(1, 1, BOX_A, 0.9), det(1, 1, shifted(BOX_B, 0.6), 0.8), det(1, 3, BOX_B, 0.85), det(1, 1, box_c, 0.7)]
    out = run_tide(tmp_path, gt, res)  # the 0.8 square: IoU 0.25 with the disc only -> wrong class and misplaced
    assert out["AP50"] == pytest.approx(((51 + 50 * 2 / 3) / 101 * 100 + 100) / 2)
    assert only(out, "Both") == pytest.approx(100 - out["AP50"]) and out["counts"]["Both"] == 1


def test_tide_dupe(tmp_path):
    gt = make_gt({1: [(1, BOX_A), (1, BOX_B)]})
    res = [det(1, 1, BOX_A, 0.9), det(1, 1, shifted(BOX_A, 0.02), 0.8), det(1, 1, BOX_B, 0.7)]
    out = run_tide(tmp_path, gt, res)
    assert out["AP50"] == pytest.approx((51 + 50 * 2 / 3) / 101 * 100)
    assert only(out, "Dupe") == pytest.approx(100 - out["AP50"]) and out["counts"]["Dupe"] == 1
    assert out["FalsePos"] == pytest.approx(100 - out["AP50"]) and out["FalseNeg"] == pytest.approx(0)


def test_tide_bkg(tmp_path):
    gt = make_gt({1: [(1, BOX_A), (1, BOX_B)]})
    res = [det(1, 1, BOX_A, 0.9), det(1, 1, [150, 10, 30, 30], 0.8), det(1, 1, BOX_B, 0.7)]  # FP on empty ground
    out = run_tide(tmp_path, gt, res)
    assert only(out, "Bkg") == pytest.approx(100 - out["AP50"]) and out["counts"]["Bkg"] == 1


def test_tide_miss(tmp_path):
    gt = make_gt({1: [(1, BOX_A), (1, BOX_B)], 2: [(3, BOX_A)]})
    res = [det(1, 1, BOX_A, 0.9), det(2, 3, BOX_A, 0.9)]  # BOX_B never detected
    out = run_tide(tmp_path, gt, res)
    assert out["AP50"] == pytest.approx((51 / 101 * 100 + 100) / 2)
    assert only(out, "Miss") == pytest.approx(100 - out["AP50"]) and out["counts"]["Miss"] == 1
    assert out["FalseNeg"] == pytest.approx(out["Miss"])


def test_tide_best_fix_per_gt_and_crowd(tmp_path):
    # two Loc errors on the disc: the 0.8 one becomes a TP, the 0.7 one is removed (not a 2nd TP, not kept as FP)
    box_d = [100, 10, 40, 40]
    res = [det(1, 1, BOX_A, 0.9), det(1, 3, shifted(BOX_B, 0.6), 0.8), det(1, 3, [150, 10, 30, 30], 0.75),
           det(1, 3, shifted(BOX_B, 0.7), 0.7), det(1, 3, box_d, 0.65)]
    out = run_tide(tmp_path, make_gt({1: [(1, BOX_A), (3, BOX_B), (3, box_d)]}), res)
    assert out["counts"]["Loc"] == 2 and out["AP50"] == pytest.approx((100 + 51 / 101 * 100 / 4) / 2)
    fixed = (100 + (51 + 50 * 2 / 3) / 101 * 100) / 2  # disc class: TP, FP, TP
    assert out["Loc"] == pytest.approx(fixed - out["AP50"])
    # a detection inside a crowd region of its class is neither a TP nor an error
    gt = make_gt({1: [(1, BOX_A)]}, crowd=[(1, 1, [100, 100, 90, 90])])
    out = run_tide(tmp_path, gt, [det(1, 1, [110, 110, 50, 50], 0.95), det(1, 1, BOX_A, 0.9)])
    assert out["AP50"] == pytest.approx(100) and out["counts"]["Bkg"] == 0


def test_tide_masks(tmp_path):
    gt = make_gt(GT2)
    coco = coco_files.load_coco(write_gt(tmp_path, gt))
    res = []
    for a, frac in zip(gt["annotations"], (0.0, 0.6)):  # the disc's mask shifted: a Loc error
        b = shifted(a["bbox"], frac)
        rle = mask_utils.merge(mask_utils.frPyObjects([[b[0], b[1], b[0] + b[2], b[1], b[0] + b[2], b[1] + b[3],
                                                         b[0], b[1] + b[3]]], H, W))
        res.append(dict(det(1, a["category_id"], a["bbox"], 0.9 - frac),
                        segmentation={"size": rle["size"], "counts": rle["counts"].decode()}))
    out = ev.tide(coco, res, iou_type="segm")
    assert only(out, "Loc") == pytest.approx(50)
    assert ev.tide(coco, res, iou_type="bbox")["Loc"] == pytest.approx(0)  # the boxes themselves are right


def test_ap101_matches_cocoeval_style_grid():
    # recall 0.5 after the first TP: grid points 0..0.5 -> precision 1 (51 points), 0.51..1 -> 0
    assert tide_mod.ap101([0.9, 0.1], [True, False], 2) == pytest.approx(51 / 101 * 100)
    assert tide_mod.ap101([], [], 3) == 0.0 and tide_mod.ap101([0.5], [True], 0) == 0.0


# ---------------------------------------------------------------- proposal recall
def test_proposal_recall_hand_computed():
    gts = [np.array([[0, 0, 10, 10], [50, 50, 70, 70]], dtype=np.float32)]
    junk = [[100 + i, 100, 110 + i, 110] for i in range(9)]
    props = [np.array([[0, 0, 10, 7.2]] + junk + [[0, 0, 10, 10]], dtype=np.float32)]  # IoU 0.72 first; exact 11th
    ar = ev.proposal_recall(gts, props, max_dets=(10, 100, 1000))
    # top 10: gt 1 found at IoU 0.5..0.70 (5 of 10 thresholds), gt 2 never -> 5 / 20; top 11+: gt 1 at every one
    assert ar["AR@10"] == pytest.approx(25) and ar["AR@100"] == pytest.approx(50) and ar["AR@1000"] == pytest.approx(50)
    # one proposal cannot recall two identical gts
    two = [np.array([[0, 0, 10, 10], [0, 0, 10, 10]], dtype=np.float32)]
    assert ev.proposal_recall(two, [np.array([[0, 0, 10, 10]])], max_dets=(10,))["AR@10"] == pytest.approx(50)
    assert ev.proposal_recall([np.zeros((1, 4)) + [0, 0, 5, 5]], [np.zeros((0, 4))])["AR@10"] == 0
    # g2 = the top 6/10 of g1. p1 takes g1; p2 (IoU 0.9 with g1, 2/3 with g2) must then take g2 at t <= 0.65
    g = [np.array([[0, 0, 10, 10], [0, 0, 10, 6]], dtype=np.float32)]
    p = [np.array([[0, 0, 10, 10], [0, 0, 10, 9]], dtype=np.float32)]
    assert ev.proposal_recall(g, p, max_dets=(2,))["AR@2"] == pytest.approx((10 + 4) / 20 * 100)


def test_proposal_recall_equals_cocoeval():
    g = np.random.default_rng(0)
    gts, props, images, anns, res = [], [], [], [], []
    for img in range(1, 4):
        xy = g.uniform(0, 150, (5, 2))
        gb = np.concatenate([xy, xy + g.uniform(10, 50, (5, 2))], 1)
        pb = np.repeat(gb, 30, 0) + g.normal(0, 6, (150, 4))
        pb[:, 2:] = np.maximum(pb[:, 2:], pb[:, :2] + 1)
        pb = pb[g.permutation(150)]
        gts.append(gb), props.append(pb)
        images.append({"id": img, "width": W, "height": H, "file_name": f"{img}.png"})
        for b in gb:
            anns.append({"id": len(anns) + 1, "image_id": img, "category_id": 1, "iscrowd": 0,
                         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": (b[2] - b[0]) * (b[3] - b[1])})
        res += [det(img, 1, [b[0], b[1], b[2] - b[0], b[3] - b[1]], 1 - r / 1000) for r, b in enumerate(pb)]
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "obj"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    with contextlib.redirect_stdout(io.StringIO()):
        E = COCOeval(coco, coco.loadRes(res), "bbox")
        E.params.maxDets = [1, 10, 100]
        E.evaluate(), E.accumulate(), E.summarize()
    ar = ev.proposal_recall(gts, props, max_dets=(1, 10, 100))
    assert [ar["AR@1"], ar["AR@10"], ar["AR@100"]] == pytest.approx(list(E.stats[6:9] * 100))
    assert 0 < ar["AR@1"] < ar["AR@10"] < ar["AR@100"]


# ---------------------------------------------------------------- figures
def test_figures_are_pngs_of_the_expected_size(tmp_path):
    img = np.zeros((60, 90, 3), dtype=np.uint8)
    rle = mask_utils.encode(np.asfortranarray(np.pad(np.ones((20, 20), np.uint8), ((5, 35), (5, 65)))))
    pred = [dict(det(1, 1, [5, 5, 20, 20], 0.9), segmentation={"size": rle["size"], "counts": rle["counts"].decode()})]
    by_model = {"a": [pred, []], "b": [pred, pred], "c": [[], pred]}
    p = ev.plot_side_by_side([img, img], by_model, {1: "square"}, tmp_path / "f" / "side.png", cell_px=150)
    assert mpimg.imread(p).shape[:2] == (2 * 150, 3 * 150)
    p = ev.plot_tide({"a": {"Loc": 3.0, "Cls": 1.0}, "b": {"Loc": 2.0, "Miss": 4.0}}, tmp_path / "tide.png")
    assert mpimg.imread(p).shape[:2] == (420, 960)


def test_training_curves_from_a_log_with_a_torn_line(tmp_path):
    """figures.plot_training_log: one panel for the losses, one each for lr, tau, images/s (8 x 2.4 in per panel at
    100 dpi); a torn last line (a killed run) and a record without a step are skipped with a warning."""
    recs = [{"step": s, "epoch": 0, "loss": 1.0 / s, "loss_rpn": 0.5, "loss_det": -s / 10, "lr": 0.1 * s,
             "tau": 0.99 + s / 1000, "images_per_s": 2.0} for s in (5, 10, 15)]
    log = tmp_path / "run" / "log.jsonl"
    log.parent.mkdir()
    log.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"eval": 1}\n{"step": 20, "lo')
    with pytest.warns(UserWarning, match=r"log.jsonl: skipped 2 unreadable line\(s\), first line 4"):
        p = figures.plot_training_log(log)
    assert p == log.with_name("curves.png") and mpimg.imread(p).shape[:2] == (4 * 240, 800)
    assert [r["step"] for r in figures.read_log(log)] == [5, 10, 15]
    # a fine-tuning log has no tau: three panels; the losses share one whatever their names
    ft = tmp_path / "ft.jsonl"
    ft.write_text("".join(json.dumps({"step": s, "loss_cls": 0.3, "loss_mask": 0.6, "lr": 0.02, "images_per_s": 9})
                          + "\n" for s in (20, 40)))
    assert mpimg.imread(figures.plot_training_log(ft, tmp_path / "ft.png")).shape[:2] == (3 * 240, 800)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl: no log record"):
        figures.plot_training_log(empty)


def test_end_of_run_curves_report_a_failure_instead_of_raising(tmp_path):
    """runtime.plot_curves (train.py / finetune.py at the end of a run, after the weights are written): a missing or
    empty log is reported on the run's log function, not raised; a good log gives curves.png."""
    import runtime

    said = []
    runtime.plot_curves(tmp_path / "missing" / "log.jsonl", said.append)
    (tmp_path / "empty.jsonl").write_text("")
    runtime.plot_curves(tmp_path / "empty.jsonl", said.append)
    assert len(said) == 2 and all(m.startswith("no training curves: ") for m in said), said
    assert "missing/log.jsonl" in said[0] and "empty.jsonl: no log record" in said[1]
    (tmp_path / "log.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5}) + "\n")
    runtime.plot_curves(tmp_path / "log.jsonl", said.append)
    assert said[2] == f"training curves {tmp_path / 'curves.png'}" and (tmp_path / "curves.png").stat().st_size


def test_pick_disagreement():
    same = [det(1, 1, [0, 0, 10, 10], 0.9)]
    far = [det(1, 1, [50, 50, 10, 10], 0.9)]
    by_model = {"a": [same, same, same], "b": [same, far, []]}
    assert ev.pick_disagreement(by_model, 2) == [1, 2]  # image 0: both agree
    gts = [[{"category_id": 1, "bbox": [0, 0, 10, 10]}]] * 3
    assert ev.pick_disagreement(by_model, 1, gts=gts) == [1]


# ---------------------------------------------------------------- bad input
def test_bad_inputs_raise_with_the_file_and_entry(tmp_path):
    path = write_gt(tmp_path, make_gt(GT2))
    cases = {"unknown image_id": det(7, 1, BOX_A, 0.5), "unknown category_id": det(1, 2, BOX_A, 0.5),
             "not a finite": det(1, 1, BOX_A, float("nan")), "bbox": det(1, 1, [0, 0, -1, 3], 0.5)}
    for msg, bad in cases.items():
        rpath = tmp_path / "r.json"
        coco_files.save_results([det(1, 1, BOX_A, 0.9), bad], rpath)
        for fn in (ev.coco_eval, ev.tide, ev.voc_map50):
            with pytest.raises(ValueError, match=msg) as info:
                fn(path, rpath)
            assert "r.json" in str(info.value) and "entry 1" in str(info.value)
    with pytest.raises(ValueError, match="inf"):
        ev.coco_eval(path, [det(1, 1, BOX_A, float("inf"))])
    (tmp_path / "obj.json").write_text("{}")
    with pytest.raises(ValueError, match="obj.json"):
        coco_files.load_results(tmp_path / "obj.json")
    with pytest.warns(UserWarning, match="no predictions"):
        out = ev.tide(path, [])
    assert all(out[e] == 0 for e in tide_mod.MAIN_ERRORS) and out["AP50"] == 0


# ---------------------------------------------------------------- predict and outputs
class FakeDetector(torch.nn.Module):
    """Returns fixed torchvision-style outputs: two boxes with contiguous labels 1 and 2, masks."""

    def forward(self, images):
        assert not self.training
        out = []
        for img in images:
            _, h, w = img.shape
            masks = torch.zeros(2, 1, h, w)
            masks[0, 0, 2:10, 3:12] = 0.9
            masks[1, 0, 0:4, 0:4] = 0.4  # below the 0.5 mask threshold
            out.append({"boxes": torch.tensor([[3.0, 2.0, 12.0, 10.0], [0.0, 0.0, 4.0, 4.0]]),
                        "labels": torch.tensor([1, 2]), "scores": torch.tensor([0.9, 0.01]), "masks": masks})
        return out


def test_predict_maps_labels_and_encodes_masks(tmp_path):
    data = [(torch.rand(3, 16, 20), {"image_id": torch.tensor(5)}), (torch.randint(0, 255, (3, 16, 20)).byte(), 6)]
    model = FakeDetector().train()
    res = pr.predict(model, data, score_thresh=0.05, cat_ids=[1, 3], progress=False)
    assert model.training  # mode restored
    assert [r["image_id"] for r in res] == [5, 6] and all(r["category_id"] == 1 for r in res)
    assert res[0]["bbox"] == pytest.approx([3, 2, 9, 8])
    assert int(mask_utils.area(res[0]["segmentation"])) == 8 * 9
    res = pr.predict(model, data, score_thresh=0.0, cat_ids=[1, 3], progress=False)
    assert sorted({r["category_id"] for r in res}) == [1, 3]
    assert int(mask_utils.area(res[1]["segmentation"])) == 0
    path = coco_files.save_results(res, tmp_path / "r.json")
    assert coco_files.load_results(path) == json.loads(json.dumps(res))
    with pytest.raises(ValueError, match="outside"):
        pr.predict(model, data, score_thresh=0.0, cat_ids=[1], progress=False)


def test_predict_with_a_torchvision_mask_rcnn(tmp_path):
    """torchvision's Mask R-CNN (random ResNet-18 FPN) follows the contract's convention: masks -> RLE -> segm AP."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)
    model = MaskRCNN(backbone, num_classes=3, min_size=64, max_size=64, box_score_thresh=0.0,
                     box_detections_per_img=5, rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20)
    gt = make_gt({1: [(1, [5, 5, 20, 20])], 2: [(3, [30, 30, 20, 20])]})
    for im in gt["images"]:
        im["width"] = im["height"] = 64
    data = [(torch.rand(3, 64, 64), 1), (torch.rand(3, 64, 64), 2)]
    res = pr.predict(model, data, score_thresh=0.0, cat_ids=[1, 3], progress=False)
    assert 0 < len(res) <= 10 and all("segmentation" in r for r in res)
    path = write_gt(tmp_path, gt)
    for iou_type in ("bbox", "segm"):
        m = ev.coco_eval(path, res, iou_type)
        assert all(math.isnan(v) or 0 <= v <= 100 for v in m.values())


def test_markdown_table_and_metrics_json(tmp_path):
    table = ev.markdown_table([{"model": "a", "AP": 41.87654, "APs": float("nan")}], ("model", "AP", "APs", "x"))
    assert table.splitlines() == ["| model | AP | APs | x |", "| --- | --- | --- | --- |", "| a | 41.88 | - | - |"]
    p = ev.write_metrics({"a": {"AP": float("nan"), "k": np.float32(1.5), 3: [np.int64(2)]}}, tmp_path / "m.json")
    assert json.loads(p.read_text()) == {"a": {"AP": None, "k": 1.5, "3": [2]}}
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_cli_two_models(tmp_path, capsys):
    gt = make_gt({1: [(1, BOX_A), (3, BOX_B)], 2: [(1, BOX_B)]})
    gt_path = write_gt(tmp_path, gt)
    (tmp_path / "img").mkdir()
    for im in gt["images"]:
        cv2.imwrite(str(tmp_path / "img" / im["file_name"]), np.full((H, W, 3), 90, np.uint8))
    good = coco_files.save_results(perfect(gt), tmp_path / "good.json")
    bad = coco_files.save_results([det(1, 1, shifted(BOX_A, 0.6), 0.9), det(2, 3, BOX_B, 0.8)], tmp_path / "bad.json")
    props = tmp_path / "props.json"
    props.write_text(json.dumps({"1.png": [[10, 10, 70, 70]], "2": [[0, 0, 5, 5]]}))
    out = tmp_path / "out"
    m = ev.main(["--gt", str(gt_path), "--results", str(good), "--results", str(bad), "--names", "ours", "base",
                 "--images", str(tmp_path / "img"), "--out", str(out), "--novel", "3", "--proposals", str(props),
                 "--figure-images", "2"])
    printed = capsys.readouterr().out
    assert "| ours | 100.00" in printed and "TIDE" in printed and "AR@100" in printed
    assert m["models"]["ours"]["bbox"]["AP"] == pytest.approx(100) and m["models"]["base"]["bbox"]["AP"] < 50
    assert m["proposals"]["AR@10"] == pytest.approx(100 / 3)  # 1 of 3 gts, at every threshold
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["models"]["base"]["tide_bbox"]["Loc"] > 0
    assert (out / "metrics.md").read_text().startswith("### COCO box AP")
    assert mpimg.imread(out / "side_by_side.png").shape[:2] == (2 * 320, 2 * 320)
    assert mpimg.imread(out / "tide.png").shape[:2] == (420, 960)
    with pytest.raises(SystemExit):
        ev.main(["--gt", str(gt_path)])


# ---------------------------------------------------------------- review fixes: inputs pycocotools cannot take
def test_gt_without_area_iscrowd_or_masks(tmp_path, capsys):
    """A ground truth without area / iscrowd / segmentation: box metrics as usual, mask AP skipped with a reason."""
    gt = make_gt(GT2)
    for a in gt["annotations"]:
        a.pop("area"), a.pop("iscrowd"), a.pop("segmentation")
    path = write_gt(tmp_path, gt)
    res = [dict(r, iscrowd=0) for r in perfect(make_gt(GT2))]
    assert ev.coco_eval(path, res)["AP"] == pytest.approx(100)  # was KeyError 'area' / 'iscrowd' in COCOeval
    rle = mask_utils.encode(np.asfortranarray(np.ones((H, W), np.uint8)))
    masked = [dict(r, segmentation={"size": rle["size"], "counts": rle["counts"].decode()}) for r in res]
    with pytest.warns(UserWarning, match="mask AP skipped: 2 of 2 ground-truth annotations have no segmentation"):
        m = ev.coco_eval(path, masked, "segm")
    assert all(math.isnan(m[k]) for k in ev.COCO_KEYS) and "no segmentation" in m["skipped"]
    rpath = coco_files.save_results(masked, tmp_path / "masked.json")
    with pytest.warns(UserWarning, match="mask AP skipped"):
        out = ev.main(["--gt", str(path), "--results", str(rpath), "--out", str(tmp_path / "out")])
    model = out["models"]["masked"]
    assert model["bbox"]["AP"] == pytest.approx(100) and "skipped" in model["segm"] and "tide_segm" not in model
    gt["annotations"][0]["segmentation"] = [[1, 2, 3, 4]]  # malformed: dropped (then that annotation has no mask)
    with pytest.warns(UserWarning, match="1 malformed ground-truth polygons dropped"):
        assert ev.coco_eval(write_gt(tmp_path, gt, "poly.json"), res)["AP"] == pytest.approx(100)


class GreyOracle(torch.nn.Module):
    """A perfect detector for test_coco_data-style images: image k is filled with grey 40 * k; returns its boxes."""

    def __init__(self, cs):
        super().__init__()
        self.cs = cs

    def forward(self, images):
        out = []
        for img in images:
            anns = self.cs.anns[int(round(float(img[0, 0, 0]) * 255 / 40))]
            out.append({"boxes": torch.tensor([a["box"] for a in anns]).reshape(-1, 4), "scores": torch.ones(len(anns)),
                        "labels": torch.tensor([self.cs.label(a["category_id"]) for a in anns], dtype=torch.int64)})
        return out


def test_unreadable_val_image_is_skipped_not_misfiled(tmp_path):
    """One truncated val image: a perfect detector keeps AP 100 (it fell to ~69 when the next image's detections
    were filed under its id), the skipped file is recorded, and only the predicted images are evaluated."""
    import coco_data
    from test_coco_data import write_split
    path, img = write_split(tmp_path, n=4)
    cs = coco_data.load_coco(path, img)
    (img / "2.png").write_bytes((img / "2.png").read_bytes()[:40])
    with pytest.warns(UserWarning, match="2.png"):
        res = pr.predict(GreyOracle(cs), coco_data.DetectionDataset(cs, train=False), cat_ids=cs.cat_ids,
                         progress=False)
    assert res.image_ids == [1, 3, 4] and res.skipped == {2: "2.png"} and {r["image_id"] for r in res} == {1, 3, 4}
    m = ev.coco_eval(path, res)
    assert m["AP"] == pytest.approx(100) and m["skipped_images"] == 1 and m["skipped_files"] == ["2.png"]
    assert ev.voc_map50(path, res)["mAP"] == pytest.approx(100) and ev.tide(path, res)["Miss"] == 0
    with pytest.raises(ValueError, match="no image was predicted"):
        ev.coco_eval(path, pr.Predictions([], [], {1: "1.png"}))


def _fake_checkpoint(tmp_path, cat_ids, names):
    """A model_final.pth stand-in: enough for the checks made before the detector is built."""
    p = tmp_path / "model_final.pth"
    torch.save({"state_dict": {}, "config": {"num_classes": len(cat_ids)}, "cat_ids": cat_ids, "names": names}, p)
    return p


def test_checkpoint_categories_must_match_the_ground_truth(tmp_path):
    gt = make_gt(GT2)
    path = write_gt(tmp_path, gt)
    (tmp_path / "img").mkdir()
    cv2.imwrite(str(tmp_path / "img" / "1.png"), np.zeros((H, W, 3), np.uint8))
    args = ["--gt", str(path), "--images", str(tmp_path / "img"), "--out", str(tmp_path / "out"), "--checkpoint"]
    for ids, names in (([1, 2], ["square", "disc"]), ([1, 3], ["square", "circle"])):
        ck = _fake_checkpoint(tmp_path, ids, names)
        with pytest.raises(ValueError, match=r"model_final.pth: the checkpoint's categories .* differ .*gt.json"):
            ev.main(args + [str(ck)])


def test_empty_ground_truth_and_empty_results(tmp_path):
    empty = write_gt(tmp_path, {"images": [], "annotations": [], "categories": list(CATS)}, "empty.json")
    with pytest.raises(ValueError, match="empty.json: the ground truth has no images"):
        ev.coco_eval(empty, [])
    ck = _fake_checkpoint(tmp_path, [1, 3], ["square", "disc"])
    with pytest.raises(ValueError, match="empty.json: the ground truth has no images"):  # was IndexError
        ev.main(["--gt", str(empty), "--checkpoint", str(ck), "--images", str(tmp_path), "--out", str(tmp_path)])
    no_objects = write_gt(tmp_path, make_gt({1: []}), "no_objects.json")
    with pytest.warns(UserWarning, match="no predictions"):
        assert all(math.isnan(v) for v in ev.coco_eval(no_objects, []).values())  # nothing to evaluate: NaN
    large = write_gt(tmp_path, make_gt({1: [(1, [0, 0, 150, 150])]}), "large.json")
    with pytest.warns(UserWarning, match="no predictions"):
        m = ev.coco_eval(large, [])
    assert m["AP"] == m["APl"] == 0 and math.isnan(m["APs"]) and math.isnan(m["APm"])  # as COCOeval: -1 -> NaN


def test_figures_skip_an_unreadable_image(tmp_path):
    gt = make_gt({1: [(1, BOX_A)], 2: [(3, BOX_B)]})
    coco = coco_files.load_coco(write_gt(tmp_path, gt))
    cv2.imwrite(str(tmp_path / "1.png"), np.full((H, W, 3), 90, np.uint8))
    (tmp_path / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # a truncated PNG: cv2 gives None
    with pytest.warns(UserWarning, match=r"2.png: not a decodable image"):
        assert figures.find_image(tmp_path, "2.png") is None
    res = {"m": perfect(gt)}
    with pytest.warns(UserWarning, match="2.png"):
        ev.comparison_figures(coco, res, {"m": {"Loc": 1.0}}, tmp_path, tmp_path / "out", n=2)
    assert mpimg.imread(tmp_path / "out" / "side_by_side.png").shape[:2] == (320, 320)  # the readable image only
