"""The study's cells as subprocess entry points (study.py runs them as `python study.py _finetune ...` and
`python study.py _recall ...`): a fine-tuning cell with its TIDE errors (sections 4.3-4.5.1), and the proposal
recall of a pretrained RPN or of selective search on val (sections 3.2, 4.1.1, 4.1.3). Each writes its folder's
cell.json through eval.write_metrics (atomic; NaN -> null), which is what marks a cell done.

Symbols: AR@k class-agnostic proposal recall over the top k boxes (IoU 0.5:0.95); d FPN width; top_n proposals kept
per level before NMS and per image after.

Public: finetune_cell(out, argv), recall_cell(out_json, weights, coco_json, image_root, depth, fpn_channels,
anchor_sizes), rpn_recall(weights, coco_json, image_root, depth, top_n, fpn_channels, anchor_sizes) -> AR dict | None,
ss_recall(coco_json, image_root) -> AR dict.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


def finetune_cell(out: Path, argv: list) -> None:
    """finetune.py in-process (it saves the val predictions to out/predictions.json; if not, they are computed from
    model_final.pth), then TIDE on them (4.5.1); writes out/cell.json."""
    import eval as ev
    import finetune
    from coco_files import load_results
    preds = out / "predictions.json"
    preds.unlink(missing_ok=True)  # a stale file from an interrupted attempt
    metrics = finetune.main(argv + ["--out", str(out)])
    val_json = argv[argv.index("--val-json") + 1]
    if not preds.exists():
        _predict_final(out, val_json, argv[argv.index("--val-images") + 1], preds)
    ev.write_metrics({"metrics": metrics, "tide_bbox": ev.tide(val_json, load_results(preds))}, out / "cell.json")


def _predict_final(out: Path, val_json, val_images, path: Path) -> None:
    import coco_data
    import model as model_lib
    from coco_files import save_results
    from detector import Detector, DetectorConfig
    from predict import predict
    final = model_lib.load_weights(out / "model_final.pth", "finetune.py model_final.pth")
    det = Detector(DetectorConfig(**final["config"]))
    det.load_state_dict(final["state_dict"])
    ds = coco_data.DetectionDataset(coco_data.load_coco(val_json, val_images), train=False)
    save_results(predict(det, ds, cat_ids=final["cat_ids"]), path)


@torch.no_grad()
def rpn_recall(weights, coco_json, image_root, depth=18, top_n=1000, fpn_channels=256, anchor_sizes=None
               ) -> dict | None:
    """AR@10/100/1000 of an RPN (weights: a pretrained.pth, or "none" for random init) on the images at their own
    size, pre-training anchors (4.1.3), top_n proposals per level before NMS and per image after; None: no RPN."""
    import data
    import eval as ev
    import model as model_lib
    import rpn
    meta, state = {"depth": depth, "fpn_norm": "bn", "fpn_channels": fpn_channels,
                   "anchor_sizes": anchor_sizes or rpn.PRETRAIN_ANCHOR_SIZES}, {}
    if weights != "none":
        ck = model_lib.load_weights(weights, "train.py pretrained.pth")
        state, meta = ck["state_dict"], {**meta, **ck.get("meta", {})}
        if not any(k.startswith("rpn.") for k in state):
            return None
    torch.manual_seed(0)
    d = meta["fpn_channels"]
    ext, head = model_lib.FeatureExtractor(meta["depth"], meta["fpn_norm"], channels=d).eval(), rpn.RPNHead(d).eval()
    if state:
        ext.load_state_dict({k: v for k, v in state.items() if k.startswith(("backbone.", "fpn."))})
        head.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("rpn.")})
    gts, props = [], []
    for img, boxes in _val_images(coco_json, image_root):
        H, W = img.shape[:2]
        x = data.normalize(torch.from_numpy(img).permute(2, 0, 1)[None])  # (1, 3, H, W)
        x = torch.nn.functional.pad(x, (0, -W % 32, 0, -H % 32))  # FPN needs sides divisible by the top stride
        feats = ext(x)  # P2..P5, (1, d, H/s, W/s)
        logits, deltas = head(feats)  # (1, N), (1, N, 4)
        anchors = rpn.make_anchors([f.shape[-2:] for f in feats], ext.strides, meta["anchor_sizes"])
        props.append(rpn.generate_proposals(logits, deltas, anchors, (H, W), top_n, top_n)[0][0].numpy())
        gts.append(boxes)
    return {**ev.proposal_recall(gts, props), "proposals": float(np.mean([len(b) for b in props]))}


def _val_images(coco_json, image_root):
    """(RGB uint8 (H, W, 3), non-crowd gt boxes (M, 4) xyxy) per image of a COCO json."""
    import data
    from coco_files import load_coco
    coco = load_coco(coco_json)
    for info in coco.loadImgs(sorted(coco.getImgIds())):
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=[info["id"]])) if not a.get("iscrowd", 0)]
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]).reshape(-1, 4)
        yield data.decode_image(Path(image_root) / info["file_name"], min_side=1), boxes


def ss_recall(coco_json, image_root) -> dict:
    """Recall of all selective-search boxes (paper preset, 4.1.1), raw and after the 4.1.1 filter with fallback:
    the boxes carry no rank, so only AR over all of them ("AR@all") is meaningful."""
    import eval as ev
    import selective_search as ss
    gts, raw, kept = [], [], []
    for img, boxes in _val_images(coco_json, image_root):
        b = ss.selective_search(img, preset="paper")
        gts.append(boxes), raw.append(b), kept.append(ss.filter_with_fallback(b, img.shape[1], img.shape[0])[0])
    all_ = 10 ** 6  # more boxes than any image has: AR over all of them
    return {f"{tag}{k}": v for tag, props in (("", raw), ("filtered ", kept)) for k, v in
            (("AR@all", ev.proposal_recall(gts, props, max_dets=(all_,))[f"AR@{all_}"]),
             ("proposals", float(np.mean([len(b) for b in props]))))}


def recall_cell(out_json: Path, weights: str, coco_json, image_root, depth="18", fpn_channels="256",
                anchor_sizes="24,48,96,192") -> None:
    """cell.json of a pre-training cell (recall of its RPN, its last log line) or of a reference recall."""
    import eval as ev
    from runtime import anchor_sizes as parse_sizes
    rec = {}
    if weights == "ss":
        rec["recall"] = ss_recall(coco_json, image_root)
    else:
        rec["recall"] = rpn_recall(weights, coco_json, image_root, int(depth), fpn_channels=int(fpn_channels),
                                   anchor_sizes=parse_sizes(anchor_sizes))
        log = Path(weights).parent / "log.jsonl"
        if log.exists():
            rec["last_log"] = json.loads(log.read_text().strip().splitlines()[-1])
    ev.write_metrics(rec, out_json)
