"""Fine-tune Faster / Mask / Cascade R-CNN from ADePT weights and evaluate (paper 4.3, 4.4; reference.md).

    python finetune.py                                   # embedded synthetic data, CPU preset (printed at start)
    torchrun --nproc_per_node 8 finetune.py --detector mask --coco /data/coco --amp            # COCO 1x (4.3)
    torchrun --nproc_per_node 8 finetune.py --detector mask --coco /data/coco --label-fraction 0.01 --amp
    torchrun ... finetune.py --detector cascade --train-json soda/train.json --train-images soda/train \
        --val-json soda/val.json --val-images soda/val --iters 3726                               # SODA10M (4.3)
    python finetune.py voc2coco /data/VOCdevkit --sets VOC2007/trainval VOC2012/trainval --out voc0712.json
    torchrun ... finetune.py --detector faster --train-json voc0712.json --train-images /data/VOCdevkit \
        --val-json voc07test.json --val-images /data/VOCdevkit --shots 10 --novel voc1          # few-shot (4.4)

Schedule (COCO 1x, detectron2): SGD momentum 0.9, weight decay 1e-4 (SoCo's configs: 2.5e-5, --weight-decay),
linear warm-up over 1000 iterations from lr/1000, lr x 0.1 at 2/3 and 8/9 of the run (60k / 80k of 90k), 90k
iterations at a global batch of 16 with lr 0.02; another --batch-size scales the default iterations and warm-up by
16/batch and the lr by batch/16 (linear scaling rule). --label-fraction < 1 and --shots use the label-scarce
9000-iteration schedule (reference.md: 1% / 10% COCO; the paper gives no few-shot schedule: our choice).
Multi-scale training short side 640-800 (step 32; 480-800 on VOC, --novel voc1/2/3, as TFA's configs), max 1333,
test 800, horizontal flip p = 0.5; resize and padding to a multiple of 32 happen inside the detector (detector.py).
Batches of one orientation (landscape / portrait: detectron2's ASPECT_RATIO_GROUPING; --no-aspect-grouping).
After the last iteration, precise BN (SoCo's config; precise_bn.py): the BN statistics of model_final.pth are the
mean over 200 training batches of the final model (--precise-bn; checkpoint.pth keeps the training statistics).

Init (--init): an ADePT pretrained.pth (default: runs/pretrain/pretrained.pth when it exists, else none), "none"
(random init) or "torchvision:PATH" (a local torchvision ResNet checkpoint for the backbone only). Which weights were
loaded and which start fresh is printed (detector.load_pretrained).

Outputs in --out: subset.json (the chosen train image / annotation ids, seed; kept by resume and --eval-only),
checkpoint.pth (atomic; auto-resumed by a run with the same RUN_KEYS flags only), log.jsonl (lines after the resumed
step dropped: they are redone; plotted into curves.png), model_final.pth ({"state_dict", "config", "cat_ids",
"names", "args"}; --eval-only evaluates it as saved), metrics.json (COCO AP box [and mask]; VOC mAP50 novel / all
with --shots). An empty val set or train subset is refused before training. export.py: model_final.pth -> torchvision.

Public: PAPER, CPU, RUN_KEYS, LEGACY_DEFAULTS, parse_args, resolve, build_datasets, build_detector, evaluate, main,
check_same_run(path, ck, args, log) (refuses another run's checkpoint; an older one resumes as it was trained),
saved_args(ck) (a checkpoint's flags, LEGACY_DEFAULTS filled in). The loop itself (schedule, loader, steps,
checkpoints, precise BN): finetune_loop.py. metrics.json and subset.json: eval.write_metrics (strict JSON).
re-exported: InfiniteSampler (coco_data.py), voc2coco_cli (voc_data.py).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import coco_data
import eval as ev
from coco_data import InfiniteSampler  # noqa: F401 (re-exported)
import model as model_lib
from detector import Detector, DetectorConfig, load_pretrained
from finetune_loop import train_loop
from runtime import (anchor_sizes, apply_preset, bad_input_exits, exit_distributed, in_range, plot_curves,
                     positive_int, read_checkpoint, refuse_other_run, setup_distributed)
from voc_data import novel_ids, voc2coco_cli

REF_BATCH = 16  # COCO 1x: 16 images per iteration (4.3)
PAPER = dict(anchor_sizes="32,64,128,256,512", depth=50, batch_size=16, lr=None, warmup=1000,
             min_size="640,672,704,736,768,800", max_size=1333,
             test_size=800, workers=4, ckpt_every=5000, log_every=20, roi_batch=512, test_proposals=1000, max_dets=100,
             precise_bn=200)
# CPU preset (embedded 128-160 px images, <= 6 objects each): ResNet-18 at native resolution, a few hundred
# iterations. DEVIATION (CPU cost only): 32 RoIs per image, 100 test proposals and 20 detections per image, because
# the 4conv1fc box head and the mask head cost ~1 s per image at 512 RoIs / 100 masks on 2 cores.
# DEVIATION (scale): anchors COCO's / 4 (8..128 px): objects here are 8-96 px, most below COCO's smallest anchor (32).
# DEVIATION (CPU cost only): precise BN over 20 batches, not detectron2's 200 (a tenth of the 200 iterations).
CPU = dict(anchor_sizes="8,16,32,64,128", depth=18, batch_size=4, lr=0.02, warmup=50, min_size="128,144,160",
           max_size=256, test_size=144, workers=1, ckpt_every=50, log_every=10, roi_batch=32, test_proposals=100,
           max_dets=20, iters=200, precise_bn=20)
TFA_VOC_MIN_SIZE = ",".join(map(str, range(480, 801, 32)))  # TFA's VOC few-shot configs (4.4): short side 480-800
DEFAULT_INIT = Path("runs/pretrain/pretrained.pth")
# The flags that define a run (model, data, subset, schedule): checkpoint.pth resumes only when they are unchanged
DATA_KEYS = ("coco", "train_json", "train_images", "val_json", "val_images")
# What a run from before a flag existed did; resuming it keeps doing so (check_same_run): it trained on empty images
# (--keep-empty), kept 1000 RPN proposals per image in every detector (--train-proposals), mixed orientations
LEGACY_DEFAULTS = {"keep_empty": True, "train_proposals": 1000, "aspect_grouping": False}
RUN_KEYS = (*DATA_KEYS, "detector", "init", "depth", "head", "fpn_channels", "mask_dim", "label_fraction", "keep_empty",
            "shots", "novel", "base_full", "iters", "batch_size", "lr", "warmup", "weight_decay", "min_size",
            "max_size", "roi_batch", "anchor_sizes", "train_proposals", "aspect_grouping", "seed")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--detector", default="mask", choices=("faster", "mask", "cascade"),
                   help="mask: COCO (4.3); cascade: SODA10M (4.3); faster: VOC few-shot (4.4)")
    p.add_argument("--coco", help="COCO root: annotations/instances_{train,val}2017.json, train2017/, val2017/")
    for flag in ("--train-json", "--train-images", "--val-json", "--val-images"):
        p.add_argument(flag, help="COCO-format splits: the four together (default: the embedded synthetic dataset)")
    p.add_argument("--init", help="pretrained.pth | none | torchvision:PATH (default: %s if it exists)" % DEFAULT_INIT)
    p.add_argument("--depth", type=int, help="ResNet depth (paper 50; CPU preset 18)")
    p.add_argument("--head", default="4conv1fc", choices=("4conv1fc", "2fc"), help="box head (pre-trained: 4conv1fc)")
    p.add_argument("--fpn-channels", type=positive_int, default=model_lib.FPN_CHANNELS,
                   help="FPN d, as pre-trained (FPN paper 256; DEVIATION, the CPU study: 128)")
    p.add_argument("--mask-dim", type=positive_int, default=256,
                   help="mask head width (Mask R-CNN 256; DEVIATION, CPU study 64)")
    p.add_argument("--label-fraction", type=float, default=1.0, help="4.3: 0.01 / 0.1 / 1.0 of the train images")
    p.add_argument("--keep-empty", action="store_true", help="also train on the subset's images without a box "
                   "(DEVIATION from detectron2 / torchvision, which drop them: ~0.9%% of train2017)")
    p.add_argument("--shots", type=positive_int, help="4.4: K instances per class (TFA protocol, see coco_data.py)")
    p.add_argument("--novel", help="novel category ids '1,2,3' or voc1 / voc2 / voc3 (TFA's VOC splits)")
    p.add_argument("--base-full", action="store_true", help="with --shots: base classes keep all annotations")
    p.add_argument("--iters", type=positive_int, help="iterations (default: 90k, label-scarce 9k, x 16 / batch)")
    p.add_argument("--batch-size", type=positive_int, help="global images per iteration (paper 16)")
    p.add_argument("--lr", type=float, help="peak lr (paper preset: 0.02 x batch / 16; CPU preset: 0.02)")
    p.add_argument("--warmup", type=int, help="linear warm-up iterations (paper preset: 1000, a given value too, "
                   "x 16 / batch; CPU: 50); at most iters / 5")
    # DEVIATION: 4.3 follows SoCo [13], whose detectron2 configs use weight decay 2.5e-5; we default to the
    # detectron2 / Mask R-CNN 1x value 1e-4 (the project's choice); --weight-decay 2.5e-5 reproduces SoCo.
    p.add_argument("--weight-decay", type=float, default=1e-4, help="detectron2 1e-4; SoCo's configs 2.5e-5")
    p.add_argument("--min-size", help="comma list of training short sides (multi-scale)")
    p.add_argument("--max-size", type=positive_int), p.add_argument("--test-size", type=positive_int)
    p.add_argument("--roi-batch", type=positive_int, help="sampled RoIs per image (paper 512)")
    p.add_argument("--anchor-sizes", help="P2..P6 anchor sides, comma list (COCO 32,64,128,256,512 at 800 px)")
    p.add_argument("--train-proposals", type=positive_int, help="RPN proposals per image kept for the RoI heads in "
                   "training (detectron2: 1000; its Cascade R-CNN configs: 2000, the default with --detector cascade)")
    p.add_argument("--test-proposals", type=positive_int, help="RPN proposals per image at test (paper 1000)")
    p.add_argument("--max-dets", type=positive_int, help="detections per image (COCO 100)")
    p.add_argument("--precise-bn", type=in_range(0), help="batches over which BN statistics are recomputed after "
                   "the last iteration, before model_final.pth (SoCo's config enables detectron2's precise BN: 200; "
                   "CPU preset 20; 0: off)")
    p.add_argument("--aspect-grouping", action=argparse.BooleanOptionalAction, default=True,
                   help="batches of landscape or of portrait images only (detectron2's ASPECT_RATIO_GROUPING)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    p.add_argument("--workers", type=int), p.add_argument("--ckpt-every", type=positive_int)
    p.add_argument("--log-every", type=positive_int)
    p.add_argument("--out", default="runs/finetune")
    p.add_argument("--eval-only", action="store_true", help="evaluate --out/model_final.pth only")
    p.add_argument("--val-limit", type=positive_int, help="evaluate on the first N val images only (quick checks; "
                   "the paper's numbers: all)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for action in p._actions:  # parsed again without defaults: only the flags typed are set
        action.default = argparse.SUPPRESS
    args.given = sorted(vars(p.parse_args(argv)))  # check_same_run: an older checkpoint never overrides them
    return args


def resolve(args) -> tuple[argparse.Namespace, str]:
    """Fill unset flags from the preset (PAPER with a data path, CPU without) and derive the schedule."""
    if args.train_json and args.novel and args.novel.startswith("voc") and args.min_size is None:
        args.min_size = TFA_VOC_MIN_SIZE
    if args.coco:
        r = Path(args.coco)
        args.train_json = args.train_json or str(r / "annotations/instances_train2017.json")
        args.train_images = args.train_images or str(r / "train2017")
        args.val_json = args.val_json or str(r / "annotations/instances_val2017.json")
        args.val_images = args.val_images or str(r / "val2017")
    name, preset = ("paper", PAPER) if args.train_json else ("cpu", CPU)
    apply_preset(args, preset)
    scale = REF_BATCH / args.batch_size
    if args.iters is None:
        args.iters = round((9000 if args.label_fraction < 1 or args.shots else 90000) * scale)
    if name == "paper":
        args.warmup = round(args.warmup * scale)
    if args.lr is None:
        args.lr = 0.02 * args.batch_size / REF_BATCH
    args.warmup = min(args.warmup, args.iters // 5)
    if args.train_proposals is None:  # detectron2's Misc/cascade_mask_rcnn_R_50_FPN_*.yaml: POST_NMS_TOPK_TRAIN 2000
        args.train_proposals = 2000 if args.detector == "cascade" else 1000
    args.steps = (round(args.iters * 2 / 3), round(args.iters * 8 / 9))  # 60k / 80k of 90k
    if args.init is None:
        args.init = str(DEFAULT_INIT) if DEFAULT_INIT.exists() else "none"
    return args, name


def build_datasets(args, log=print):
    """Train / val CocoSets, the train subset (label fraction or K-shot) and its record for subset.json."""
    paths = (args.train_json, args.train_images, args.val_json, args.val_images)
    if any(paths):  # all four or none (the embedded splits): a lone --val-json would be ignored silently
        tj, ti, vj, vi = paths
        if not all(paths):
            raise SystemExit("give --train-json, --train-images, --val-json and --val-images together (or --coco "
                             "ROOT, or none of them for the embedded dataset)")
    else:
        import data
        root = data.ensure_synthetic_dataset()
        tj, ti, vj, vi = root / "annotations/train.json", root / "train", root / "annotations/val.json", root / "val"
    with bad_input_exits():  # a malformed JSON, missing images...: one line naming the file
        train, val = coco_data.load_coco(tj, ti), coco_data.load_coco(vj, vi)
        if args.detector == "mask":
            coco_data.require_masks(val)  # mask AP needs every val mask: refuse now, not after training
    for cs in (train, val):
        log(f"{cs.path}: {len(cs.images)} images, {sum(map(len, cs.anns.values()))} boxes, {len(cs.cat_ids)} "
            f"classes; skipped {cs.skipped or 'nothing'}")
    if train.cat_ids != val.cat_ids:
        raise SystemExit(f"train categories {train.cat_ids} differ from val categories {val.cat_ids}")
    if not any(val.anns.values()):  # COCOeval would report AP 0 / -1 after the whole schedule (load_coco: no images)
        raise SystemExit(f"{vj}: the val set has {len(val.images)} images and no usable annotation: nothing to "
                         "evaluate; give a val JSON with boxes")
    try:
        novel = novel_ids(args.novel, train.cat_ids, train.names) if args.novel else None
    except ValueError as e:
        raise SystemExit(f"--novel {e}") from None
    record = {"seed": args.seed, "train_json": str(tj)}
    if args.shots:
        keep = coco_data.kshot_subset(train, args.shots, args.seed, novel, args.base_full)
        record.update(protocol="kshot", shots=args.shots, novel=novel, base_full=args.base_full, image_ids=list(keep),
                      annotation_ids=[a.get("id") for anns in keep.values() for a in anns])
    else:
        keep = coco_data.label_fraction_subset(train.images, args.label_fraction, args.seed)  # of all images (1%: 1183)
        boxed = [i for i in keep if train.anns[i]]  # images without a box (none, or crowd only): dropped as detectron2
        if len(boxed) < len(keep) and not args.keep_empty:
            log(f"{tj}: {len(keep) - len(boxed)} of the subset's images have no box: not trained on (--keep-empty "
                "keeps them)")
            keep = boxed
        record.update(protocol="label_fraction", fraction=args.label_fraction, image_ids=keep)
    if not (sum(map(len, keep.values())) if args.shots else sum(len(train.anns[i]) for i in keep)):
        raise SystemExit(f"{tj}: the train subset ({record['protocol']}, seed {args.seed}) has no usable annotation: "
                         "nothing to train on")
    return train, val, keep, novel, record


def build_detector(args, num_classes: int, log=print) -> Detector:
    sizes = tuple(int(v) for v in str(args.min_size).split(","))
    cfg = DetectorConfig(num_classes=num_classes, kind=args.detector, depth=args.depth, head=args.head,
                         fpn_channels=args.fpn_channels, mask_dim=args.mask_dim,
                         anchor_sizes=anchor_sizes(args.anchor_sizes, 5),  # P2-P6
                         min_size=sizes, max_size=args.max_size, test_size=args.test_size, roi_batch=args.roi_batch,
                         rpn_post_nms_train=args.train_proposals, rpn_pre_nms_test=max(args.test_proposals, 1000),
                         rpn_post_nms_test=args.test_proposals,
                         max_dets=args.max_dets)
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    weights = args.init.split(":", 1)[1] if args.init.startswith("torchvision:") else None
    if args.init == "none" or weights:
        try:  # an unreadable or mismatched torchvision file: one line naming it
            det = Detector(cfg, weights_path=weights)
        except ValueError as e:
            raise SystemExit(f"--init: {e}" if weights else str(e)) from None
        log(f"init: backbone from the torchvision checkpoint {weights}; FPN, RPN and heads fresh" if weights else
            "init: none (random initialisation of every layer)")
        return det
    det = Detector(cfg)
    try:
        load_pretrained(det, args.init, verbose=True)
    except ValueError as e:  # an unreadable or mismatched pretrained.pth
        raise SystemExit(f"--init: {e}") from None
    return det


def evaluate(det: Detector, val: coco_data.CocoSet, device, novel=None, kshot: bool = False, out: Path | None = None,
             limit: int | None = None) -> dict:
    """COCO AP (box; mask for Mask R-CNN) on the val split with eval.py; with kshot also VOC mAP50 (11-point, VOC07)
    for all / novel / base classes. The predictions go to out/predictions.json (COCO results format) for TIDE.
    limit: only the first `limit` val images (by id) are predicted and evaluated (quick checks)."""
    from coco_files import save_results
    from predict import predict_split
    results = predict_split(det, val, sorted(val.images)[:limit], device)
    if out is not None:
        save_results(results, out / "predictions.json")
    metrics = {"bbox": ev.coco_eval(val.path, results, "bbox")}
    if det.cfg.kind == "mask":
        metrics["segm"] = ev.coco_eval(val.path, results, "segm")
    if kshot:
        # VOC2007 test's 11-point AP, as TFA [33] evaluates test07; difficult objects ignored (voc_data.voc_to_coco)
        metrics["voc_map50"] = ev.voc_map50(val.path, results, novel_ids=novel, use_07_metric=True)
    return metrics


def main(argv=None) -> dict | None:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "voc2coco":
        with bad_input_exits():  # a missing image-set list, a malformed XML: one line naming it
            return voc2coco_cli(argv[1:])
    args, preset = resolve(parse_args(argv))
    rank, world, device = setup_distributed()
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    out, ck, final = Path(args.out), None, None
    if args.eval_only:  # the run's own subset / schedule / init (model_final.pth's args), the flags' data paths
        final = read_checkpoint(out / "model_final.pth", ("state_dict", "config"), "finetune.py model")
        saved = saved_args(final)
        vars(args).update({k: v for k, v in saved.items() if k in RUN_KEYS and k not in DATA_KEYS})
    elif (out / "checkpoint.pth").exists():
        ck = read_checkpoint(out / "checkpoint.pth", ("model", "optimizer", "step"), "finetune.py checkpoint")
        check_same_run(out / "checkpoint.pth", ck, args, log)
    log(f"preset: {preset} ({'data path given' if args.train_json else 'embedded synthetic dataset'}); flags "
        f"override it\n{json.dumps({**vars(args), 'world_size': world, 'device': str(device)})}")
    train, val, keep, novel, record = build_datasets(args, log)
    if not args.eval_only:
        det = build_detector(args, len(train.cat_ids), log)
        if rank == 0 and ck is None:  # a resumed run keeps the subset.json it was trained on
            out.mkdir(parents=True, exist_ok=True)
            ev.write_metrics(record, out / "subset.json")
        log(f"train subset: {len(record['image_ids'])} images ({record['protocol']}); ids in {out / 'subset.json'}")
        train_loop(args, det, train, keep, rank, world, device, out, log, ck)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    if rank != 0:
        return None
    if not args.eval_only:
        plot_curves(out / "log.jsonl", log)
    final = final or read_checkpoint(out / "model_final.pth", ("state_dict", "config"), "finetune.py model")
    det = Detector(DetectorConfig(**final["config"]))  # its own config, as eval.predict_checkpoint
    det.load_state_dict(final["state_dict"])
    if final.get("cat_ids", val.cat_ids) != val.cat_ids:
        raise SystemExit(f"{out / 'model_final.pth'}: categories {final['cat_ids']} differ from {val.path}'s")
    metrics = evaluate(det.to(device), val, device, novel, kshot=bool(args.shots), out=out, limit=args.val_limit)
    metrics.update(iters=args.iters, detector=args.detector, init=args.init, train_images=len(record["image_ids"]),
                   val_images=min(len(val.images), args.val_limit or len(val.images)))
    log(ev.write_metrics(metrics, out / "metrics.json").read_text())  # strict JSON: COCOeval's NaN -> null
    return metrics


def check_same_run(path: Path, ck: dict, args, log=print) -> None:
    """Refuse to resume a checkpoint written with other RUN_KEYS flags: it would continue another model, subset or
    schedule, and subset.json / metrics.json would describe a run the model never had. Data paths compare as
    resolved paths (from the current folder): 'coco' and '/data/coco' name the same data there. A checkpoint from
    before a flag existed resumes as it was trained unless that flag was typed (args.given): args takes the flag's
    LEGACY_DEFAULTS value (logged); a typed value that differs is refused like any other."""
    for k, v in LEGACY_DEFAULTS.items():
        if ck.get("args") and k not in ck["args"] and k not in getattr(args, "given", ()) and getattr(args, k, v) != v:
            log(f"{path}: written before --{k.replace('_', '-')} existed; resumed with {k} = {v!r}, as it was trained")
            setattr(args, k, v)

    def resolved(a: dict) -> dict:
        return {**a, **{k: str(Path(a[k]).resolve()) for k in DATA_KEYS if a.get(k)}}
    refuse_other_run(path, resolved(saved_args(ck)), resolved(vars(args)), RUN_KEYS)


def saved_args(ck: dict) -> dict:
    """A checkpoint's or model_final.pth's flags; a run from before a flag existed did what LEGACY_DEFAULTS says."""
    return {**LEGACY_DEFAULTS, **ck["args"]} if ck.get("args") else {}


if __name__ == "__main__":
    main()
    exit_distributed()
