"""Tests for predict.py, figures.py, runtime.plot_curves and eval.py's command line (paper 4.3-4.5): figures and
training curves, prediction (label mapping, masks, a torchvision Mask R-CNN, unreadable images), the CLI with results
files or checkpoints, empty ground truths. The hand-made ground truths come from test_eval.py."""
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import coco_files  # noqa: E402
import eval as ev  # noqa: E402
import figures  # noqa: E402
import predict as pr  # noqa: E402
from test_eval import BOX_A, BOX_B, CATS, GT2, H, W, det, make_gt, perfect, shifted, write_gt  # noqa: E402


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
    # the same output format holding the ground truth's own masks: mask AP 100; the masks moved 3 px (boxes kept):
    # mask AP falls, box AP stays (what predict writes as segmentation is the model's masks)
    coco = coco_files.load_coco(path)

    class Oracle(torch.nn.Module):
        def __init__(self, shift):
            super().__init__()
            self.shift, self.calls = shift, 0

        def forward(self, images):
            self.calls += 1
            anns = coco.loadAnns(coco.getAnnIds(imgIds=[self.calls]))
            masks = torch.stack([torch.from_numpy(coco.annToMask(a)).float() for a in anns])[:, None]
            return [{"boxes": torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]),
                     "labels": torch.tensor([[1, 3].index(a["category_id"]) + 1 for a in anns]),
                     "scores": torch.ones(len(anns)), "masks": masks.roll(self.shift, dims=-1)}]
    for shift, mask_ap in ((0, 100.0), (3, None)):
        res = pr.predict(Oracle(shift), data, cat_ids=[1, 3], progress=False)
        assert ev.coco_eval(path, res)["AP"] == pytest.approx(100)
        got = ev.coco_eval(path, res, "segm")["AP"]
        assert got == pytest.approx(100) if mask_ap else got < 90, (shift, got)


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
    # VOC mAP50 with VOC07's 11-point AP by default (Table 2's test07, as finetune.py), named in the report
    assert saved["voc_metric"] == "11-point (VOC07)" and "VOC mAP50 (Table 2), 11-point (VOC07) AP" in printed
    # class 1: TP, FP, TP -> recall/precision (.5, 1), (.5, .5), (1, 2/3): area 5/6, 11-point (6 + 5 x 2/3) / 11
    mixed = coco_files.save_results([det(1, 1, BOX_A, 0.95), det(2, 1, shifted(BOX_B, 0.6), 0.9),
                                     det(2, 1, BOX_B, 0.8), det(1, 3, BOX_B, 0.7)], tmp_path / "mixed.json")
    for flag, ap1 in (([], (6 + 5 * 2 / 3) / 11), (["--no-voc07"], 5 / 6)):
        m = ev.main(["--gt", str(gt_path), "--results", str(mixed), "--out", str(tmp_path / "o2"), *flag])
        assert m["models"]["mixed"]["voc"]["per_class"][1] == pytest.approx(100 * ap1)
    assert m["voc_metric"] == "area (VOC2010+)"
    # --val-limit 1: image 1 only (its detections TP class 1, FP class 3; image 2's ignored), as gt_subset scores it
    m = ev.main(["--gt", str(gt_path), "--results", str(mixed), "--out", str(tmp_path / "o3"), "--val-limit", "1"])
    sub = [r for r in coco_files.load_results(mixed) if r["image_id"] == 1]
    assert m["images"] == 1 and m["models"]["mixed"]["bbox"] == pytest.approx(ev.coco_eval(
        coco_files.gt_subset(coco_files.load_coco(gt_path), [1]), sub), nan_ok=True)
    assert m["models"]["mixed"]["bbox"]["AP"] != ev.coco_eval(gt_path, mixed)["AP"]
    assert mpimg.imread(out / "side_by_side.png").shape[:2] == (2 * 320, 2 * 320)
    assert mpimg.imread(out / "tide.png").shape[:2] == (420, 960)
    with pytest.raises(SystemExit):
        ev.main(["--gt", str(gt_path)])


# ---------------------------------------------------------------- review fixes: bad images, checkpoints, empty sets
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


def test_predict_split_on_chosen_images(tmp_path):
    """eval.py --val-limit's path: predict_split predicts exactly the given images (as a perfect detector shows: AP
    100 on them); ids outside the split are refused by name."""
    import coco_data
    from test_coco_data import write_split
    path, img = write_split(tmp_path, n=4)
    cs = coco_data.load_coco(path, img)
    res = pr.predict_split(GreyOracle(cs), cs, [3, 1])
    assert sorted(res.image_ids) == [1, 3] and {r["image_id"] for r in res} == {1, 3}
    assert ev.coco_eval(coco_files.gt_subset(coco_files.load_coco(path), [1, 3]), res)["AP"] == pytest.approx(100)
    with pytest.raises(ValueError, match=r"image ids \[9\] are not in the split"):
        pr.predict_split(GreyOracle(cs), cs, [1, 9])


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
        with pytest.raises(SystemExit, match=r"model_final.pth: the checkpoint's categories .* differ .*gt.json"):
            ev.main(args + [str(ck)])  # one line (checkpoint_predictions raises ValueError)


def test_empty_ground_truth_and_empty_results(tmp_path):
    empty = write_gt(tmp_path, {"images": [], "annotations": [], "categories": list(CATS)}, "empty.json")
    with pytest.raises(ValueError, match="empty.json: the ground truth has no images"):
        ev.coco_eval(empty, [])
    ck = _fake_checkpoint(tmp_path, [1, 3], ["square", "disc"])
    with pytest.raises(SystemExit, match="empty.json: the ground truth has no images"):  # was IndexError
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
