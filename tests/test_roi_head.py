"""Tests for roi_head.py: level assignment (section 3.4), multi-level RoIAlign (Eqs. 2-4), the box head g."""
import pytest
import torch
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.ops import roi_align

from roi_head import BoxHead, assign_levels, multilevel_roi_align
from sync_ops import SyncOpCounter

STRIDES = (4, 8, 16, 32)


def square_boxes(sides, x0=3.0, y0=5.0):
    """(N, 4) xyxy squares of the given side lengths."""
    s = torch.tensor(sides, dtype=torch.float32)
    return torch.stack([torch.full_like(s, x0), torch.full_like(s, y0), x0 + s, y0 + s], dim=1)


def random_features(batch=2, channels=8, size=224, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, size // s, size // s, generator=g) for s in STRIDES]


# ---------------------------------------------------------------- assign_levels
def test_soco_levels_at_thresholds():
    boxes = square_boxes([47, 48, 49, 96, 97, 192, 193])
    assert assign_levels(boxes).tolist() == [0, 0, 1, 1, 2, 2, 3]


def test_soco_levels_use_sqrt_wh_not_side():
    # 32 x 72 has sqrt(wh) = 48 -> P2 even though its long side is 72; 40 x 72 -> sqrt = 53.7 -> P3.
    boxes = torch.tensor([[0.0, 0.0, 32.0, 72.0], [10.0, 10.0, 50.0, 82.0]])
    assert assign_levels(boxes).tolist() == [0, 1]


def test_soco_levels_custom_thresholds_and_num_levels():
    boxes = square_boxes([10, 30, 1000])
    assert assign_levels(boxes, thresholds=(20,), num_levels=2).tolist() == [0, 1, 1]
    assert assign_levels(boxes, num_levels=2).tolist() == [0, 0, 1]  # clamped to the last level


def test_fpn_levels():
    boxes = square_boxes([224, 112, 448, 223, 56, 20, 2000, 0])
    # k = floor(4 + log2(s / 224)): 224 -> P4, 112 -> P3, 448 -> P5, 223 -> P3, 56 -> P2, clamps at both ends.
    assert assign_levels(boxes, mode="fpn").tolist() == [2, 1, 3, 1, 0, 0, 3, 0]
    assert assign_levels(boxes, mode="fpn", k0=5).tolist() == [3, 2, 3, 2, 1, 0, 3, 0]


def test_unknown_mode_raises():
    with pytest.raises(ValueError):
        assign_levels(square_boxes([10]), mode="area")


# ---------------------------------------------------------------- multilevel_roi_align
def expected_box_by_box(features, boxes, sampling_ratio, mode="soco"):
    """torchvision.ops.roi_align of each box alone, on its assigned level, in input order."""
    rows = []
    for img, b in enumerate(boxes):
        for box in b:
            lvl = int(assign_levels(box[None], mode=mode)[0])
            rows.append(roi_align(features[lvl][img:img + 1], [box[None]], 7, spatial_scale=1.0 / STRIDES[lvl],
                                  sampling_ratio=sampling_ratio, aligned=True))
    return torch.cat(rows)


@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_multilevel_matches_torchvision_box_by_box(sampling_ratio):
    feats = random_features()
    # Mixed order of levels inside each image; fractional coordinates; non-square boxes.
    boxes = [torch.tensor([[10.5, 20.0, 200.0, 210.0], [5.0, 5.0, 30.0, 40.0], [50.0, 60.0, 120.0, 130.25]]),
             torch.tensor([[100.0, 30.0, 190.0, 200.0], [0.0, 0.0, 224.0, 224.0], [64.0, 64.0, 100.0, 90.0],
                           [1.0, 2.0, 60.0, 70.0]])]
    levels = assign_levels(torch.cat(boxes))
    assert set(levels.tolist()) == {0, 1, 2, 3}  # every level is exercised
    out = multilevel_roi_align(feats, boxes, STRIDES, sampling_ratio=sampling_ratio)
    assert out.shape == (7, 8, 7, 7)
    torch.testing.assert_close(out, expected_box_by_box(feats, boxes, sampling_ratio))


def test_multilevel_fpn_mode_matches_torchvision():
    feats = random_features(seed=1)
    boxes = [torch.tensor([[0.0, 0.0, 224.0, 224.0], [10.0, 10.0, 66.0, 66.0]]),
             torch.tensor([[20.0, 30.0, 132.0, 142.0]])]
    out = multilevel_roi_align(feats, boxes, STRIDES, mode="fpn")
    torch.testing.assert_close(out, expected_box_by_box(feats, boxes, 0, mode="fpn"))


def test_multilevel_pools_on_own_level_only():
    # Zero every level except P4: boxes assigned to P4 get features, the others get exactly zero.
    feats = [torch.zeros(1, 4, 224 // s, 224 // s) for s in STRIDES]
    feats[2] = torch.ones_like(feats[2])
    boxes = [square_boxes([30, 150, 70, 180], x0=10.0, y0=10.0)]  # levels 0, 2, 1, 2
    out = multilevel_roi_align(feats, boxes, STRIDES)
    per_box = out.abs().flatten(1).sum(1)
    assert (per_box > 0).tolist() == [False, True, False, True]


def test_multilevel_empty_levels_and_images():
    feats = random_features(seed=2)
    small = square_boxes([20, 30])  # both on P2; P3..P5 get nothing
    boxes = [torch.zeros(0, 4), small]  # image 0 has no boxes
    out = multilevel_roi_align(feats, boxes, STRIDES)
    assert out.shape == (2, 8, 7, 7)
    torch.testing.assert_close(out, expected_box_by_box(feats, boxes, 0))


def test_multilevel_zero_boxes_total():
    feats = random_features(seed=3)
    out = multilevel_roi_align(feats, [torch.zeros(0, 4), torch.zeros(0, 4)], STRIDES)
    assert out.shape == (0, 8, 7, 7) and out.dtype == feats[0].dtype


@pytest.mark.parametrize("sync_free", [True, False])
def test_multilevel_gradient_reaches_used_levels_only(sync_free):
    feats = [f.requires_grad_(True) for f in random_features(batch=1, seed=4)]
    boxes = [square_boxes([30, 150])]  # P2 and P4
    multilevel_roi_align(feats, boxes, STRIDES, sync_free=sync_free).sum().backward()
    used = [f.grad is not None and bool(f.grad.abs().sum() > 0) for f in feats]
    assert used == [True, False, True, False]
    # an unused level: a zero gradient on the sync-free path (it is in the graph), none on the grouped one
    assert [f.grad is None for f in feats] == [False, not sync_free, False, not sync_free]


@pytest.mark.parametrize("sync_free", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_multilevel_bitwise_box_by_box_with_gradients_and_edge_boxes(sampling_ratio, sync_free):
    # Boxes on every level, on the map's edges and partly outside the view (224 px): the other levels' copies of a
    # box, parked off the map, must add exactly 0 to its output and to the gradients.
    feats = [f.requires_grad_(True) for f in random_features(seed=5)]
    boxes = [torch.tensor([[0.0, 0.0, 224.0, 224.0], [200.0, 190.0, 236.0, 230.0], [-8.0, -4.0, 52.0, 60.0]]),
             torch.tensor([[180.0, 0.0, 224.0, 44.0], [0.0, 100.0, 120.0, 224.0], [30.0, 30.5, 130.0, 131.0]])]
    assert set(assign_levels(torch.cat(boxes)).tolist()) == {0, 1, 2, 3}
    out = multilevel_roi_align(feats, boxes, STRIDES, sampling_ratio=sampling_ratio, sync_free=sync_free)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, feats, g)
    ref = expected_box_by_box(feats, boxes, sampling_ratio)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for got, want in zip(grads, torch.autograd.grad(ref, feats, g)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # the same sums, in another order


@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_multilevel_sync_free_path_makes_no_host_sync(sampling_ratio):
    # Issue 7 (fast path): no op whose result the host must wait for (counted on CPU; a CUDA sync each on a GPU).
    feats = [f.requires_grad_(True) for f in random_features(seed=6)]
    boxes = [square_boxes([30, 70, 150, 210]), square_boxes([40, 100])]
    with SyncOpCounter() as counter:
        multilevel_roi_align(feats, boxes, STRIDES, sampling_ratio=sampling_ratio, sync_free=True).sum().backward()
        multilevel_roi_align(feats, boxes, STRIDES, mode="fpn", sync_free=True).sum().backward()
    assert counter.counts == {}
    with SyncOpCounter() as counter:  # the CPU default groups by level: its one read of the counts is counted
        multilevel_roi_align(feats, boxes, STRIDES, sampling_ratio=sampling_ratio)
    assert counter.counts == {"aten::bincount": 1, "Tensor.tolist": 1}


def test_sync_counter_counts_what_waits_for_the_device():
    x = torch.arange(6.0)
    with SyncOpCounter() as counter:
        x[1].item()
        x.tolist()
        x[x > 2]
        torch.where(x > 1)
        torch.bincount(x.long())
        x.repeat_interleave(torch.ones(6, dtype=torch.long))
        x * 2 + torch.where(x > 1, x, 0.0)  # elementwise work, no sync
    assert counter.counts == {"aten::_local_scalar_dense": 1, "Tensor.tolist": 1, "aten::index(bool mask)": 1,
                              "aten::nonzero": 1, "aten::bincount": 1, "aten::repeat_interleave(tensor repeats)": 1}
    assert counter.total == 6 and torch.Tensor.tolist is not None and x.tolist()[2] == 2.0  # tolist restored


def test_multilevel_rejects_mismatched_inputs():
    feats = random_features()
    with pytest.raises(ValueError):
        multilevel_roi_align(feats, [square_boxes([30])], STRIDES)  # 1 box list for 2 images
    with pytest.raises(ValueError):
        multilevel_roi_align(feats, [square_boxes([30])] * 2, STRIDES[:3])


# ---------------------------------------------------------------- BoxHead
@pytest.mark.parametrize("kind,norm", [("4conv1fc", "bn"), ("4conv1fc", "gn"), ("4conv1fc", "none"), ("2fc", "bn")])
def test_box_head_shapes_and_gradients(kind, norm):
    torch.manual_seed(0)
    head = BoxHead(kind=kind, norm=norm)
    x = torch.randn(6, 256, 7, 7, requires_grad=True)
    h = head(x)
    assert h.shape == (6, 1024)
    assert (h >= 0).all()  # ends with a ReLU
    h.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, prm in head.named_parameters():
        assert prm.grad is not None and prm.grad.abs().sum() > 0, name


def test_box_head_structure():
    head = BoxHead()
    assert len(head.convs) == 4 and len(head.fcs) == 1
    assert head.fcs[0].in_features == 256 * 7 * 7 == 12544
    assert head.convs[0].conv.bias is None  # no bias before BN
    assert isinstance(head.convs[3].norm, torch.nn.BatchNorm2d)
    keys = head.state_dict().keys()
    assert {"convs.0.conv.weight", "convs.3.norm.running_mean", "fcs.0.weight"} <= set(keys)
    two = BoxHead(kind="2fc")
    assert len(two.convs) == 0 and [fc.out_features for fc in two.fcs] == [1024, 1024]
    assert BoxHead(norm="none").convs[0].conv.bias is not None
    with pytest.raises(ValueError):
        BoxHead(kind="3fc")


@pytest.mark.parametrize("kind,norm", [("4conv1fc", "bn"), ("4conv1fc", "gn"), ("2fc", "bn")])
def test_box_head_maps_onto_torchvision(kind, norm):
    torch.manual_seed(1)
    head = BoxHead(in_channels=32, kind=kind, conv_dim=32, fc_dim=64, norm=norm).eval()
    for m in head.modules():  # non-trivial BN statistics, so a wrong mapping shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    norm_layer = {"bn": torch.nn.BatchNorm2d, "gn": lambda c: torch.nn.GroupNorm(32, c)}[norm]
    tv = FastRCNNConvFCHead((32, 7, 7), [32] * len(head.convs), [64] * len(head.fcs), norm_layer=norm_layer).eval()
    mapping = head.torchvision_key_map()
    tv.load_state_dict({mapping[k]: v for k, v in head.state_dict().items()}, strict=True)
    x = torch.randn(3, 32, 7, 7)
    torch.testing.assert_close(head(x), tv(x))
