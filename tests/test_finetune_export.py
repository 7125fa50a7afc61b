"""export.py and detector.load_pretrained (paper 4.3-4.4): the torchvision export loads strictly and computes what
the detector computes, the export files and detectron2's names, a narrow (--fpn-channels) pre-training loads into a
narrow detector and a wide one is refused. CPU, ResNet-18."""
import json
import os
import pickle
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import export  # noqa: E402
import model  # noqa: E402
from detector import Detector, DetectorConfig, load_pretrained  # noqa: E402
from test_finetune import pretrained_file  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one intra-op thread


def _randomise_bn(net):
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)


# faster: the CPU preset's anchors 8..128 and test limits, ratios 1/4, 1, 4 (integer anchors: torchvision rounds)
TV_CONFIGS = {"faster": dict(anchor_sizes=(8, 16, 32, 64, 128), anchor_ratios=(0.25, 1.0, 4.0), rpn_pre_nms_test=300,
                             rpn_post_nms_test=50, rpn_nms=0.6, score_thresh=0.1, nms_thresh=0.4, max_dets=20,
                             roi_batch=32),
              "mask": dict(rpn_post_nms_test=50)}  # DetectorConfig's COCO anchors and limits


@pytest.mark.parametrize("kind", ["faster", "mask"])
def test_torchvision_export_loads_strictly_and_matches(kind):
    from torchvision.models.detection.image_list import ImageList
    from torchvision.models.detection.rpn import concat_box_prediction_layers
    torch.manual_seed(0)
    cfg = DetectorConfig(num_classes=4, kind=kind, depth=18, test_size=96, max_size=128, **TV_CONFIGS[kind])
    det = Detector(cfg).eval()
    _randomise_bn(det)
    tv = export.torchvision_model(**export.torchvision_args(cfg)).eval()
    tv.load_state_dict(export.to_torchvision(det.state_dict(), det.cfg), strict=True)
    rpn, heads = tv.rpn, tv.roi_heads  # the config's anchors and test-time limits, not torchvision's defaults
    assert rpn.anchor_generator.sizes == tuple((s,) for s in cfg.anchor_sizes)
    assert rpn.anchor_generator.aspect_ratios == (cfg.anchor_ratios,) * 5
    assert (rpn._pre_nms_top_n["testing"], rpn._post_nms_top_n["testing"], rpn.nms_thresh) == \
        (cfg.rpn_pre_nms_test, cfg.rpn_post_nms_test, cfg.rpn_nms)
    assert (heads.score_thresh, heads.nms_thresh, heads.detections_per_img) == \
        (cfg.score_thresh, cfg.nms_thresh, cfg.max_dets)
    assert heads.fg_bg_sampler.batch_size_per_image == cfg.roi_batch
    assert tv.transform.min_size == (cfg.test_size,) and tv.transform.max_size == cfg.max_size
    x = torch.randn(1, 3, 128, 192)  # multiples of 64: torchvision derives strides as image // feature size
    with torch.no_grad():
        feats = tv.backbone(x)
        ours, theirs = det.extractor(x), list(feats.values())
        assert len(ours) == len(theirs) == 5
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ours, theirs))
        logits, deltas = det.rpn(ours)
        obj, reg = concat_box_prediction_layers(*tv.rpn.head(theirs))
        assert torch.allclose(logits.reshape(-1), obj[:, 0], atol=1e-5)
        assert torch.allclose(deltas.reshape(-1, 4), reg, atol=1e-5)
        tv_anchors = tv.rpn.anchor_generator(ImageList(x, [(128, 192)]), theirs)[0]
        assert (torch.cat(det.anchors(ours)) - tv_anchors).abs().max() <= 0.5  # same order; tv rounds to integers
        if kind == "faster":  # integer anchors: the same proposals, as many as the config's test_proposals
            (props,) = det.proposals(logits, deltas, det.anchors(ours), [(128, 192)])
            (props_tv,), _ = tv.rpn(ImageList(x, [(128, 192)]), feats)
            assert len(props) == len(props_tv) == cfg.rpn_post_nms_test
            assert torch.allclose(props, props_tv, atol=1e-3)
        z = torch.randn(6, 256, 7, 7)
        h, h_tv = det.box_head(z), tv.roi_heads.box_head(z)
        assert torch.allclose(h, h_tv, atol=1e-5)
        for a, b in zip(det.box_predictor(h), tv.roi_heads.box_predictor(h_tv)):
            assert torch.allclose(a, b, atol=1e-5)
        if kind == "mask":
            z = torch.randn(3, 256, 14, 14)
            assert torch.allclose(det.mask_head(z), tv.roi_heads.mask_predictor(tv.roi_heads.mask_head(z)), atol=1e-5)
        (o,) = tv([torch.rand(3, 96, 128)])  # the assembled torchvision model runs end to end
        assert {"boxes", "labels", "scores"} <= set(o)


def test_export_files_and_detectron2_names(tmp_path):
    path = pretrained_file(tmp_path)
    pkl = export.export_detectron2(path, tmp_path / "d2.pkl")
    with open(pkl, "rb") as f:
        obj = pickle.load(f)
    assert obj["matching_heuristics"] is True and "__author__" in obj
    names = set(obj["model"])
    for k in ("backbone.bottom_up.stem.conv1.weight", "backbone.bottom_up.stem.conv1.norm.running_var",
              "backbone.bottom_up.res2.0.conv1.weight", "backbone.bottom_up.res2.1.conv2.norm.bias",
              "backbone.bottom_up.res3.0.shortcut.weight", "backbone.bottom_up.res3.0.shortcut.norm.weight",
              "backbone.bottom_up.res5.1.conv2.weight", "backbone.fpn_lateral2.weight",
              "backbone.fpn_lateral5.norm.running_mean", "backbone.fpn_output3.norm.weight",
              "proposal_generator.rpn_head.conv.weight", "proposal_generator.rpn_head.objectness_logits.bias",
              "proposal_generator.rpn_head.anchor_deltas.weight", "roi_heads.box_head.conv1.weight",
              "roi_heads.box_head.conv4.norm.running_var", "roi_heads.box_head.fc1.weight"):
        assert k in names and isinstance(obj["model"][k], np.ndarray), k
    state = torch.load(path, weights_only=True)["state_dict"]
    assert len(names) == sum(not k.endswith("num_batches_tracked") for k in state)
    assert np.array_equal(obj["model"]["roi_heads.box_head.fc1.weight"], state["box_head.fcs.0.weight"].numpy())
    det = Detector(DetectorConfig(num_classes=2, kind="faster", depth=18, anchor_sizes=(8, 16, 32, 64, 128),
                                  rpn_post_nms_test=100, max_dets=20))  # the CPU preset's anchors and limits
    torch.save({"state_dict": det.state_dict(), "config": det.cfg.__dict__, "cat_ids": [3, 7]}, tmp_path / "f.pth")
    out = export.export_torchvision(tmp_path / "f.pth", tmp_path / "tv.pth")
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["anchor_sizes"] == [8, 16, 32, 64, 128] and meta["max_dets"] == 20 and meta["cat_ids"] == [3, 7]
    tv = export.load_torchvision(out)  # model_tv.json's builder args, strict load
    assert tv.rpn.anchor_generator.sizes == ((8,), (16,), (32,), (64,), (128,))
    assert tv.rpn._post_nms_top_n["testing"] == 100 and tv.roi_heads.detections_per_img == 20
    with pytest.raises(ValueError, match="Cascade"):
        export.to_torchvision({}, DetectorConfig(kind="cascade"))


def test_narrow_detector_loads_narrow_pretraining_and_rejects_wide(tmp_path):
    """--fpn-channels: a 128-wide pre-training loads into a 128-wide detector; a 256-wide file is refused by name."""
    narrow = tmp_path / "narrow.pth"
    torch.save({"state_dict": model.export_pretrained(model.ADePT("joint", depth=18, head="2fc", fpn_channels=128)),
                "meta": {"depth": 18, "fpn_channels": 128}}, narrow)
    cfg = DetectorConfig(num_classes=3, kind="mask", depth=18, head="2fc", fpn_channels=128, mask_dim=64)
    det = Detector(cfg)
    report = load_pretrained(det, narrow, verbose=False)
    assert any(k.startswith("rpn.") for k in report["loaded"])
    assert any(k.startswith("box_head.") for k in report["loaded"])
    assert det.mask_head.logits.in_channels == 64 and det.extractor.out_channels == 128
    wide = tmp_path / "wide.pth"
    torch.save({"state_dict": model.export_pretrained(model.ADePT("joint", depth=18, head="2fc")), "meta": {}}, wide)
    with pytest.raises(ValueError, match="wide.pth.*FPN d 128"):
        load_pretrained(Detector(cfg), wide, verbose=False)
