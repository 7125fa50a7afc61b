"""detector.py / detector_heads.py: train step + inference per detector kind, RoI sampling, losses, masks,
post-processing, pretrained.pth loading (paper 4.3-4.4). CPU, ResNet-18, ~100 px images."""
import math
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


def test_rpn_box_loss_is_detectron2s_l1_by_default(monkeypatch):
    """Fine-tuning's RPN box loss: L1 (detectron2's SMOOTH_L1_BETA 0, SoCo's configs) unless rpn_box_beta says
    otherwise (torchvision: 1/9; pre-training keeps [19]'s 1/9); the RoI head's is L1 too (box_beta)."""
    import rpn
    seen, real = [], rpn.rpn_loss
    monkeypatch.setattr(rpn, "rpn_loss", lambda *a, **k: seen.append(k.get("beta")) or real(*a, **k))
    imgs, targets = batch()
    for beta in (None, 1 / 9):
        torch.manual_seed(0)
        cfg = small("faster") if beta is None else small("faster", rpn_box_beta=beta)
        Detector(cfg).train().losses(imgs, targets)
    assert seen == [0.0, 1 / 9] and small("faster").box_beta == 0.0


def test_mask_head_runs_without_foreground_rois():
    """A batch without any object (finetune.py --keep-empty): loss_mask is 0, yet the mask head's norm layers run (on
    an empty batch), as every process must under SyncBN or the others wait for it; their statistics stay unchanged."""
    torch.manual_seed(0)
    det = Detector(small("mask")).train()
    imgs, targets = batch()
    calls = []
    bns = [m for m in det.mask_head.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns
    for m in bns:
        m.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    before = [m.running_var.clone() for m in bns]
    losses = det.losses(imgs[1:], targets[1:])  # the image without objects
    assert losses["loss_mask"] == 0 and calls == [0] * len(bns)
    assert all(torch.equal(m.running_var, b) for m, b in zip(bns, before))
    losses["loss"].backward()
    assert all(p.grad is not None for p in det.mask_head.parameters())


@pytest.mark.parametrize("kind", ["faster", "mask", "cascade"])
def test_steps_copy_no_python_data_to_the_device(kind, monkeypatch):
    """No tensor made from Python data (torch.tensor, new_tensor: on CUDA a copy that waits for the GPU's queue) in a
    training step or in inference, but inside torchvision's batched NMS (its per-group loop, as in torchvision's
    own RPN). tests/sync_ops.py counts them as aten::lift_fresh."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__))))
    import torchvision
    from sync_ops import SyncOpCounter

    real, in_nms = torchvision.ops.batched_nms, []

    def counted_nms(*args, **kwargs):
        before = counter.counts.get("aten::lift_fresh", 0)
        out = real(*args, **kwargs)
        in_nms.append(counter.counts.get("aten::lift_fresh", 0) - before)
        return out

    torch.manual_seed(0)
    det = Detector(small(kind)).train()
    imgs, targets = batch()
    det.losses(imgs, targets)  # builds rpn.cached_anchors' anchors (a copy of the ratios once per feature size)
    monkeypatch.setattr(torchvision.ops, "batched_nms", counted_nms)
    with SyncOpCounter() as counter:
        det.losses(imgs, targets)["loss"].backward()
        det.eval()
        with torch.no_grad():
            det(imgs)
    assert in_nms and counter.counts.get("aten::lift_fresh", 0) == sum(in_nms), counter.counts


def test_scale_boxes_equals_a_factor_tensor():
    g = torch.Generator().manual_seed(1)
    b = torch.rand(7, 4, generator=g) * 300
    f = torch.tensor([0.37, 1.9, 0.37, 1.9])
    assert torch.equal(dh.scale_boxes(b, 0.37, 1.9), b * f)
    assert torch.equal(dh.scale_boxes(b, 0.37, 1.9, divide=True), b / f)
    assert dh.scale_boxes(torch.zeros(0, 4), 2.0, 3.0).shape == (0, 4)


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
    # a sub-pixel box: a full mask covers (at 0.5) exactly the pixels whose centre lies in the box (detectron2's
    # paste; extending the edge values instead also took the ring of pixels centred just outside: 81, not 64)
    on = dh.paste_masks(torch.ones(1, 28, 28), torch.tensor([[2.0, 2.0, 10.3, 10.3]]), 16, 16)[0, 0] >= 0.5
    centred = torch.zeros(16, 16, dtype=torch.bool)
    centred[2:10, 2:10] = True  # centres 2.5 .. 9.5 lie in [2, 10.3]
    assert torch.equal(on, centred)


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


# ---------------------------------------------------------------- original <-> resized pixels at scale != 1
TINY = dict(min_size=(64,), test_size=64, max_size=100, fpn_channels=32, head="2fc", mask_dim=16)  # 50x200 -> 0.5


def test_forward_maps_resized_boxes_and_masks_to_original_pixels(monkeypatch):
    torch.manual_seed(0)
    det = Detector(small("mask", **TINY)).eval()
    imgs = [torch.rand(3, 50, 200), torch.rand(3, 64, 32)]  # scales 0.5 and 1.5625 (test_preprocess_...)

    def fixed_box_predict(feats, props):  # every RoI: box (10, 5, 30, 20) in resized pixels, class 1 only
        n = sum(len(p) for p in props)
        boxes = torch.tensor([10.0, 5, 30, 20]).expand(n, 3, 4).clone()
        scores = torch.full((n, 3), 0.01)
        scores[:, 0] = 0.9
        return boxes, scores

    monkeypatch.setattr(det, "_box_predict", fixed_box_predict)
    with torch.no_grad():
        outs = det(imgs)
    assert [o["labels"].tolist() for o in outs] == [[1], [1]]
    assert torch.allclose(outs[0]["boxes"], torch.tensor([[20.0, 10, 60, 40]]))  # / 0.5
    assert torch.allclose(outs[1]["boxes"], torch.tensor([[6.4, 3.2, 19.2, 12.8]]))  # / 1.5625
    for o, (H, W), (r0, r1, c0, c1) in zip(outs, [(50, 200), (64, 32)], [(10, 40, 20, 60), (3, 13, 6, 19)]):
        inside = torch.zeros(H, W, dtype=torch.bool)
        inside[r0:r1, c0:c1] = True  # the pixels centred in the box, original pixels (col 19: centre 19.5 > 19.2)
        assert o["masks"].shape == (1, 1, H, W) and torch.equal(o["masks"][0, 0] > 0, inside)


def test_losses_map_original_targets_to_resized_pixels_and_back(monkeypatch):
    import rpn
    torch.manual_seed(0)
    det = Detector(small("mask", **TINY)).train()
    masks = torch.zeros(2, 50, 200, dtype=torch.uint8)
    masks[0, 10:40, 20:60] = 1
    masks[1, 0:50, 100:180] = 1
    gt = torch.tensor([[20.0, 10, 60, 40], [100, 0, 180, 50]])
    seen = {}
    real_targets, real_sample, real_masks = rpn.rpn_targets, dh.sample_rois, dh.mask_targets

    def rpn_targets(anchors, boxes, valid, *a, **k):
        seen["rpn"] = boxes.clone(), valid.clone()
        return real_targets(anchors, boxes, valid, *a, **k)

    def sample_rois(props, gt_boxes, *a, **k):
        seen["roi_gt"], seen["samples"] = gt_boxes.clone(), real_sample(props, gt_boxes, *a, **k)
        return seen["samples"]

    def mask_targets(gt_masks, matched, rois, *a, **k):
        seen["mask"] = gt_masks.shape, rois.clone()
        return real_masks(gt_masks, matched, rois, *a, **k)

    monkeypatch.setattr(rpn, "rpn_targets", rpn_targets)
    monkeypatch.setattr(dh, "sample_rois", sample_rois)
    monkeypatch.setattr(dh, "mask_targets", mask_targets)
    losses = det.losses([torch.rand(3, 50, 200)], [{"boxes": gt, "labels": torch.tensor([1, 2]), "masks": masks}])
    assert torch.isfinite(losses["loss"])
    resized = torch.tensor([[10.0, 5, 30, 20], [50, 0, 90, 25]])  # gt * 0.5
    boxes, valid = seen["rpn"]
    assert torch.allclose(boxes, resized[None]) and valid.all()
    assert torch.allclose(seen["roi_gt"], resized)
    s = seen["samples"]
    fg = s["labels"] > 0
    assert fg.any()
    shape, rois = seen["mask"]  # RoIs cut the gt masks in their (original) pixels: the sampled boxes / 0.5
    assert shape == (2, 50, 200) and torch.allclose(rois, s["boxes"][fg] * 2)


# ---------------------------------------------------------------- Cascade R-CNN
class _Fixed(torch.nn.Module):
    """A stage's box predictor that returns given logits and deltas whatever its input."""

    def __init__(self, logits, deltas):
        super().__init__()
        self.out = (logits, deltas)

    def forward(self, h):
        return self.out


def _fix_cascade(monkeypatch, det, logits, deltas):
    """Stage k returns logits[k], deltas[k]; det.pool records the boxes of each call. -> that record."""
    for stage, lg, d in zip(det.stages, logits, deltas):
        monkeypatch.setattr(stage, "box_head", torch.nn.Identity())
        monkeypatch.setattr(stage, "box_predictor", _Fixed(lg, d))
    pooled = []

    def pool(feats, boxes, size=7):
        pooled.append([b.clone() for b in boxes])
        return torch.zeros(sum(len(b) for b in boxes), 1, size, size)

    monkeypatch.setattr(det, "pool", pool)
    return pooled


def test_scale_grad_identity_forward_scaled_backward():
    x = torch.randn(4, 3, requires_grad=True)
    y = dh.scale_grad(x, 1.0 / 3)
    assert torch.allclose(y, x, rtol=0, atol=1e-6)
    g = torch.randn(4, 3)
    y.backward(g)
    assert torch.allclose(x.grad, g / 3, rtol=0, atol=1e-6)


def test_cascade_losses_relabel_refine_and_stage_coders(monkeypatch):
    import rpn
    det = Detector(small("cascade", num_classes=2, **TINY)).train()
    G, gl = torch.tensor([[20.0, 20, 60, 60]]), torch.tensor([1])
    # IoU with G: 0.82 (refined towards G below), 0.55 (fg at 0.5 only), 0.65 (fg at 0.5 and 0.6), 0
    rois = torch.tensor([[16.0, 20, 56, 60], [20, 20, 60, 42], [20, 20, 60, 46], [70, 70, 90, 90]])
    labels, matched = dh.label_rois(rois, G, gl, 0.5)
    assert labels.tolist() == [1, 1, 1, 0]
    d = torch.zeros(4, 4)
    d[0, 0] = 0.5  # RoI 0 moves right by 0.5 / wx of its width: 2 px at stage 1 (wx 10), 1 px at stage 2 (wx 20)
    calls = []
    real_loss = dh.fast_rcnn_loss

    def fast_rcnn_loss(logits, deltas, labels, targets, beta=0.0, keep=None):
        calls.append((labels.clone(), targets.clone()))
        assert keep is None or keep.all()  # no box collapses here
        return real_loss(logits, deltas, labels, targets, beta, keep)

    monkeypatch.setattr(dh, "fast_rcnn_loss", fast_rcnn_loss)
    pooled = _fix_cascade(monkeypatch, det, [torch.zeros(4, 3)] * 3, [d, d, torch.zeros(4, 4)])
    out = det._cascade_losses(None, [{"boxes": rois, "labels": labels, "matched": matched}], [G], [gl], [(100, 100)])
    assert set(out) == {f"loss_{n}_s{k}" for n in ("cls", "box") for k in (1, 2, 3)}
    # stage inputs: the sampled RoIs, then each stage's refinement with its own coder (detached, clipped)
    b2, b3 = rois.clone(), rois.clone()
    b2[0], b3[0] = torch.tensor([18.0, 20, 58, 60]), torch.tensor([19.0, 20, 59, 60])
    assert len(pooled) == 3
    for got, want in zip(pooled, [rois, b2, b3]):
        assert torch.allclose(got[0], want, atol=1e-5)
    # relabelled at IoU 0.5 / 0.6 / 0.7
    assert [c[0].tolist() for c in calls] == [[1, 1, 1, 0], [1, 0, 1, 0], [1, 0, 0, 0]]
    # RoI 0's targets by hand: dx = wx_k * (40 - centre_x) / 40
    assert [c[1][0].tolist() for c in calls] == [pytest.approx([1.0, 0, 0, 0], abs=1e-5),
                                                 pytest.approx([1.0, 0, 0, 0], abs=1e-5),
                                                 pytest.approx([0.75, 0, 0, 0], abs=1e-5)]
    for (lab, t), boxes, w in zip(calls, [rois, b2, b3], dh.CASCADE_WEIGHTS):
        want = torch.where((lab > 0)[:, None], rpn.encode_boxes(G.expand(4, 4), boxes, w), 0.0)
        assert torch.allclose(t, want, atol=1e-5)


def test_fast_rcnn_loss_keep_is_dropping():
    """keep=mask gives the loss of the kept RoIs alone (mean over them), e.g. without collapsed cascade boxes."""
    g = torch.Generator().manual_seed(0)
    logits, deltas = torch.randn(6, 3, generator=g), torch.randn(6, 12, generator=g)  # C = 2
    targets = torch.randn(6, 4, generator=g)
    labels, keep = torch.tensor([2, 0, 1, 1, 0, 2]), torch.tensor([True, True, False, True, False, False])
    for beta in (0.0, 1.0 / 9):
        got = dh.fast_rcnn_loss(logits, deltas, labels, targets, beta, keep)
        want = dh.fast_rcnn_loss(logits[keep], deltas[keep], labels[keep], targets[keep], beta)
        assert torch.allclose(torch.stack(got), torch.stack(want), atol=1e-6)
    none = dh.fast_rcnn_loss(logits, deltas, labels, targets, 0.0, torch.zeros(6, dtype=torch.bool))
    assert [v.item() for v in none] == [0.0, 0.0]
    assert dh.nonempty(torch.tensor([[0.0, 0, 1, 1], [5, 5, 5, 9], [5, 5, 9, 5], [3, 3, 2, 4]])).tolist() == \
        [True, False, False, False]


def test_cascade_boxes_clipped_to_nothing_count_in_no_later_stage(monkeypatch):
    """detectron2 drops a refined box that clipping leaves empty before the next stage: it is neither a
    background RoI of stage 2 nor of stage 3 (our losses mask it out instead, no host sync)."""
    det = Detector(small("cascade", num_classes=2, **TINY)).train()
    G, gl = torch.tensor([[20.0, 20, 60, 60]]), torch.tensor([1])
    rois = torch.tensor([[20.0, 20, 60, 60], [70, 70, 90, 90]])
    labels, matched = dh.label_rois(rois, G, gl, 0.5)
    d = torch.zeros(2, 4)
    d[1, 0] = 100.0  # RoI 1 moves right by 10 widths at stage 1: clipped to x1 = x2 = 100, empty
    lg = torch.tensor([[0.0, 3.0, 0.0], [0.0, 0.0, 2.0]])  # (2, C+1)
    _fix_cascade(monkeypatch, det, [lg] * 3, [d, torch.zeros(2, 4), torch.zeros(2, 4)])
    out = det._cascade_losses(None, [{"boxes": rois, "labels": labels, "matched": matched}], [G], [gl], [(100, 100)])
    ce = torch.nn.functional.cross_entropy(lg, torch.tensor([1, 0]), reduction="none")
    assert torch.isclose(out["loss_cls_s1"], ce.mean())  # stage 1: both RoIs
    for k in (2, 3):  # RoI 0 alone (still IoU 1 with G)
        assert torch.isclose(out[f"loss_cls_s{k}"], ce[0]), k


def test_cascade_predict_mean_scores_last_stage_boxes(monkeypatch):
    det = Detector(small("cascade", num_classes=3, **TINY)).eval()
    props = [torch.tensor([[20.0, 20, 60, 60], [0, 0, 10, 10]])]
    p = [torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]]),
         torch.tensor([[0.1, 0.6, 0.2, 0.1], [0.7, 0.1, 0.1, 0.1]]),
         torch.tensor([[0.1, 0.8, 0.05, 0.05], [0.7, 0.1, 0.1, 0.1]])]  # softmax(log p) = p
    d = torch.zeros(3, 2, 4)
    d[0, 0, 0] = 1.0  # stage 1 (wx 10): x + 0.1 w = +4 px
    d[1, 0, 1] = 2.0  # stage 2 (wy 20): y + 0.1 h = +4 px
    d[2, 0, 2] = 15.0 * math.log(2)  # stage 3 (ww 15): width x 2 about the centre
    pooled = _fix_cascade(monkeypatch, det, [q.log() for q in p], list(d))
    boxes, scores = det._cascade_predict(None, props, [(100, 100)])
    assert torch.allclose(scores, torch.tensor([[0.55, 0.5 / 3, 0.4 / 3], [0.1, 0.1, 0.1]]), atol=1e-6)
    want = torch.tensor([[4.0, 24, 84, 64], [0, 0, 10, 10]])  # [20, 20, 60, 60] -> +4 x -> +4 y -> width 80
    assert boxes.shape == (2, 3, 4) and torch.allclose(boxes, want[:, None].expand(2, 3, 4), atol=1e-4)
    assert torch.allclose(pooled[1][0][0], torch.tensor([24.0, 20, 64, 60]), atol=1e-4)
    assert torch.allclose(pooled[2][0][0], torch.tensor([24.0, 24, 64, 64]), atol=1e-4)
