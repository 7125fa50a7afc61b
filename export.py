"""Export ADePT weights to other frameworks: fine-tuned detectors to torchvision, pretrained weights to detectron2.

Not a paper section: it lets users fine-tune or deploy the models of 4.3 / 4.4 with those frameworks.

torchvision: `torchvision_model(num_classes, mask=...)` assembles torchvision.models.detection.FasterRCNN / MaskRCNN
from torchvision's own components to match detector.Detector (weights=None, nothing downloaded):
    backbone  BackboneWithFPN(resnetD with BatchNorm2d, FPN with BatchNorm2d norm_layer, LastLevelMaxPool = P6)
    RPN       RPNHead(256, A, conv_depth=1); AnchorGenerator one size per level (default (32,), ..., (512,)), ratios
              (default 0.5, 1, 2; A of them); 2000 / 1000 proposals (pre per level / post NMS) in training, default
              1000 / 1000 at test, NMS 0.7
    box head  FastRCNNConvFCHead((256, 7, 7), [256] * 4, [1024], BatchNorm2d) (or [] convs, [1024, 1024] for 2fc);
              FastRCNNPredictor(1024, C + 1); box coder weights (10, 10, 5, 5); 512 RoIs, 25% positive; score > 0.05,
              NMS 0.5, 100 detections by default
    mask head MaskRCNNHeads(256, [256] * 4, 1, BatchNorm2d) + MaskRCNNPredictor(256, 256, C + 1)
`torchvision_args(cfg)` gives the torchvision_model arguments that reproduce a DetectorConfig: its test size, anchor
sizes and ratios, test-time proposal counts, NMS thresholds, score threshold, detections per image and RoIs per image
(export_torchvision writes them to model_tv.json; `load_torchvision(model_tv.pth)` rebuilds and loads the model).
`to_torchvision(state, cfg)` renames a Detector state dict (cfg: its DetectorConfig; cascade, non-BN and non-256-wide
detectors are refused) so that model.load_state_dict(sd, strict=True) succeeds; the backbone, FPN, RPN-head,
box-head, predictor and mask-head outputs then equal ours on the same input (tested).
End-to-end detections differ slightly: torchvision's MultiScaleRoIAlign uses aligned=False and 2 samples per bin
(ours: aligned=True, adaptive), its anchors are rounded to integers, and its resize may round sizes differently.

    import export
    model = export.load_torchvision("model_tv.pth")    # torchvision_model(**model_tv.json's builder args), strict load
    model.eval(); out = model([image_float_0_1])        # torchvision's usual outputs

detectron2: `to_detectron2(pretrained_state)` maps a pretrained.pth onto detectron2's R50-FPN names
(backbone.bottom_up.stem.conv1.weight / .norm.*, backbone.bottom_up.res2.0.conv1.* ... shortcut.*,
backbone.fpn_lateral{2..5}[.norm], backbone.fpn_output{2..5}[.norm], proposal_generator.rpn_head.{conv,
objectness_logits, anchor_deltas}, roi_heads.box_head.conv{1..4}[.norm] / fc1 [/ fc2]) as numpy arrays in a pickled
{"model", "__author__", "matching_heuristics": True} (as SoCo's converter). detectron2 config to use with it:
MODEL.RESNETS.STRIDE_IN_1X1 False (torchvision puts the stride in the 3x3 conv), MODEL.RESNETS.NORM / FPN.NORM /
ROI_BOX_HEAD.NORM "SyncBN" (or "BN"), ROI_BOX_HEAD NUM_CONV 4 NUM_FC 1, INPUT.FORMAT "RGB", MODEL.PIXEL_MEAN
[123.675, 116.28, 103.53], PIXEL_STD [58.395, 57.12, 57.375] (ImageNet statistics on 0-255 RGB).

Public: torchvision_model, torchvision_args, to_torchvision, export_torchvision, load_torchvision, to_detectron2,
export_detectron2, main (CLI):
    python export.py torchvision runs/finetune/model_final.pth model_tv.pth      (+ model_tv.json: builder args)
    python export.py detectron2 runs/pretrain/pretrained.pth adept_d2.pkl
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import re
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from detector import IMAGENET_MEAN, IMAGENET_STD, DetectorConfig
from model import load_weights

RESNETS = {18: torchvision.models.resnet18, 34: torchvision.models.resnet34, 50: torchvision.models.resnet50,
           101: torchvision.models.resnet101}


def torchvision_model(num_classes: int, mask: bool = False, depth: int = 50, head: str = "4conv1fc",
                      min_size: int = 800, max_size: int = 1333, test_proposals: int = 1000,
                      anchor_sizes=(32, 64, 128, 256, 512), anchor_ratios=(0.5, 1.0, 2.0), rpn_pre_nms_test: int = 1000,
                      rpn_nms: float = 0.7, score_thresh: float = 0.05, nms_thresh: float = 0.5, max_dets: int = 100,
                      roi_batch: int = 512):
    """torchvision FasterRCNN (mask=False) / MaskRCNN matching detector.Detector; num_classes excludes background.
    The defaults are DetectorConfig's (COCO's); torchvision_args(cfg) gives those of a fine-tuned model."""
    resnet = RESNETS[depth](weights=None)  # BatchNorm2d (not frozen): the BN statistics come from our model
    c2 = 64 if depth < 50 else 256
    backbone = BackboneWithFPN(resnet, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
                               [c2, 2 * c2, 4 * c2, 8 * c2], 256, LastLevelMaxPool(), norm_layer=nn.BatchNorm2d)
    anchors = AnchorGenerator(tuple((int(s),) for s in anchor_sizes), (tuple(anchor_ratios),) * len(anchor_sizes))
    convs, fcs = ([256] * 4, [1024]) if head == "4conv1fc" else ([], [1024, 1024])
    kw = dict(min_size=min_size, max_size=max_size, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
              rpn_anchor_generator=anchors, rpn_head=RPNHead(256, len(anchor_ratios), conv_depth=1),
              rpn_pre_nms_top_n_train=2000, rpn_post_nms_top_n_train=1000, rpn_nms_thresh=rpn_nms,
              rpn_pre_nms_top_n_test=rpn_pre_nms_test, rpn_post_nms_top_n_test=test_proposals,
              box_head=FastRCNNConvFCHead((256, 7, 7), convs, fcs, norm_layer=nn.BatchNorm2d),
              box_predictor=FastRCNNPredictor(1024, num_classes + 1), box_batch_size_per_image=roi_batch,
              box_positive_fraction=0.25, box_score_thresh=score_thresh, box_nms_thresh=nms_thresh,
              box_detections_per_img=max_dets, bbox_reg_weights=(10.0, 10.0, 5.0, 5.0))
    if not mask:
        return FasterRCNN(backbone, num_classes=None, **kw)
    return MaskRCNN(backbone, num_classes=None, mask_head=MaskRCNNHeads(256, [256] * 4, 1, norm_layer=nn.BatchNorm2d),
                    mask_predictor=MaskRCNNPredictor(256, 256, num_classes + 1), **kw)


def _tv_key(k: str, n_conv: int) -> str | None:
    """One Detector state-dict key -> torchvision's; None for keys torchvision has no place for."""
    rules = [
        (r"^extractor\.backbone\.", "backbone.body."),
        (r"^extractor\.fpn\.lateral\.(\d+)\.conv\.", r"backbone.fpn.inner_blocks.\1.0."),
        (r"^extractor\.fpn\.lateral\.(\d+)\.norm\.", r"backbone.fpn.inner_blocks.\1.1."),
        (r"^extractor\.fpn\.output\.(\d+)\.conv\.", r"backbone.fpn.layer_blocks.\1.0."),
        (r"^extractor\.fpn\.output\.(\d+)\.norm\.", r"backbone.fpn.layer_blocks.\1.1."),
        (r"^rpn\.c\.", "rpn.head.conv.0.0."), (r"^rpn\.o\.", "rpn.head.cls_logits."),
        (r"^rpn\.d\.", "rpn.head.bbox_pred."),
        (r"^box_head\.convs\.(\d+)\.conv\.", r"roi_heads.box_head.\1.0."),
        (r"^box_head\.convs\.(\d+)\.norm\.", r"roi_heads.box_head.\1.1."),
        (r"^box_predictor\.", "roi_heads.box_predictor."),
        (r"^mask_head\.convs\.(\d+)\.conv\.", r"roi_heads.mask_head.\1.0."),
        (r"^mask_head\.convs\.(\d+)\.norm\.", r"roi_heads.mask_head.\1.1."),
        (r"^mask_head\.deconv\.", "roi_heads.mask_predictor.conv5_mask."),
        (r"^mask_head\.logits\.", "roi_heads.mask_predictor.mask_fcn_logits."),
    ]
    m = re.match(r"^box_head\.fcs\.(\d+)\.(.*)$", k)
    if m:  # FastRCNNConvFCHead: convs 0..n-1, Flatten at n, then (Linear, ReLU) pairs
        return f"roi_heads.box_head.{n_conv + 1 + 2 * int(m.group(1))}.{m.group(2)}"
    for pat, rep in rules:
        if re.match(pat, k):
            return re.sub(pat, rep, k)
    return None


def to_torchvision(state: dict, cfg: DetectorConfig) -> dict:
    """Detector (faster / mask) state dict -> torchvision FasterRCNN / MaskRCNN state dict (strict-loadable)."""
    if cfg.kind == "cascade":
        raise ValueError("torchvision has no Cascade R-CNN: export a faster or mask detector")
    if cfg.fpn_norm != "bn" or cfg.head_norm != "bn" or cfg.mask_norm != "bn":
        raise ValueError("torchvision_model assumes BN in the FPN and the heads")
    if cfg.fpn_channels != 256 or cfg.mask_dim != 256:  # torchvision's FPN and mask head are 256 wide
        raise ValueError(f"torchvision's detectors are 256 wide: this one has FPN d {cfg.fpn_channels}, mask head "
                         f"{cfg.mask_dim} (the CPU study's narrow models do not export)")
    n_conv = 4 if cfg.head == "4conv1fc" else 0
    out = {}
    for k, v in state.items():
        tk = _tv_key(k, n_conv)
        if tk is None:
            raise ValueError(f"no torchvision name for {k}")
        out[tk] = v
    return out


def torchvision_args(cfg: DetectorConfig) -> dict:
    """torchvision_model's keyword arguments that reproduce a Detector of this config (JSON-safe: model_tv.json)."""
    return {"num_classes": cfg.num_classes, "mask": cfg.kind == "mask", "depth": cfg.depth, "head": cfg.head,
            "min_size": cfg.test_size, "max_size": cfg.max_size, "test_proposals": cfg.rpn_post_nms_test,
            "anchor_sizes": [int(s) for s in cfg.anchor_sizes], "anchor_ratios": [float(r) for r in cfg.anchor_ratios],
            "rpn_pre_nms_test": cfg.rpn_pre_nms_test, "rpn_nms": cfg.rpn_nms, "score_thresh": cfg.score_thresh,
            "nms_thresh": cfg.nms_thresh, "max_dets": cfg.max_dets, "roi_batch": cfg.roi_batch}


ADVICE = {  # what a file given to the wrong export is, and what to export instead
    "model_final": "a finetune.py model_final.pth: the detector goes to torchvision (`export.py torchvision`)",
    "finetune_checkpoint": "a finetune.py checkpoint.pth: export its run's model_final.pth",
    "train_checkpoint": "a train.py checkpoint.pth: export its pretrained.pth (`export.py detectron2`)",
    "pretrained": "a train.py pretrained.pth: the pre-trained weights go to detectron2 (`export.py detectron2`)",
    "unknown": "no 'config' / 'state_dict', nor backbone.* and fpn.* keys"}


def _kind(ck: dict) -> str:
    """Which of the project's files a loaded dict is (a key of ADVICE)."""
    if "config" in ck:
        return "model_final" if "state_dict" in ck else "finetune_checkpoint"
    if "model" in ck and "optimizer" in ck:
        return "train_checkpoint"
    state = ck.get("state_dict", ck)
    has = lambda p: any(str(k).startswith(p) for k in state)  # noqa: E731
    return "pretrained" if has("backbone.") and has("fpn.") else "unknown"


def export_torchvision(final_path, out_path) -> Path:
    """model_final.pth (finetune.py) -> torchvision state dict at out_path + builder args (torchvision_args, and
    "cat_ids", "names") in out_path.json."""
    ck = load_weights(final_path, "finetune.py model_final.pth")
    if _kind(ck) != "model_final":
        raise ValueError(f"{final_path}: not a finetune.py model_final.pth ({ADVICE[_kind(ck)]})")
    cfg = DetectorConfig(**ck["config"])
    sd = to_torchvision(ck["state_dict"], cfg)
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".tmp")
    torch.save(sd, tmp)
    os.replace(tmp, out_path)
    args = {**torchvision_args(cfg), "cat_ids": ck.get("cat_ids"), "names": ck.get("names")}
    out_path.with_suffix(".json").write_text(json.dumps(args, indent=1))
    return out_path


def load_torchvision(path):
    """export_torchvision's model_tv.pth -> the torchvision model built from model_tv.json, weights loaded strictly."""
    path = Path(path)
    meta = json.loads(path.with_suffix(".json").read_text())
    model = torchvision_model(**{k: v for k, v in meta.items() if k not in ("cat_ids", "names")})
    model.load_state_dict(load_weights(path, "export_torchvision model_tv.pth"), strict=True)
    return model


def _d2_backbone_key(k: str) -> str:
    """torchvision ResNet name -> detectron2 ResNet name (backbone.bottom_up.*)."""
    k = re.sub(r"^conv1\.", "stem.conv1.", k)
    k = re.sub(r"^bn1\.", "stem.conv1.norm.", k)
    k = re.sub(r"^layer(\d)\.", lambda m: f"res{int(m.group(1)) + 1}.", k)
    k = re.sub(r"\.bn(\d)\.", r".conv\1.norm.", k)
    k = k.replace(".downsample.0.", ".shortcut.").replace(".downsample.1.", ".shortcut.norm.")
    return "backbone.bottom_up." + k


def _d2_key(k: str) -> str | None:
    """pretrained.pth key -> detectron2 R50-FPN name; None for keys detectron2 has no place for."""
    if k.endswith("num_batches_tracked"):
        return None
    if k.startswith("backbone."):
        return _d2_backbone_key(k[len("backbone."):])
    m = re.match(r"^fpn\.(lateral|output)\.(\d+)\.(conv|norm)\.(.*)$", k)
    if m:
        norm = ".norm" if m.group(3) == "norm" else ""
        return f"backbone.fpn_{m.group(1)}{int(m.group(2)) + 2}{norm}.{m.group(4)}"
    m = re.match(r"^rpn\.([cod])\.(.*)$", k)
    if m:
        name = {"c": "conv", "o": "objectness_logits", "d": "anchor_deltas"}[m.group(1)]
        return f"proposal_generator.rpn_head.{name}.{m.group(2)}"
    m = re.match(r"^box_head\.convs\.(\d+)\.(conv|norm)\.(.*)$", k)
    if m:
        norm = ".norm" if m.group(2) == "norm" else ""
        return f"roi_heads.box_head.conv{int(m.group(1)) + 1}{norm}.{m.group(3)}"
    m = re.match(r"^box_head\.fcs\.(\d+)\.(.*)$", k)
    if m:
        return f"roi_heads.box_head.fc{int(m.group(1)) + 1}.{m.group(2)}"
    return None


def to_detectron2(state: dict) -> dict:
    """pretrained.pth state dict -> {detectron2 name: numpy array} (BN's num_batches_tracked dropped)."""
    out = {}
    for k, v in state.items():
        dk = _d2_key(k)
        if dk is not None:
            out[dk] = v.detach().cpu().numpy()
    return out


def export_detectron2(pretrained_path, out_path) -> Path:
    """pretrained.pth -> detectron2 pickle {"model": {name: ndarray}, "__author__", "matching_heuristics": True}."""
    ck = load_weights(pretrained_path, "train.py pretrained.pth")
    if _kind(ck) != "pretrained":
        raise ValueError(f"{pretrained_path}: not a train.py pretrained.pth ({ADVICE[_kind(ck)]})")
    state = ck.get("state_dict", ck)
    obj = {"model": to_detectron2(state), "__author__": "ADePT", "matching_heuristics": True}
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(obj, f)
    os.replace(tmp, out_path)
    return out_path


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("target", choices=("torchvision", "detectron2"))
    p.add_argument("src", help="torchvision: finetune.py's model_final.pth; detectron2: train.py's pretrained.pth")
    p.add_argument("dst")
    a = p.parse_args(argv)
    try:
        path = (export_torchvision if a.target == "torchvision" else export_detectron2)(a.src, a.dst)
    except ValueError as e:  # an unreadable or wrong file: one line naming it
        raise SystemExit(str(e)) from None
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
