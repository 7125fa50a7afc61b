"""Tests for eval.py, coco_files.py and tide.py (paper 4.3-4.5), the numbers: COCO AP (boxes, masks), VOC mAP50,
TIDE, AR, results and ground-truth files, bad input, metrics files, ground truths pycocotools cannot take. Figures,
training curves, prediction and the CLI: test_predict.py (it imports the ground-truth helpers below)."""
import contextlib
import io
import json
import math
import os
import sys

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import coco_files  # noqa: E402
import eval as ev  # noqa: E402
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


def test_voc_iou_equals_detectron2s_on_voc2coco_boxes(tmp_path):
    """voc_to_coco stores VOC's 1-based inclusive (x1, y1, x2, y2) as (x1 - 1, y1 - 1, x2, y2), as detectron2 loads
    VOC; detectron2's evaluator (TFA's numbers) adds 1 back to a detection's x1, y1 and uses the devkit's +1 widths.
    Our continuous IoU on the stored boxes is that IoU: the same AP, also next to the 0.5 threshold, where the +1
    rule on the stored boxes themselves differs (a 10 px box shifted 3.4 px: 0.49 continuous, 0.53 with +1)."""
    gt = make_gt({1: [(1, [0, 0, 10, 10]), (3, [20, 5, 12, 9])], 2: [(1, [4, 4, 30, 20])]})
    res = [det(1, 1, [3.4, 0, 10, 10], 0.9), det(1, 3, [21, 6, 12, 9], 0.8), det(2, 1, [10, 8, 30, 20], 0.7),
           det(2, 1, [5, 4, 28, 20], 0.6)]

    def to_voc(b):  # stored (continuous) [x, y, w, h] -> VOC 1-based (x1, y1, x2, y2) as [x1, y1, x2 - x1, y2 - y1]
        return [b[0] + 1, b[1] + 1, b[2] - 1, b[3] - 1]
    voc_gt = {**gt, "annotations": [{**a, "bbox": to_voc(a["bbox"])} for a in gt["annotations"]]}
    voc_res = [{**r, "bbox": to_voc(r["bbox"])} for r in res]
    ours = ev.voc_map50(write_gt(tmp_path, gt), res)
    devkit = ev.voc_map50(write_gt(tmp_path, voc_gt, "voc.json"), voc_res, plus_one=True)
    assert ours["per_class"] == pytest.approx(devkit["per_class"]) and ours["per_class"][3] == pytest.approx(100)
    plus_one_on_stored = ev.voc_map50(write_gt(tmp_path, gt), res, plus_one=True)
    assert ours["per_class"][1] != pytest.approx(plus_one_on_stored["per_class"][1])


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


# ---------------------------------------------------------------- metrics files
def test_markdown_table_and_metrics_json(tmp_path):
    table = ev.markdown_table([{"model": "a", "AP": 41.87654, "APs": float("nan")}], ("model", "AP", "APs", "x"))
    assert table.splitlines() == ["| model | AP | APs | x |", "| --- | --- | --- | --- |", "| a | 41.88 | - | - |"]
    p = ev.write_metrics({"a": {"AP": float("nan"), "k": np.float32(1.5), 3: [np.int64(2)]}}, tmp_path / "m.json")
    assert json.loads(p.read_text()) == {"a": {"AP": None, "k": 1.5, "3": [2]}}
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


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
