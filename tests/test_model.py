"""model.py: extractor shapes and names, one full online + target step per mode, view-to-view box mapping, export."""
import pytest
import torch
import torchvision

import byol
import model
import rpn


def boxes_for(B, K, size, seed=0):
    """Square boxes whose sides span all four SoCo levels (sqrt(wh) ~ 0.15, 0.3, 0.6, 0.95 x 224)."""
    g = torch.Generator().manual_seed(seed)
    side = torch.tensor([0.15, 0.3, 0.6, 0.95])[torch.arange(K) % 4] * size  # (K,)
    xy = torch.rand(B, K, 2, generator=g) * (size - side)[None, :, None]
    return torch.cat([xy, xy + side[None, :, None]], -1)  # (B, K, 4) xyxy


def test_feature_extractor_levels_and_torchvision_names():
    f = model.FeatureExtractor(depth=18, p6=True)
    feats = f(torch.randn(1, 3, 128, 96))
    assert [tuple(x.shape) for x in feats] == [(1, 256, 32, 24), (1, 256, 16, 12), (1, 256, 8, 6),
                                               (1, 256, 4, 3), (1, 256, 2, 2)]
    assert f.strides == (4, 8, 16, 32, 64)
    tv = {k for k in torchvision.models.resnet18(weights=None).state_dict() if not k.startswith("fc.")}
    assert set(f.backbone.state_dict()) == tv  # a local torchvision checkpoint loads by name


def test_backbone_loads_local_torchvision_checkpoint(tmp_path):
    ref = torchvision.models.resnet18(weights=None)
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    b = model.Backbone(18, weights_path=str(tmp_path / "r18.pth"))
    assert torch.equal(b.conv1.weight, ref.conv1.weight)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), tmp_path / "r50.pth")
    with pytest.raises(ValueError, match="r50.pth"):
        model.Backbone(18, weights_path=str(tmp_path / "r50.pth"))


def test_fpn_norms():
    kinds = {"bn": torch.nn.BatchNorm2d, "gn": torch.nn.GroupNorm, "none": torch.nn.Identity}
    for norm, kind in kinds.items():
        f = model.FeatureExtractor(depth=18, fpn_norm=norm)
        feats = f(torch.randn(2, 3, 64, 64))
        assert len(feats) == 4 and all(x.shape[1] == 256 for x in feats)
        blocks = [*f.fpn.lateral, *f.fpn.output]
        assert all(type(b.norm) is kind for b in blocks), norm
        assert all(b.conv.bias is None for b in blocks) == (norm != "none")  # a bias only without a norm
    assert f.fpn.lateral[0].norm is not None and model.make_norm("gn", 256).num_groups == 32


def views_and_boxes(B=2, K=4, size=224):
    torch.manual_seed(0)
    views = [torch.randn(B, 3, size, size), torch.randn(B, 3, size, size), torch.randn(B, 3, size // 2, size // 2)]
    boxes = [boxes_for(B, K, size, 1), boxes_for(B, K, size, 2), boxes_for(B, K, size // 2, 3)]
    return views, boxes


def test_joint_step_gradients_reach_online_and_rpn_only():
    net = model.ADePT("joint", depth=18)
    views, boxes = views_and_boxes()
    losses = net(views, boxes)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_rpn"] > 0 and -8 <= losses["loss_det"] <= 8  # Eq. 7 lies in [-8, 8]
    losses["loss"].backward()
    for name, p in net.named_parameters():
        if name.startswith("target."):
            assert p.grad is None and not p.requires_grad, name
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"no gradient for {name}"


def test_rpn_detached_by_default_and_switch():
    """Table 4: by default L_RPN does not reach the backbone; --rpn-grad-to-backbone lets it."""
    views, boxes = views_and_boxes(B=1, size=128)
    for flag, expect in ((False, False), (True, True)):
        net = model.ADePT("joint", depth=18, rpn_grad_to_backbone=flag)
        net(views, boxes)["loss_rpn"].backward()
        g = net.online.extractor.backbone.conv1.weight.grad
        assert (g is not None and g.abs().sum() > 0) == expect


def eq1_on(net, views, boxes, j, image_size=None):
    """Eq. 1 of view j (0-based) by hand from rpn.py's pieces, on detached features (the default); image_size: [19]'s
    border rule."""
    feats = [x.detach() for x in net.online.extractor(views[j])]
    logits, deltas = net.rpn(feats)
    anchors = torch.cat(rpn.make_anchors([tuple(x.shape[-2:]) for x in feats], sizes=net.anchor_sizes))
    labels, targets = rpn.rpn_targets(anchors, boxes[j], image_size=image_size)
    return sum(rpn.rpn_loss(logits, deltas, labels, targets))


def test_ignore_border_anchors_reaches_eq1(monkeypatch):
    """ignore_border_anchors (train.py --ignore-border-anchors): Eq. 1 of each view with its own size's border rule
    (V1, V2 at 64 px, V3 at 32 px); off, the loss differs."""
    monkeypatch.setattr(rpn, "sample_anchors", lambda labels, *a, **k: labels)  # every anchor: no randomness
    net = model.ADePT("joint", depth=18, fpn_channels=64, ignore_border_anchors=True).eval()
    views, boxes = views_and_boxes(B=2, size=64)
    with torch.no_grad():
        got = net(views, boxes)["loss_rpn"]
        want = sum(eq1_on(net, views, boxes, j, tuple(views[j].shape[-2:])) for j in range(3)) / 3
        assert torch.allclose(got, want, atol=2e-6)
        net.ignore_border_anchors = False
        assert not torch.allclose(net(views, boxes)["loss_rpn"], got, atol=1e-4)


def test_rpn_boxes_and_views_choose_eq1_targets(monkeypatch):
    """Eq. 1 trains on rpn_boxes (data.py's r1, b2, b3) when given, L_det on boxes; rpn_views picks and averages.
    V1 and V2 go through the RPN as one batch (model.ADePT.rpn_loss): still each view's own Eq. 1, averaged."""
    def sampler(labels, *args, **kwargs):  # every positive and the first 16 negatives of each image: no randomness
        neg = labels == 0
        return torch.where((labels == 1) | (neg & (neg.cumsum(dim=1) <= 16)), labels, -1)

    monkeypatch.setattr(rpn, "sample_anchors", sampler)
    views, boxes = views_and_boxes(B=2, size=128)
    # V1's boxes large (many positive anchors), V2's small (few): the views' N_cls and losses differ, so a joint
    # normalisation of the batched V1 + V2 would show (by 2.5e-4 here)
    large = torch.tensor([[4.0, 4, 124, 124], [0, 0, 100, 128], [20, 10, 128, 110], [0, 30, 128, 128]]).expand(2, 4, 4)
    small = torch.tensor([[10.0, 10, 30, 30], [50, 50, 70, 70], [90, 90, 110, 110], [20, 80, 40, 100]]).expand(2, 4, 4)
    other = [large, small, boxes_for(2, 4, 64, 9)]
    net = model.ADePT("joint", depth=18).eval()  # eval: BN statistics, so every call sees the same features
    with torch.no_grad():
        net.rpn.o.bias.fill_(3.0)  # objectness far from 0: positives and negatives cost very differently
        base, moved = net(views, boxes), net(views, boxes, rpn_boxes=other)
        assert torch.equal(moved["loss_det"], base["loss_det"]) and moved["loss_rpn"] != base["loss_rpn"]
        assert torch.allclose(moved["loss_rpn"], net(views, other)["loss_rpn"])
        by_view = [eq1_on(net, views, other, j) for j in range(3)]
        assert torch.allclose(moved["loss_rpn"], sum(by_view) / 3, rtol=0, atol=2e-6)
        net.rpn_views = (1, 3)
        assert torch.allclose(net(views, boxes, rpn_boxes=other)["loss_rpn"], (by_view[0] + by_view[2]) / 2,
                              rtol=0, atol=2e-6)
    for bad in ((), (0,), (1, 1), (4,)):
        with pytest.raises(ValueError, match="rpn_views"):
            model.ADePT("joint", depth=18, rpn_views=bad)


def test_separate_mode_trains_only_the_rpn():
    net = model.ADePT("separate", depth=18)
    views, boxes = views_and_boxes(B=1, size=128)
    bn = net.online.extractor.backbone.bn1
    before = bn.running_mean.clone()
    assert net.training and not bn.training  # as built, without a train() call
    losses = net(views, boxes)
    assert losses["loss_det"] == 0 and losses["loss_rpn"] > 0
    losses["loss"].backward()
    assert torch.equal(bn.running_mean, before)  # frozen extractor: BN statistics untouched
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("rpn.") for n in trainable)


@pytest.mark.parametrize("mode", ["soco", "byol"])
def test_baseline_modes(mode):
    net = model.ADePT(mode, depth=18)
    views, boxes = views_and_boxes(B=2, size=128)
    losses = net(views, boxes)
    assert losses["loss_rpn"] == 0 and torch.isfinite(losses["loss_det"])
    losses["loss"].backward()
    assert net.rpn is None


def test_rpn_proposals_switch_doubles_the_boxes():
    net = model.ADePT("joint", depth=18, rpn_proposals=True)
    views, boxes = views_and_boxes(B=2, size=128)
    t = [torch.tensor([[1.0, 0, 1, 0]] * 2), torch.tensor([[1.0, 0, 1, 0]] * 2), torch.tensor([[0.5, 0, 0.5, 0]] * 2)]
    out = net.add_rpn_proposals(net.online.extractor(views[0]), views, boxes, t)
    assert [tuple(b.shape) for b in out] == [(2, 8, 4)] * 3
    assert torch.equal(out[1][:, :4], boxes[1])


def test_map_boxes_through_scale_shift_and_flip():
    # original -> V1: scale 2; original -> V2: scale 4, shift -10, flipped horizontally in a 100 px view
    t1 = torch.tensor([[2.0, 0.0, 2.0, 0.0]])
    t2 = torch.tensor([[-4.0, 100.0, 4.0, -10.0]])
    b1 = torch.tensor([[[4.0, 10.0, 12.0, 20.0]]])  # original box (2, 5, 6, 10)
    b2 = model.map_boxes(b1, t1, t2, size=100)
    assert torch.allclose(b2, torch.tensor([[[76.0, 10.0, 92.0, 30.0]]]))


def test_export_keys_and_target_branch():
    net = model.ADePT("joint", depth=18)
    with torch.no_grad():
        net.online.extractor.backbone.conv1.weight.add_(1.0)  # online differs from target now
    state = model.export_pretrained(net)
    prefixes = {k.split(".")[0] for k in state}
    assert prefixes == {"backbone", "fpn", "box_head", "rpn"}
    assert torch.equal(state["backbone.conv1.weight"], net.target.extractor.backbone.conv1.weight)
    online = model.export_pretrained(net, use_online=True)
    assert torch.equal(online["backbone.conv1.weight"], net.online.extractor.backbone.conv1.weight)


def test_anchor_sizes_and_width_flags_reach_the_rpn():
    """ADePT(anchor_sizes, fpn_channels): the RPN targets use the given anchors; every layer is d wide."""
    sizes = [(8, 8), (4, 4), (2, 2), (1, 1)]
    net = model.ADePT("joint", depth=18, fpn_channels=64, anchor_sizes=(6, 12, 24, 48))
    a = net.anchors(sizes, torch.device("cpu"))
    assert torch.equal(a, torch.cat(rpn.make_anchors(sizes, sizes=(6, 12, 24, 48))))
    assert not torch.equal(a, torch.cat(rpn.make_anchors(sizes)))
    side = a[:, 2:] - a[:, :2]  # (N, 2); the square anchors of P2 are 6 px
    assert torch.isclose(side.prod(1)[: 8 * 8 * 3].sqrt(), torch.tensor(6.0)).all()
    assert net.rpn.c.in_channels == 64 and net.online.extractor.fpn.output[0].conv.out_channels == 64
    views = [torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64), torch.randn(2, 3, 32, 32)]
    big, small = torch.tensor([[4.0, 4.0, 30.0, 30.0]]), torch.tensor([[2.0, 2.0, 15.0, 15.0]])
    boxes = [big.repeat(2, 4, 1), big.repeat(2, 4, 1), small.repeat(2, 4, 1)]  # (B, K, 4) per view
    out = net(views, boxes)
    assert torch.isfinite(out["loss"]) and out["loss_rpn"] > 0


@pytest.mark.parametrize("mode", model.MODES)
def test_pretraining_step_makes_no_host_sync(mode):
    # Issue 7 (fast path): forward, backward, LARS and the EMA of a whole pre-training step contain no operation
    # whose result the host must wait for (tests/sync_ops.py; on one H100 the joint step made 18 before), with the
    # RoI pooling an accelerator uses (the CPU's groups boxes by level with one sync: free on a CPU).
    import byol
    import lars
    from sync_ops import SyncOpCounter

    net = model.ADePT(mode, depth=18)
    net.pool_sync_free(True)
    opt = lars.LARS(lars.param_groups(net), lr=0.01)
    views, boxes = views_and_boxes(size=64)
    for step in range(2):  # step 0 builds the anchors of each view size (ADePT.anchors: a copy of the ratios, once)
        with SyncOpCounter() as counter:
            net(views, boxes)["loss"].backward()
            opt.step()
            byol.ema_update(net.online, net.target, 0.99)
    assert counter.counts == {}


# ---- how forward assembles L_det (Eqs. 5-7) and the 'SS + RPN' boxes (Table 4) -------------------------------------
def perturbed(net):
    """net with its target moved away from the online branch (at initialisation xi = theta: online and target outputs
    could not be told apart). Train mode: BN normalises with the statistics of the batch, so a call on the same batch
    gives the same features, as in eval mode, but they depend on the input far more at random initialisation (in eval
    mode a wrong pairing of views or boxes moved L_det by only ~1e-4 here)."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in net.target.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g) * (p.abs().mean() + 1e-3))
    return net.train()


def eq7_by_hand(net, views, boxes, branch=None):
    """L_det of Eq. 7 from its pieces: q_j = q(p(g(RoIAlign(f(V_j), b_j)))) online, z_j = p_xi(g_xi(...)) of
    `branch` (the target; the online branch for the negative check)."""
    branch = net.target if branch is None else branch
    q = [net.predictor(net.online.project_boxes(net.online.extractor(v), b)) for v, b in zip(views, boxes)]
    z = [branch(v, b) for v, b in zip(views, boxes)]
    return byol.detector_loss(q, z)


def test_loss_det_is_eq7_of_each_views_own_boxes_with_the_target_branch():
    """forward's L_det = detector_loss(q, z): q from the online branch, z from the target xi, each view with its own
    boxes (caught: z from the online branch, V1's boxes for every view)."""
    net = perturbed(model.ADePT("joint", depth=18, fpn_channels=64))
    views, boxes = views_and_boxes(B=2, size=64)
    with torch.no_grad():
        got = net(views, boxes)["loss_det"]
        want = eq7_by_hand(net, views, boxes)
        assert torch.allclose(got, want, atol=1e-5), (got, want)
        assert not torch.allclose(got, eq7_by_hand(net, views, boxes, net.online), atol=1e-3)  # the target matters
        v1_boxes = [boxes[0]] * 3
        assert not torch.allclose(got, eq7_by_hand(net, views, v1_boxes), atol=1e-3)  # each view its own boxes


def test_total_loss_is_eq8_of_the_by_hand_terms(monkeypatch):
    """Eq. 8: L = L_RPN + L_det, each term computed by hand (Eq. 1 per view, averaged; Eq. 7), in joint mode; soco
    mode has no L_RPN, separate mode no L_det (caught: a weighted sum)."""
    monkeypatch.setattr(rpn, "sample_anchors", lambda labels, *a, **k: labels)  # every anchor: no randomness
    net = perturbed(model.ADePT("joint", depth=18, fpn_channels=64))
    views, boxes = views_and_boxes(B=2, size=64)
    with torch.no_grad():
        net.rpn.o.bias.fill_(2.0)  # an L_RPN far from L_det's scale: a mix-up of the terms shows
        got = net(views, boxes)
        l_rpn, l_det = sum(eq1_on(net, views, boxes, j) for j in range(3)) / 3, eq7_by_hand(net, views, boxes)
        assert torch.allclose(got["loss_rpn"], l_rpn, atol=2e-6) and torch.allclose(got["loss_det"], l_det, atol=1e-5)
        assert torch.allclose(got["loss"], l_rpn + l_det, atol=1e-5)
        assert got["loss_rpn"] > 1 and abs(got["loss_det"]) > 1e-2  # both terms weigh in the sum (tolerance 1e-5)
    assert torch.equal(model.total_loss(torch.tensor(2.0), torch.tensor(-3.0)), torch.tensor(-1.0))
    for mode, zero in (("soco", "loss_rpn"), ("separate", "loss_det")):
        out = model.ADePT(mode, depth=18, fpn_channels=64)(views, boxes)
        assert out[zero] == 0 and torch.equal(out["loss"], out["loss_rpn"] + out["loss_det"])


def test_byol_mode_loss_pairs_each_online_view_with_the_other_target_view():
    """The image-level baseline: byol_loss(q1, q2, z1, z2) = -2 cos(q1, z2) - 2 cos(q2, z1), z from the target
    (caught: the swapped pairing byol_loss(q1, q2, z2, z1), z from the online branch)."""
    net = perturbed(model.ADePT("byol", depth=18))
    views, _ = views_and_boxes(B=2, size=64)
    with torch.no_grad():
        got = net(views, None)["loss_det"]
        q = [net.predictor(net.online(v, None)) for v in views[:2]]
        z = [net.target(v, None) for v in views[:2]]
        z_online = [net.online(v, None) for v in views[:2]]
        assert torch.allclose(got, byol.byol_loss(q[0], q[1], z[0], z[1]), atol=1e-5)
        assert not torch.allclose(got, byol.byol_loss(q[0], q[1], z[1], z[0]), atol=1e-3)  # the pairing matters
        assert not torch.allclose(got, byol.byol_loss(q[0], q[1], z_online[0], z_online[1]), atol=1e-3)


def test_rpn_proposals_are_v1s_mapped_into_each_view_or_the_ss_box(monkeypatch):
    """Table 4 'SS + RPN': V1's proposals p (known here) are appended to every view's K SS boxes, mapped
    V1 -> original -> V_j; one that falls out of V_j's crop (a side < 2 px after clipping) is replaced by the SS box
    of that slot; an image with fewer than K proposals keeps its SS boxes in the missing slots (caught: source and
    destination transforms swapped, no fallback)."""
    K = 3
    props = [torch.tensor([[8.0, 8.0, 40.0, 56.0], [40.0, 30.0, 60.0, 62.0], [2.0, 2.0, 14.0, 14.0]]),  # 3rd: off V2
             torch.tensor([[20.0, 10.0, 50.0, 34.0]])]  # image 2: one proposal only
    monkeypatch.setattr(model.rpn, "generate_proposals",
                        lambda logits, *a, **k: [(p.clone(), torch.ones(len(p))) for p in props])
    net = model.ADePT("joint", depth=18, fpn_channels=64, rpn_proposals=True)
    views, boxes = views_and_boxes(B=2, K=K, size=64)
    # original (128 px) -> V1: halved; -> V2: the crop x, y in [32, 96] of the original, flipped, at scale 1;
    # -> V3: V2 halved
    t = [torch.tensor([[0.5, 0.0, 0.5, 0.0]] * 2), torch.tensor([[-1.0, 96.0, 1.0, -32.0]] * 2),
         torch.tensor([[-0.5, 48.0, 0.5, -16.0]] * 2)]
    with torch.no_grad():
        out = net.add_rpn_proposals(net.online.extractor(views[0]), views, boxes, t)
    assert [tuple(b.shape) for b in out] == [(2, 2 * K, 4)] * 3
    for j in range(3):
        assert torch.equal(out[j][:, :K], boxes[j])  # the SS boxes come first, unchanged
    p1 = torch.stack([props[0], torch.cat([props[1], boxes[0][1, 1:]])])  # (2, K, 4) V1 pixels
    assert torch.allclose(out[0][:, K:], p1)
    # V1 (x, y) -> original (2x, 2y) -> V2 (96 - 2x, 2y - 32): x1/x2 swapped by the flip, clipped to [0, 64]
    x, y = 96 - 2 * p1[..., [2, 0]], 2 * p1[..., [1, 3]] - 32
    mapped2 = torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], -1).clamp(0, 64)
    assert torch.allclose(mapped2[0, :2], torch.tensor([[16.0, 0, 64, 64], [0.0, 28, 16, 64]]))
    assert torch.allclose(mapped2[1, 0], torch.tensor([0.0, 0, 56, 36]))
    assert torch.allclose(mapped2[0, 2], torch.tensor([64.0, 0, 64, 0]))  # (2, 2, 14, 14): out of V2's crop
    for j, mapped in ((1, mapped2), (2, mapped2 / 2)):  # V3 = V2 at half size (clipped to [0, 32])
        small = ((mapped[..., 2:] - mapped[..., :2]) < 2).any(-1)  # (2, K): side < 2 px in V_j
        assert small[0].tolist() == [False, False, True]
        assert torch.allclose(out[j][:, K:], torch.where(small[..., None], boxes[j], mapped)), (j, out[j][:, K:])


def test_rpn_proposals_forward_feeds_l_det_the_doubled_boxes():
    """forward with rpn_proposals=True: L_det is Eq. 7 on the 2K boxes add_rpn_proposals makes (real RPN
    proposals); V3's appended boxes are V1's halved (identity V1 -> V2, V3 = V2 at half size) unless out of view."""
    net = perturbed(model.ADePT("joint", depth=18, fpn_channels=64, rpn_proposals=True))
    views, boxes = views_and_boxes(B=2, size=64)
    t = [torch.tensor([[1.0, 0, 1, 0]] * 2), torch.tensor([[1.0, 0, 1, 0]] * 2), torch.tensor([[0.5, 0, 0.5, 0]] * 2)]
    with torch.no_grad():
        got = net(views, boxes, t)
        doubled = net.add_rpn_proposals(net.online.extractor(views[0]), views, boxes, t)
        assert torch.isfinite(got["loss"]) and got["loss_rpn"] > 0
        assert torch.allclose(got["loss_det"], eq7_by_hand(net, views, doubled), atol=1e-5)
        assert not torch.allclose(got["loss_det"], eq7_by_hand(net, views, boxes), atol=1e-3)
    p1 = doubled[0][:, 4:]
    assert not ((p1[..., 2:] - p1[..., :2]) < 2).any()  # the RPN's boxes at initialisation: anchor-sized
    assert torch.equal(doubled[1][:, 4:], p1)
    small = ((p1[..., 2:] - p1[..., :2]) / 2 < 2).any(-1)
    assert torch.allclose(doubled[2][:, 4:], torch.where(small[..., None], boxes[2], p1 / 2))


def test_component_files_work_copied_alone(tmp_path):
    """rpn.py, roi_head.py, byol.py, lars.py and augment.py each copied into an empty folder import and run there
    with torch / torchvision / numpy / OpenCV only (for engineers who copy one file into their codebase)."""
    import os
    import shutil
    import subprocess
    import sys

    names = ("rpn", "roi_head", "byol", "lars", "augment")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for n in names:
        (tmp_path / n).mkdir()
        shutil.copy(os.path.join(root, f"{n}.py"), tmp_path / n / f"{n}.py")
    code = f"""
import importlib.util, sys
import numpy as np, torch
m = {{}}
for n in {names!r}:
    spec = importlib.util.spec_from_file_location(n, f"{tmp_path}/{{n}}/{{n}}.py")
    m[n] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m[n])
assert not set({names!r}) & set(sys.modules), "a project file was imported by name"
rpn, roi_head, byol, lars, augment = (m[n] for n in {names!r})
boxes = torch.tensor([[[4.0, 4, 40, 40], [10, 20, 60, 62]]])  # (B=1, K=2, 4) xyxy
anchors = torch.cat(rpn.make_anchors([(16, 16), (8, 8), (4, 4), (2, 2)]))
head = rpn.RPNHead(8)
feats = [torch.randn(1, 8, s, s) for s in (16, 8, 4, 2)]
loss = sum(rpn.rpn_loss(*head(feats), *rpn.rpn_targets(anchors, boxes)))
pooled = roi_head.multilevel_roi_align(feats, list(boxes), (4, 8, 16, 32))
h = roi_head.BoxHead(8, conv_dim=8, fc_dim=32).eval()(pooled)
proj = byol.Projector(in_dim=32, hidden_dim=16, out_dim=8).eval()
target = byol.make_target(proj)
v = proj(h).view(1, 2, 8)
det = byol.detector_loss([v, v, v], [v.detach()] * 3)
opt = lars.LARS(lars.param_groups(head), lr=0.1)
(loss + det).backward()
opt.step()
byol.ema_update(proj, target, 0.99)
views = augment.three_views(np.zeros((60, 80, 3), np.uint8), np.array([[10, 10, 50, 40]]),
                            torch.Generator().manual_seed(0), size=32, small_size=16)
assert tuple(pooled.shape) == (2, 8, 7, 7) and torch.isfinite(loss + det) and abs(float(det) + 8) < 1e-4
assert [tuple(px.shape) for px, _ in views] == [(3, 32, 32), (3, 32, 32), (3, 16, 16)]
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    (tmp_path / "run").mkdir()  # an empty working folder: no namespace package named like a file
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path / "run", env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_box_representations_are_eqs_2_to_4_per_box():
    """h_i = g(RoIAlign(f(V), b_i)): each box pooled with torchvision's roi_align (7x7, aligned) from its own image's
    map of the level roi_head.assign_levels gives it, then g; independent of the other boxes and images."""
    from torchvision.ops import roi_align
    import roi_head
    torch.manual_seed(0)
    f, g = model.FeatureExtractor(depth=18, channels=32), roi_head.BoxHead(32, conv_dim=32, fc_dim=16)
    f.eval(), g.eval()  # BN from running statistics: one box at a time must match the batch
    x, boxes = torch.randn(2, 3, 224, 224), boxes_for(2, 4, 224)  # (B, K, 4): one box per level
    with torch.no_grad():
        feats = f(x)
        h = model.box_representations(feats, boxes, f.strides, g)  # (B, K, 16)
        levels = roi_head.assign_levels(boxes.reshape(-1, 4)).view(2, 4)
        assert sorted(set(levels.flatten().tolist())) == [0, 1, 2, 3]
        for b in range(2):
            for k in range(4):
                lvl = int(levels[b, k])
                pooled = roi_align(feats[lvl][b:b + 1], [boxes[b, k:k + 1]], 7, 1 / f.strides[lvl], 0, True)
                assert torch.allclose(h[b, k], g(pooled)[0], atol=1e-5)
