"""detector.py / detector_heads.py: train step + inference per detector kind, RoI sampling, losses, masks,
post-processing, pretrained.pth loading (paper 4.3-4.4). CPU, ResNet-18, ~100 px images."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import detector_heads as dh  # noqa: E402
import model  # noqa: E402
from detector import Detector, DetectorConfig, load_pretrained  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one intra-op thread


SMALL = dict(depth=18, min_size=(96,), max_size=160, test_size=96, roi_batch=16, rpn_pre_nms_train=200,
             rpn_post_nms_train=100, rpn_pre_nms_test=100, rpn_post_nms_test=50, max_dets=20)


def small(kind, num_classes=3, **kw):
    return DetectorConfig(num_classes=num_classes, kind=kind, **{**SMALL, **kw})


def batch():
    """Two images of different sizes: one with two objects (boxes, masks), one with none."""
    g = torch.Generator().manual_seed(0)
    imgs = [torch.rand(3, 96, 120, generator=g), torch.rand(3, 100, 90, generator=g)]
    masks = torch.zeros(2, 96, 120, dtype=torch.uint8)
    masks[0, 10:50, 20:70] = 1
    masks[1, 55:90, 60:110] = 1
    targets = [{"boxes": torch.tensor([[20.0, 10, 70, 50], [60, 55, 110, 90]]), "labels": torch.tensor([1, 3]),
                "masks": masks},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
                "masks": torch.zeros(0, 100, 90, dtype=torch.uint8)}]
    return imgs, targets


@pytest.mark.parametrize("kind", ["faster", "mask", "cascade"])
def test_train_step_and_inference(kind):
    torch.manual_seed(0)
    det = Detector(small(kind)).train()
    imgs, targets = batch()
    losses = det.losses(imgs, targets)
    expected = {"loss", "loss_rpn_cls", "loss_rpn_box"}
    expected |= ({f"loss_{n}_s{k}" for n in ("cls", "box") for k in (1, 2, 3)} if kind == "cascade"
                 else {"loss_cls", "loss_box"})
    expected |= {"loss_mask"} if kind == "mask" else set()
    assert set(losses) == expected
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    assert torch.allclose(losses["loss"], sum(v for k, v in losses.items() if k != "loss"))
    losses["loss"].backward()
    heads = [det.stages[2].box_predictor] if kind == "cascade" else [det.box_predictor]
    heads += [det.mask_head] if kind == "mask" else []
    for m in heads + [det.rpn, det.extractor.backbone.conv1]:
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    det.eval()
    with torch.no_grad():
        outs = det(imgs)
    assert len(outs) == 2
    for o, img in zip(outs, imgs):
        H, W = img.shape[-2:]
        n = o["boxes"].shape[0]
        assert set(o) == ({"boxes", "labels", "scores", "masks"} if kind == "mask" else {"boxes", "labels", "scores"})
        assert o["boxes"].shape == (n, 4) and o["scores"].shape == (n,) and o["labels"].dtype == torch.int64
        assert 0 < n <= SMALL["max_dets"]  # untrained: softmax ~ uniform, above the 0.05 threshold
        assert ((o["labels"] >= 1) & (o["labels"] <= 3)).all() and (o["scores"] > 0.05).all()
        assert (o["boxes"][:, 0::2] <= W).all() and (o["boxes"][:, 1::2] <= H).all() and (o["boxes"] >= 0).all()
        if kind == "mask":
            assert o["masks"].shape == (n, 1, H, W) and 0 <= o["masks"].min() and o["masks"].max() <= 1


def test_preprocess_resizes_pads_and_scales():
    det = Detector(small("faster", min_size=(64,), test_size=64, max_size=100)).eval()
    x, sizes, scales = det.preprocess([torch.rand(3, 50, 200), torch.rand(3, 64, 32)])
    # short side -> 64 unless the long side would pass 100: 50 x 200 -> 25 x 100; 64 x 32 -> 100 x 50 (not 128 x 64)
    assert sizes == [(25, 100), (100, 50)] and x.shape == (2, 3, 128, 128)  # padded to multiples of 32
    assert scales[0] == (0.5, 0.5) and scales[1] == (1.5625, 1.5625)
    assert (x[0, :, 25:] == 0).all() and (x[0, :, :, 100:] == 0).all()


def test_sample_rois_hand_case():
    gt = torch.tensor([[0.0, 0, 10, 10]])
    props = torch.tensor([[0.0, 0, 10, 9], [0, 0, 10, 4], [50, 50, 60, 60]])  # IoU 0.9, 0.4, 0
    torch.manual_seed(0)
    s = dh.sample_rois(props, gt, torch.tensor([2]), num=512, positive_fraction=0.25)
    assert len(s["boxes"]) == 4  # 3 proposals + the gt box
    assert sorted(s["labels"].tolist()) == [0, 0, 2, 2]
    labels, _ = dh.label_rois(props, gt, torch.tensor([2]), iou_thresh=0.5)
    assert labels.tolist() == [2, 0, 0]
    many = torch.tensor([[0.0, 0, 10, 10]]).repeat(40, 1)  # 41 positives, 4 RoIs, 25%: one positive
    s = dh.sample_rois(torch.cat([many, props[2:].repeat(10, 1)]), gt, torch.tensor([1]), num=4)
    assert (s["labels"] > 0).sum() == 1 and len(s["labels"]) == 4
    s = dh.sample_rois(props, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))  # no gt: all background
    assert (s["labels"] == 0).all() and len(s["labels"]) == 3


def test_fast_rcnn_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]])  # 2 RoIs, C = 2
    deltas = torch.zeros(2, 12)
    deltas[0, 8:12] = torch.tensor([1.0, -1.0, 0.5, 0.0])  # class 2's deltas of RoI 0
    labels = torch.tensor([2, 0])
    targets = torch.tensor([[0.0, 0.0, 0.0, 0.5], [9.0, 9.0, 9.0, 9.0]])  # the background row must not count
    lc, lb = dh.fast_rcnn_loss(logits, deltas, labels, targets, beta=0.0)
    ce = (torch.log(torch.tensor(3.0)) + (torch.log(torch.exp(torch.tensor(2.0)) + 2) - 2)) / 2
    assert torch.isclose(lc, ce)
    assert torch.isclose(lb, torch.tensor((1 + 1 + 0.5 + 0.5) / 2))


def test_box_targets_roundtrip_with_weights():
    rois = torch.tensor([[10.0, 10, 50, 30], [0, 0, 0, 0]])  # the second is empty (a collapsed cascade box)
    gt = torch.tensor([[12.0, 8, 60, 35], [0, 0, 5, 5]])
    t = dh.box_targets(rois, gt, torch.tensor([1, 0]), dh.CASCADE_WEIGHTS[1])
    assert torch.isfinite(t).all() and (t[1] == 0).all()
    import rpn
    assert torch.allclose(rpn.decode_boxes(t[:1], rois[:1], dh.CASCADE_WEIGHTS[1]), gt[:1], atol=1e-4)


def test_postprocess_per_class_nms_and_threshold():
    boxes = torch.tensor([[[0.0, 0, 10, 10], [0, 0, 10, 10]], [[1.0, 0, 11, 10], [1, 0, 11, 10]],
                          [[50.0, 50, 200, 70], [0, 0, 1, 1]]])  # (N=3, C=2, 4)
    scores = torch.tensor([[0.9, 0.6], [0.8, 0.02], [0.7, 0.1]])
    b, s, lab = dh.postprocess(boxes, scores, (64, 100), score_thresh=0.05, nms_thresh=0.5, max_dets=10)
    # class 1: RoIs 0 and 1 overlap (IoU 0.82): keep 0.9; RoI 2 kept, clipped to x2 = 100, y2 = 64 -> 64 ok
    # class 2: 0.6 kept, 0.02 under threshold, 0.1 kept
    assert s.tolist() == pytest.approx([0.9, 0.7, 0.6, 0.1])
    assert lab.tolist() == [1, 1, 2, 2]
    assert b[1].tolist() == [50.0, 50.0, 100.0, 64.0]
    b, s, lab = dh.postprocess(boxes, scores, (64, 100), max_dets=2)
    assert s.tolist() == pytest.approx([0.9, 0.7])


def test_mask_targets_and_paste():
    m = torch.zeros(1, 40, 40, dtype=torch.uint8)
    m[0, 8:24, 4:36] = 1  # the object fills its box exactly: left half of the box below
    roi = torch.tensor([[4.0, 8, 36, 24], [4.0, 8, 20, 24]])
    t = dh.mask_targets(m, torch.tensor([0, 0]), roi, size=28)
    assert (t[0] == 1).all() and (t[1] == 1).all()
    half = torch.zeros(1, 40, 40, dtype=torch.uint8)
    half[0, 8:24, 4:20] = 1
    t = dh.mask_targets(half, torch.tensor([0]), roi[:1])
    assert (t[0, :, :14] == 1).all() and (t[0, :, 14:] == 0).all()
    pasted = dh.paste_masks(torch.ones(1, 28, 28), torch.tensor([[10.0, 20, 30, 25]]), 32, 40)
    assert pasted.shape == (1, 1, 32, 40)
    assert torch.allclose(pasted[0, 0, 20:25, 10:30], torch.ones(5, 20)) and pasted.sum().item() == pytest.approx(100)


def test_mask_loss_uses_gt_class_channel():
    logits = torch.zeros(2, 4, 28, 28)
    logits[0, 2] = 10.0  # right channel confident and correct for RoI 0 (target ones)
    logits[1, 1] = -10.0  # RoI 1: label 1, target zeros
    logits[0, 3] = -50.0  # other channels ignored
    loss = dh.mask_loss(logits, torch.tensor([2, 1]), torch.stack([torch.ones(28, 28), torch.zeros(28, 28)]))
    assert loss < 1e-3


def test_load_pretrained_reports_loaded_and_fresh(tmp_path, capsys):
    torch.manual_seed(0)
    ad = model.ADePT("joint", depth=18)
    path = tmp_path / "pretrained.pth"
    torch.save({"state_dict": model.export_pretrained(ad), "meta": {"mode": "joint", "depth": 18}}, path)
    det = Detector(small("mask", num_classes=5))
    rep = load_pretrained(det, path)
    groups = {k.split(".")[0] if not k.startswith("extractor.") else ".".join(k.split(".")[:2]) for k in rep["loaded"]}
    assert groups == {"extractor.backbone", "extractor.fpn", "rpn", "box_head"}
    assert {k.split(".")[0] for k in rep["fresh"]} == {"box_predictor", "mask_head"}
    assert rep["unused"] == [] and rep["mismatched"] == []
    assert len(rep["loaded"]) + len(rep["fresh"]) == len(det.state_dict())
    assert torch.equal(det.rpn.c.weight, ad.rpn.c.weight)
    assert torch.equal(det.box_head.fcs[0].weight, ad.target.box_head.fcs[0].weight)  # target branch (paper)
    ours, theirs = det.extractor.fpn.lateral[0].norm, ad.target.extractor.fpn.lateral[0].norm
    assert torch.equal(ours.running_var, theirs.running_var)  # BN statistics come along
    out = capsys.readouterr().out
    assert "loaded:" in out and "mask_head" in out and "P6" in out
    cas = Detector(small("cascade", num_classes=5))
    rep = load_pretrained(cas, path, verbose=False)
    assert all(torch.equal(s.box_head.fcs[0].weight, ad.target.box_head.fcs[0].weight) for s in cas.stages)
    assert {k.split(".")[2] for k in rep["fresh"]} == {"box_predictor"}
    two = Detector(small("faster", head="2fc"))  # another head kind: reported, left fresh
    rep = load_pretrained(two, path, verbose=False)
    assert rep["mismatched"] and all(k.startswith(("box_head", "box_predictor")) for k in rep["fresh"])
    with pytest.raises(ValueError, match="pretrained.pth"):
        load_pretrained(Detector(small("faster", depth=34)), path, verbose=False)
