"""Tests for rpn.py (paper 3.1, Eq. 1, 4.1.3): anchors, matching, sampling, box coding, Eq. 1, proposals, head."""
import math
import os
import sys

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder, Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rpn  # noqa: E402

SIZES = (24, 48, 96, 192)
STRIDES = (4, 8, 16, 32)
FEATS_64 = [(16, 16), (8, 8), (4, 4), (2, 2)]  # a 64 x 64 image on P2..P5


def random_boxes(g, B, M, size=64, lo=6, hi=60):
    wh = lo + (hi - lo) * torch.rand(B, M, 2, generator=g)
    xy = torch.rand(B, M, 2, generator=g) * (size - wh)
    return torch.cat([xy, xy + wh], dim=-1)  # (B, M, 4)


# ---------------------------------------------------------------- anchors
def test_anchor_count_area_ratio_centres():
    feats = [(7, 5), (4, 3), (2, 2), (1, 1)]
    anchors = rpn.make_anchors(feats, STRIDES, SIZES)
    assert len(anchors) == 4
    for (h, w), s, size, a in zip(feats, STRIDES, SIZES, anchors):
        assert a.shape == (h * w * 3, 4) and a.dtype == torch.float32
        aw, ah = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
        torch.testing.assert_close(aw * ah, torch.full_like(aw, size ** 2), rtol=1e-5, atol=0)
        torch.testing.assert_close(ah / aw, torch.tensor([0.5, 1.0, 2.0]).repeat(h * w), rtol=1e-5, atol=0)
        cx, cy = (a[:, 0] + a[:, 2]) / 2, (a[:, 1] + a[:, 3]) / 2
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        torch.testing.assert_close(cx, (xs.reshape(-1) * s).float().repeat_interleave(3), atol=1e-4, rtol=0)
        torch.testing.assert_close(cy, (ys.reshape(-1) * s).float().repeat_interleave(3), atol=1e-4, rtol=0)


def test_anchors_match_torchvision_anchor_generator():
    H, W = 96, 64
    feats = [(H // s, W // s) for s in STRIDES]
    ours = torch.cat(rpn.make_anchors(feats, STRIDES, SIZES))
    gen = AnchorGenerator(sizes=tuple((s,) for s in SIZES), aspect_ratios=((0.5, 1.0, 2.0),) * 4)
    images = ImageList(torch.zeros(1, 3, H, W), [(H, W)])
    fmaps = [torch.zeros(1, 8, h, w) for h, w in feats]
    theirs = gen(images, fmaps)[0]
    assert ours.shape == theirs.shape
    diff = (ours - theirs).abs().max()
    assert diff <= 0.5  # torchvision rounds its base anchors (half-sides) to integers; same order
    assert diff > 0  # ...and ours are not rounded (24 / sqrt(2) is not an integer)


# ---------------------------------------------------------------- matching
def torchvision_labels(anchors, boxes):
    """Matcher(0.7, 0.3, low quality) on one image: -1 -> 0 (negative), -2 -> -1 (ignored), idx >= 0 -> 1."""
    idx = Matcher(0.7, 0.3, allow_low_quality_matches=True)(box_iou(boxes, anchors))
    labels = torch.where(idx >= 0, 1, torch.where(idx == -1, 0, -1))
    return labels, idx


def test_matching_equals_torchvision_matcher_on_random_boxes():
    g = torch.Generator().manual_seed(0)
    anchors = torch.cat(rpn.make_anchors(FEATS_64, STRIDES, SIZES))
    boxes = random_boxes(g, 4, 5)
    labels, matched = rpn.match_anchors(anchors, boxes)
    assert labels.shape == matched.shape == (4, anchors.shape[0]) and labels.dtype == torch.int64
    for b in range(4):
        ref, idx = torchvision_labels(anchors, boxes[b])
        assert torch.equal(labels[b], ref)
        pos = ref == 1
        assert torch.equal(matched[b][pos], idx[pos])
    assert (labels == 1).sum() > 0 and (labels == -1).sum() > 0 and (labels == 0).sum() > 0


def test_matching_exact_ties_are_all_positive():
    anchors = torch.cat(rpn.make_anchors(FEATS_64, STRIDES, SIZES))
    # a 30 x 30 box centred at (10, 10) contains exactly the four 24 x 24 anchors centred at (8|12, 8|12):
    # each has IoU 576 / 900 = 0.64 < 0.7, a four-way tie for this box's best anchor
    boxes = torch.tensor([[[-5.0, -5.0, 25.0, 25.0], [30.0, 20.0, 60.0, 50.0]]])
    labels, matched = rpn.match_anchors(anchors, boxes)
    ref, _ = torchvision_labels(anchors, boxes[0])
    assert torch.equal(labels[0], ref)
    iou0 = box_iou(boxes[0, :1], anchors)[0]
    tied = (iou0 - 0.64).abs() < 1e-6
    assert tied.sum() == 4 and (labels[0][tied] == 1).all() and (matched[0][tied] == 0).all()


def test_matching_zero_boxes_padding_and_zero_iou_box():
    anchors = torch.cat(rpn.make_anchors(FEATS_64, STRIDES, SIZES))
    N = anchors.shape[0]
    labels, matched = rpn.match_anchors(anchors, torch.zeros(2, 0, 4))
    assert labels.shape == (2, N) and (labels == 0).all() and (matched == 0).all()
    g = torch.Generator().manual_seed(1)
    boxes = random_boxes(g, 2, 3)
    ref, ref_m = rpn.match_anchors(anchors, boxes)
    # pad with two boxes that would match if they were valid (copies of other images' boxes, an anchor itself)
    pad = torch.stack([torch.stack([boxes[1, 0], anchors[100]]), torch.stack([boxes[0, 1], anchors[5]])])
    valid = torch.tensor([[True] * 3 + [False] * 2] * 2)
    labels, matched = rpn.match_anchors(anchors, torch.cat([boxes, pad], dim=1), valid)
    assert torch.equal(labels, ref) and torch.equal(matched, ref_m)
    labels, _ = rpn.match_anchors(anchors, boxes, torch.zeros(2, 3, dtype=torch.bool))
    assert (labels == 0).all()
    # a box that overlaps no anchor: no positive (torchvision would mark every IoU-0 anchor positive)
    far = torch.tensor([[[1000.0, 1000.0, 1010.0, 1010.0]]])
    assert (rpn.match_anchors(anchors, far)[0] == 0).all()
    assert (rpn.match_anchors(anchors, far, zero_iou_low_quality=True)[0] == 1).all()
    padded = torch.cat([boxes, torch.zeros(2, 1, 4)], dim=1)  # a padded box is never any anchor's best match either
    valid = torch.tensor([[True] * 3 + [False]] * 2)
    assert torch.equal(rpn.match_anchors(anchors, padded, valid, zero_iou_low_quality=True)[0], ref)


def test_matching_threshold_boundaries():
    # IoU with box [0, 0, 10, 7]: 1 (its best), 0.7 exactly (positive), 0.3 exactly (ignored), 20/70 (negative)
    anchors = torch.tensor([[0.0, 0, 10, 7], [0, 0, 10, 10], [0, 0, 7, 3], [0, 0, 10, 2]])
    boxes = torch.tensor([[[0.0, 0, 10, 7]]])
    labels, _ = rpn.match_anchors(anchors, boxes)
    assert labels[0].tolist() == [1, 1, -1, 0]
    assert torch.equal(labels[0], torchvision_labels(anchors, boxes[0])[0])


# ---------------------------------------------------------------- sampling
def test_sampling_counts_and_determinism():
    N = 2000
    labels = torch.full((3, N), -1)
    labels[0, :300], labels[0, 300:800] = 1, 0  # many positives: 128 + 128
    labels[1, :10], labels[1, 10:1000] = 1, 0  # few positives: 10 + 246
    labels[2, :5], labels[2, 5:50] = 1, 0  # few of both: everything kept
    out = rpn.sample_anchors(labels, generator=torch.Generator().manual_seed(0))
    assert ((out == 1).sum(1) == torch.tensor([128, 10, 5])).all()
    assert ((out == 0).sum(1) == torch.tensor([128, 246, 45])).all()
    assert ((out == labels) | (out == -1)).all()  # only unsampling, never relabelling
    again = rpn.sample_anchors(labels, generator=torch.Generator().manual_seed(0))
    other = rpn.sample_anchors(labels, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again) and not torch.equal(out, other)
    small = rpn.sample_anchors(labels, batch_size_per_image=64, positive_fraction=0.25,
                               generator=torch.Generator().manual_seed(0))
    assert ((small == 1).sum(1) == torch.tensor([16, 10, 5])).all()
    assert ((small >= 0).sum(1) == torch.tensor([64, 64, 50])).all()


# ---------------------------------------------------------------- box coding
@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_box_coding_round_trip_and_torchvision(weights):
    g = torch.Generator().manual_seed(2)
    boxes, anchors = random_boxes(g, 1, 50)[0], random_boxes(g, 1, 50)[0]
    d = rpn.encode_boxes(boxes, anchors, weights)
    coder = BoxCoder(weights)
    torch.testing.assert_close(d, coder.encode_single(boxes, anchors))
    torch.testing.assert_close(rpn.decode_boxes(d, anchors, weights), boxes, atol=1e-4, rtol=1e-5)
    noise = torch.randn(50, 4, generator=g)
    torch.testing.assert_close(rpn.decode_boxes(noise, anchors, weights), coder.decode_single(noise, anchors))
    # batched shapes (B, N, 4)
    assert rpn.encode_boxes(boxes.view(5, 10, 4), anchors.view(5, 10, 4), weights).shape == (5, 10, 4)


def _four_coordinates(b):  # the previous rpn.py's coders, one coordinate at a time (frozen here)
    w, h = b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]
    return b[..., 0] + 0.5 * w, b[..., 1] + 0.5 * h, w, h


def _encode_4(boxes, anchors, weights):
    wx, wy, ww, wh = weights
    ax, ay, aw, ah = _four_coordinates(anchors)
    gx, gy, gw, gh = _four_coordinates(boxes)
    return torch.stack([wx * (gx - ax) / aw, wy * (gy - ay) / ah, ww * torch.log(gw / aw), wh * torch.log(gh / ah)],
                       dim=-1)


def _decode_4(deltas, anchors, weights):
    dtype = torch.promote_types(deltas.dtype, torch.float32)  # at least float32, as rpn.decode_boxes
    deltas, anchors = deltas.to(dtype), anchors.to(dtype)
    wx, wy, ww, wh = weights
    ax, ay, aw, ah = _four_coordinates(anchors)
    dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
    dw, dh = (deltas[..., 2] / ww).clamp(max=rpn.BBOX_CLAMP), (deltas[..., 3] / wh).clamp(max=rpn.BBOX_CLAMP)
    cx, cy, w, h = dx * aw + ax, dy * ah + ay, torch.exp(dw) * aw, torch.exp(dh) * ah
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_pairwise_coders_equal_the_four_coordinate_formulas_bit_for_bit(dtype):
    """encode_boxes / decode_boxes / pairwise_iou work on (x, y) and (w, h) pairs (fewer operators: kernel launches
    on a GPU); the same arithmetic in the same order as one coordinate at a time, so the same bits."""
    g = torch.Generator().manual_seed(11)
    boxes, anchors = random_boxes(g, 3, 9).to(dtype), random_boxes(g, 3, 9).to(dtype)
    deltas = (torch.randn(3, 9, 4, generator=g) * 2).to(dtype)
    for w in [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0), (30.0, 30.0, 15.0, 15.0), (1.0, 2.0, 3.0, 4.0)]:
        assert torch.equal(rpn.encode_boxes(boxes, anchors, w), _encode_4(boxes, anchors, w)), w
        assert torch.equal(rpn.decode_boxes(deltas, anchors, w), _decode_4(deltas, anchors, w)), w
    a = anchors[0]  # (N, 4)
    area = lambda b: (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)  # noqa: E731
    lt = torch.maximum(boxes[..., None, :2], a[:, :2])
    wh = (torch.minimum(boxes[..., None, 2:], a[:, 2:]) - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    iou = inter / (area(boxes)[..., None] + area(a) - inter).clamp(min=torch.finfo(inter.dtype).tiny)
    assert torch.equal(rpn.pairwise_iou(boxes, a), iou)


def test_decode_clamp():
    anchor = torch.tensor([[0.0, 0.0, 32.0, 16.0]])
    out = rpn.decode_boxes(torch.tensor([[0.0, 0.0, 50.0, 100.0]]), anchor)
    torch.testing.assert_close(out[0, 2] - out[0, 0], torch.tensor(32.0 * 1000 / 16))
    torch.testing.assert_close(out[0, 3] - out[0, 1], torch.tensor(16.0 * 1000 / 16))
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------- Eq. 1
def test_eq1_hand_computed_two_anchors():
    logits = torch.tensor([[2.0, -1.0]], requires_grad=True)
    deltas = torch.tensor([[[0.05, 0.5, 0.0, -0.2], [7.0, -7.0, 3.0, 3.0]]], requires_grad=True)
    labels = torch.tensor([[1, 0]])
    targets = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [100.0, 100.0, 100.0, 100.0]]])  # 2nd: negative, unused
    loss_cls, loss_reg = rpn.rpn_loss(logits, deltas, labels, targets)
    # log loss: -log(sigmoid(2)) for the positive, -log(1 - sigmoid(-1)) for the negative; N_cls = 2
    cls = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(-1.0))) / 2
    # smooth L1, beta = 1/9: 0.5 x^2 / beta if |x| < beta else |x| - beta / 2; positive anchor only; N_reg = 2
    beta = 1 / 9
    reg = (0.5 * 0.05 ** 2 / beta + (0.5 - beta / 2) + 0.0 + (0.2 - beta / 2)) / 2
    assert loss_cls.dim() == 0 and loss_reg.dim() == 0
    assert abs(loss_cls.item() - cls) < 1e-6 and abs(loss_reg.item() - reg) < 1e-6
    _, loss_reg2 = rpn.rpn_loss(logits, deltas, labels, targets, lam=2.0)
    assert abs(loss_reg2.item() - 2 * reg) < 1e-6
    (loss_cls + loss_reg).backward()
    assert (deltas.grad[0, 1] == 0).all() and (deltas.grad[0, 0, :2] != 0).all()
    # an ignored anchor (-1) changes nothing
    c3, r3 = rpn.rpn_loss(torch.tensor([[2.0, -1.0, 5.0]]), torch.cat([deltas, deltas[:, :1]], 1).detach(),
                          torch.tensor([[1, 0, -1]]), torch.cat([targets, targets[:, :1]], 1))
    assert abs(c3.item() - cls) < 1e-6 and abs(r3.item() - reg) < 1e-6


def test_eq1_leading_dim_is_the_mean_of_separately_normalised_batches():
    """(V, B, N) inputs (model.py batches V1 and V2): each of the V batches divided by its own N_cls, then the mean;
    not one batch of V * B images (that would weight the view with more sampled anchors more)."""
    g = torch.Generator().manual_seed(5)
    logits, deltas, targets = torch.randn(2, 3, 10, generator=g), torch.randn(2, 3, 10, 4, generator=g), \
        torch.randn(2, 3, 10, 4, generator=g)
    labels = torch.randint(-1, 2, (2, 3, 10), generator=g)
    labels[1, :, 4:] = -1  # the second batch samples fewer anchors
    each = [rpn.rpn_loss(logits[v], deltas[v], labels[v], targets[v]) for v in range(2)]
    both = rpn.rpn_loss(logits, deltas, labels, targets)
    for k in range(2):
        assert both[k].dim() == 0
        torch.testing.assert_close(both[k], (each[0][k] + each[1][k]) / 2)
    pooled = rpn.rpn_loss(logits.flatten(0, 1), deltas.flatten(0, 1), labels.flatten(0, 1), targets.flatten(0, 1))
    assert (pooled[0] - both[0]).abs() > 1e-3  # the test can tell the two normalisations apart


def test_eq1_image_without_boxes():
    anchors = torch.cat(rpn.make_anchors(FEATS_64, STRIDES, SIZES))
    labels, t = rpn.rpn_targets(anchors, torch.zeros(2, 0, 4), generator=torch.Generator().manual_seed(0))
    assert (labels == 1).sum() == 0 and ((labels == 0).sum(1) == 256).all() and (t == 0).all()
    logits = torch.randn(2, anchors.shape[0], requires_grad=True)
    deltas = torch.randn(2, anchors.shape[0], 4, requires_grad=True)
    loss_cls, loss_reg = rpn.rpn_loss(logits, deltas, labels, t)
    assert torch.isfinite(loss_cls) and loss_cls > 0 and loss_reg.item() == 0.0
    # nothing sampled at all: still finite (N_cls clamped at 1)
    loss_cls, loss_reg = rpn.rpn_loss(logits, deltas, torch.full_like(labels, -1), t)
    assert loss_cls.item() == 0.0 and loss_reg.item() == 0.0


def test_rpn_targets_decode_back_to_boxes():
    g = torch.Generator().manual_seed(3)
    anchors = torch.cat(rpn.make_anchors(FEATS_64, STRIDES, SIZES))
    boxes = random_boxes(g, 2, 4)
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    labels, t = rpn.rpn_targets(anchors, boxes, valid, generator=g)
    _, matched = rpn.match_anchors(anchors, boxes, valid)
    pos = labels == 1
    assert pos.any() and (t[~pos] == 0).all() and (matched[0][pos[0]] != 3).all()
    dec = rpn.decode_boxes(t, anchors.expand(2, -1, -1))
    want = torch.gather(boxes, 1, matched[..., None].expand(-1, -1, 4))
    torch.testing.assert_close(dec[pos], want[pos], atol=1e-3, rtol=1e-5)


def test_border_anchors_ignored_only_when_asked():
    """[19]'s rule (train.py --ignore-border-anchors): every anchor crossing the 64 x 64 image's border is ignored
    (-1) before sampling, the others keep their labels; by default they are labelled (our reading, rpn.py)."""
    g = torch.Generator().manual_seed(4)
    anchors = torch.cat(rpn.make_anchors(FEATS_64, STRIDES, SIZES))
    inside = rpn.inside_image(anchors, (64, 64))
    a = anchors[~inside]
    assert ((a[:, :2] < 0) | (a[:, 2:] > 64)).any(1).all() and ((anchors[inside] >= 0) & (anchors[inside] <= 64)).all()
    assert 0 < inside.sum() < len(anchors) and not inside[-12:].any()  # P5's 192 px anchors all cross a 64 px image
    boxes = random_boxes(g, 2, 4)
    keep_all = lambda labels, *a, **k: labels  # noqa: E731 (no sampling: the labels as matched)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(rpn, "sample_anchors", keep_all)
        plain, _ = rpn.rpn_targets(anchors, boxes)
        ruled, t = rpn.rpn_targets(anchors, boxes, image_size=(64, 64))
    assert (ruled[:, ~inside] == -1).all() and torch.equal(ruled[:, inside], plain[:, inside])
    assert (plain[:, ~inside] >= 0).any() and (t[:, ~inside] == 0).all()
    assert rpn.inside_image(anchors, (64, 96)).sum() > inside.sum()  # (H, W): a wider image keeps more


# ---------------------------------------------------------------- proposals
def test_proposals_nms_topn_clip_minsize():
    lvl0 = torch.tensor([[10.0, 10, 30, 30], [11, 11, 31, 31], [40, 40, 60, 60], [-10, -10, 20, 20],
                         [70, 70, 90, 90]])
    lvl1 = torch.tensor([[11.0, 11, 31, 31], [50, 50, 80, 80]])
    # anchors 0 and 1 overlap (IoU 0.82): NMS drops 0; anchor 4 lies outside the 64 x 64 image: clipped to nothing
    logits = torch.tensor([[3.0, 4.0, 2.0, 1.0, 9.0, 0.5, -1.0],
                           [1.0, 0.0, 2.0, 3.0, 9.0, -2.0, 5.0]])
    deltas = torch.zeros(2, 7, 4)
    out = rpn.generate_proposals(logits, deltas, [lvl0, lvl1], (64, 64), pre_nms_top_n=64, post_nms_top_n=3)
    assert len(out) == 2
    boxes, scores = out[0]
    # image 0: 9 (removed: empty after clipping), 4 (kept), 3 (suppressed by 4), 2, 1 (clipped), level 1: 0.5
    # (same box as anchor 1 but another level: kept), -1
    torch.testing.assert_close(boxes, torch.tensor([[11.0, 11, 31, 31], [40, 40, 60, 60], [0, 0, 20, 20]]))
    torch.testing.assert_close(scores, torch.sigmoid(torch.tensor([4.0, 2.0, 1.0])))
    boxes, scores = out[1]  # image 1: anchor 6 (clipped to the image) first
    torch.testing.assert_close(boxes, torch.tensor([[50.0, 50, 64, 64], [0, 0, 20, 20], [40, 40, 60, 60]]))
    # top 2 per level before NMS: level 0 keeps anchors 4 (then removed: empty) and 1; level 1 keeps both
    out = rpn.generate_proposals(logits, deltas, [lvl0, lvl1], (64, 64), pre_nms_top_n=2, post_nms_top_n=10)
    torch.testing.assert_close(out[0][0], torch.tensor([[11.0, 11, 31, 31], [11, 11, 31, 31], [50, 50, 64, 64]]))
    # deltas are applied: move anchor 2 of image 0 by half its width
    deltas[0, 2, 0] = 0.5
    out = rpn.generate_proposals(logits, deltas, [lvl0, lvl1], (64, 64), post_nms_top_n=2)
    torch.testing.assert_close(out[0][0][1], torch.tensor([50.0, 40, 64, 60]))


def test_proposals_defaults_on_real_anchors():
    anchors = rpn.make_anchors(FEATS_64, STRIDES, SIZES)
    N = sum(a.shape[0] for a in anchors)
    g = torch.Generator().manual_seed(4)
    out = rpn.generate_proposals(torch.randn(3, N, generator=g), 0.1 * torch.randn(3, N, 4, generator=g),
                                 anchors, (64, 64))
    for boxes, scores in out:
        assert boxes.shape == (4, 4) and scores.shape == (4,)  # K = 4 after NMS
        assert (boxes >= 0).all() and (boxes <= 64).all()
        assert (scores[:-1] >= scores[1:]).all()


def test_proposals_per_image_sizes_equal_one_call_per_image():
    # The detector passes each image's own (H, W) in one call; it must equal calling per image.
    anchors = rpn.make_anchors(FEATS_64, STRIDES, SIZES)
    N = sum(a.shape[0] for a in anchors)
    g = torch.Generator().manual_seed(5)
    logits, deltas = torch.randn(3, N, generator=g), 0.3 * torch.randn(3, N, 4, generator=g)
    sizes = [(64, 48), (40, 64), (64, 64)]
    out = rpn.generate_proposals(logits, deltas, anchors, sizes, pre_nms_top_n=50, post_nms_top_n=20)
    for i, (h, w) in enumerate(sizes):
        boxes, scores = rpn.generate_proposals(logits[i:i + 1], deltas[i:i + 1], anchors, (h, w), 50, 20)[0]
        assert torch.equal(out[i][0], boxes) and torch.equal(out[i][1], scores)
        assert out[i][0][:, 2].max() <= w and out[i][0][:, 3].max() <= h and len(boxes) > 5


def test_cached_anchors_equal_make_anchors_and_are_built_once():
    key = (((16, 16), (8, 8), (4, 4), (2, 2)), STRIDES, SIZES, (0.5, 1.0, 2.0), torch.device("cpu"))
    first = rpn.cached_anchors(*key)
    for got, want in zip(first, rpn.make_anchors(*key[:4], device=key[4])):
        assert torch.equal(got, want)
    assert all(a is b for a, b in zip(rpn.cached_anchors(*key), first))


# ---------------------------------------------------------------- head
def test_rpn_head_shapes_layout_init_and_gradients():
    torch.manual_seed(0)
    head = rpn.RPNHead(in_channels=16, num_anchors=3)
    for conv in (head.c, head.o, head.d):
        assert (conv.bias == 0).all() and abs(conv.weight.std().item() - 0.01) < 0.003
    feats_hw = [(8, 6), (4, 3), (2, 2), (1, 1)]
    feats = [torch.randn(2, 16, h, w) for h, w in feats_hw]
    logits, deltas = head(feats)
    N = sum(a.shape[0] for a in rpn.make_anchors(feats_hw, STRIDES, SIZES))
    assert logits.shape == (2, N) and deltas.shape == (2, N, 4)
    # layout: index (y, x, a) on level 1 holds o(c(f))[b, a, y, x] and d(c(f))[b, 4a + k, y, x]
    h = torch.relu(head.c(feats[1]))
    o, d = head.o(h), head.d(h)
    y, x, a, b = 2, 1, 2, 1
    i = 8 * 6 * 3 + (y * 3 + x) * 3 + a
    torch.testing.assert_close(logits[b, i], o[b, a, y, x])
    torch.testing.assert_close(deltas[b, i], d[b, 4 * a:4 * a + 4, y, x])
    (logits.square().sum() + deltas.square().sum()).backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
