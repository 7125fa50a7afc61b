"""Benchmark: our Mask R-CNN (detector.Detector, kind "mask") against torchvision's, train step and inference
(issue 7, item 2; paper section 4.3 fine-tunes Mask R-CNN R50-FPN on COCO).

Same images, same sizes, same machine, one run, interleaved rounds. Matched settings (--variant v1, the default):
    torchvision maskrcnn_resnet50_fpn(weights=None, weights_backbone=None): BatchNorm in the backbone (trainable,
        as torchvision sets it without pre-trained weights), FPN without norm, RPN one 3x3 conv, TwoMLPHead (2fc),
        4-conv mask head without norm, MultiScaleRoIAlign sampling_ratio 2.
    ours: DetectorConfig(kind="mask", fpn_norm="none", head="2fc", mask_norm="none", sampling_ratio=2).
    both: short side --size, long side <= --max-size (the images are already that size: no rescaling), RPN 256
        anchors/image (1/2 positive), 2000 proposals per level before NMS and 1000 per image after it in training
        (torchvision's default 2000 after NMS lowered to detectron2's 1000, ours), 1000/1000 at test, 512 sampled
        RoIs per image (1/4 positive), ground-truth boxes added to the proposals, SGD momentum 0.9.
    inference: score threshold 0 on both, so each image keeps max_dets = 100 detections and the mask head runs on
        all of them (random weights would leave nothing above the usual 0.05).
--variant v2: ours with the paper's fine-tuning heads (BN FPN, 4conv1fc BN box head, BN mask head, adaptive
    RoIAlign sampling) against maskrcnn_resnet50_fpn_v2 (same heads; its RPN head has 2 convs, ours 1). ResNet-50 only.
With --depth other than 50 (CPU default 18) torchvision's model is MaskRCNN on resnet_fpn_backbone(resnet{depth},
BatchNorm2d, all layers trainable): the same construction as maskrcnn_resnet50_fpn.

Symbols: B images per step, S short side, M objects per image (boxes + masks), C classes (80, COCO).

    python bench/finetune_step.py                      # CPU: ResNet-18, 2 images of 320 x 427, 8 objects each
    python bench/finetune_step.py --device cuda --depth 50 --size 800 --batch-size 2 --amp
    ... --profile      # also: each model's train step by operator (self time on the device / the CPU), host syncs

Public: make_inputs, build_ours, build_torchvision, main(argv).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402

sys.path.insert(0, str(report.repo_root()))
from detector import Detector, DetectorConfig  # noqa: E402
sys.path.insert(0, str(report.repo_root() / "tests"))
from sync_ops import SyncOpCounter  # noqa: E402

NUM_CLASSES = 80  # COCO


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--depth", type=int, help="ResNet depth (default 50 on CUDA, 18 on CPU)")
    p.add_argument("--variant", default="v1", choices=("v1", "v2"))
    p.add_argument("--batch-size", type=int, help="images per step (default 2)", default=2)
    p.add_argument("--size", type=int, help="short side (default 800 on CUDA, 320 on CPU)")
    p.add_argument("--max-size", type=int, default=1333)
    p.add_argument("--objects", type=int, default=8, help="M ground-truth objects per image")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (both models)")
    p.add_argument("--steps", type=int, help="timed steps per model and phase (default 6 on CUDA, 2 on CPU)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warmup", type=int, help="untimed steps first (default 2 on CUDA, 1 on CPU)")
    p.add_argument("--skip-inference", action="store_true")
    p.add_argument("--profile", action="store_true",
                   help="after the timing: each model's train step by operator (torch.profiler), and on CUDA the "
                        "host syncs per step: where our step loses to torchvision's")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 on a shared machine)")
    a = p.parse_args(argv)
    cuda = a.device.startswith("cuda")
    a.depth = a.depth or (50 if cuda else 18)
    a.size = a.size or (800 if cuda else 320)
    a.steps = a.steps or (6 if cuda else 2)
    a.warmup = a.warmup if a.warmup is not None else (2 if cuda else 1)
    if a.variant == "v2" and a.depth != 50:
        raise SystemExit("--variant v2 compares against maskrcnn_resnet50_fpn_v2: use --depth 50")
    return a


def make_inputs(B: int, size: int, M: int, device, seed: int = 0):
    """B images (3, S, 4S/3) float in [0, 1] and targets: M boxes (xyxy, sides 5-60 % of the image), labels in
    1..C, masks (M, H, W) uint8 = the ellipse inscribed in each box."""
    g = torch.Generator().manual_seed(seed)
    H, W = size, round(size * 4 / 3)
    images, targets = [], []
    yy, xx = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    for _ in range(B):
        images.append(torch.rand(3, H, W, generator=g).to(device))
        wh = torch.rand(M, 2, generator=g) * 0.55 + 0.05
        wh = wh * torch.tensor([W, H])
        xy = torch.rand(M, 2, generator=g) * (torch.tensor([W, H]) - wh)
        boxes = torch.cat([xy, xy + wh], dim=1)  # (M, 4)
        c, r = (boxes[:, :2] + boxes[:, 2:]) / 2, wh / 2  # centres, radii (M, 2)
        masks = (((xx - c[:, None, None, 0]) / r[:, None, None, 0]) ** 2
                 + ((yy - c[:, None, None, 1]) / r[:, None, None, 1]) ** 2 <= 1).to(torch.uint8)  # (M, H, W)
        labels = torch.randint(1, NUM_CLASSES + 1, (M,), generator=g)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device), "masks": masks.to(device)})
    return images, targets


def build_ours(args) -> Detector:
    common = dict(num_classes=NUM_CLASSES, kind="mask", depth=args.depth, min_size=(args.size,),
                  test_size=args.size, max_size=args.max_size, rpn_pre_nms_train=2000, rpn_post_nms_train=1000,
                  rpn_pre_nms_test=1000, rpn_post_nms_test=1000, roi_batch=512, roi_positive_fraction=0.25,
                  score_thresh=0.0, max_dets=100)
    if args.variant == "v1":
        cfg = DetectorConfig(fpn_norm="none", head="2fc", mask_norm="none", sampling_ratio=2, **common)
    else:
        cfg = DetectorConfig(fpn_norm="bn", head="4conv1fc", head_norm="bn", mask_norm="bn", sampling_ratio=0,
                             **common)
    return Detector(cfg)


def build_torchvision(args) -> nn.Module:
    from torchvision.models.detection import (MaskRCNN, maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2)
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    kw = dict(num_classes=NUM_CLASSES + 1, min_size=args.size, max_size=args.max_size,
              rpn_pre_nms_top_n_train=2000, rpn_post_nms_top_n_train=1000, rpn_pre_nms_top_n_test=1000,
              rpn_post_nms_top_n_test=1000, box_batch_size_per_image=512, box_positive_fraction=0.25,
              box_score_thresh=0.0, box_detections_per_img=100)
    if args.variant == "v2":
        return maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, **kw)
    if args.depth == 50:
        return maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, **kw)
    backbone = resnet_fpn_backbone(backbone_name=f"resnet{args.depth}", weights=None, norm_layer=nn.BatchNorm2d,
                                   trainable_layers=5)
    return MaskRCNN(backbone, **kw)


def _autocast(args):
    return torch.autocast("cuda", torch.bfloat16) if args.amp and args.device.startswith("cuda") \
        else contextlib.nullcontext()


def train_fn(net, loss_of, images, targets, args):
    """One SGD step: loss_of(images, targets) -> dict of losses; summed, backward, step."""
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-4, momentum=0.9,
                          weight_decay=1e-4)

    def step():
        with _autocast(args):
            losses = loss_of(images, targets)
        loss = sum(v for k, v in losses.items() if k != "loss")  # ours also returns the total as "loss"
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def infer_fn(net, images, args):
    def step():
        with torch.no_grad(), _autocast(args):
            return net(images)
    return step


def run(args, device) -> list[dict]:
    torch.manual_seed(0)
    ours, theirs = build_ours(args).to(device), build_torchvision(args).to(device)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_theirs = sum(p.numel() for p in theirs.parameters())
    images, targets = make_inputs(args.batch_size, args.size, args.objects, device)
    B, rows = args.batch_size, []
    ours.train()
    theirs.train()
    t = report.time_rounds({"ours": train_fn(ours, ours.losses, images, targets, args),
                            "torchvision": train_fn(theirs, theirs, images, targets, args)},
                           args.steps, args.rounds, args.warmup, device)
    rows.append({"phase": "train step", "ours_img_s": B / t["ours"], "torchvision_img_s": B / t["torchvision"],
                 "ratio_ours_over_tv": t["torchvision"] / t["ours"], "ours_ms": 1e3 * t["ours"],
                 "torchvision_ms": 1e3 * t["torchvision"]})
    print(f"  train: ours {rows[-1]['ours_img_s']:.3g} img/s, torchvision {rows[-1]['torchvision_img_s']:.3g} img/s;"
          f" load {report.load_average()}", flush=True)
    if not args.skip_inference:
        ours.eval()
        theirs.eval()
        n_det = [len(o["boxes"]) for o in infer_fn(ours, images, args)()]
        n_det_tv = [len(o["boxes"]) for o in infer_fn(theirs, images, args)()]
        t = report.time_rounds({"ours": infer_fn(ours, images, args), "torchvision": infer_fn(theirs, images, args)},
                               args.steps, args.rounds, max(0, args.warmup - 1), device)
        rows.append({"phase": f"inference ({n_det} vs {n_det_tv} dets)", "ours_img_s": B / t["ours"],
                     "torchvision_img_s": B / t["torchvision"], "ratio_ours_over_tv": t["torchvision"] / t["ours"],
                     "ours_ms": 1e3 * t["ours"], "torchvision_ms": 1e3 * t["torchvision"]})
    print(f"parameters: ours {n_ours / 1e6:.2f} M, torchvision {n_theirs / 1e6:.2f} M")
    if args.profile:
        ours.train()
        theirs.train()
        profile({"ours": train_fn(ours, ours.losses, images, targets, args),
                 "torchvision": train_fn(theirs, theirs, images, targets, args)}, device)
    return rows


def profile(fns: dict, device, top: int = 12) -> None:
    """Per model: one warm train step under torch.profiler, the top operators by self time (on CUDA the device's,
    else the CPU's), the number of operator calls, and on CUDA the host syncs of one step."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    key = "self_cpu_time_total"
    if device.type == "cuda":
        import pretrain_step

        acts.append(torch.profiler.ProfilerActivity.CUDA)
        key = "self_device_time_total"
    for name, fn in fns.items():
        fn()  # warm (allocator, cuDNN choices)
        with SyncOpCounter() as counter:
            fn()
        print(f"\n{name}: {counter.total} ops that make a GPU wait for the host (tests/sync_ops.py) in one train step: "
              + ", ".join(f"{k} {v}" for k, v in sorted(counter.counts.items(), key=lambda kv: -kv[1])))
        if device.type == "cuda":
            torch.cuda.synchronize()
            print(f"\n{name}: host syncs in one train step: {pretrain_step.count_syncs(fn)}")
        with torch.profiler.profile(activities=acts) as prof:
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
        events = prof.key_averages()
        print(f"\n{name}: {sum(e.count for e in events)} operator calls in one train step; top {top} by "
              f"{key.replace('_', ' ')}\n")
        print(events.table(sort_by=key, row_limit=top, max_name_column_width=50))


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(report.header("fine-tuning: our Mask R-CNN vs torchvision's (bench/finetune_step.py)", device))
    H, W = args.size, round(args.size * 4 / 3)
    tv_name = "maskrcnn_resnet50_fpn_v2" if args.variant == "v2" else (
        "maskrcnn_resnet50_fpn" if args.depth == 50 else f"MaskRCNN(resnet_fpn_backbone(resnet{args.depth}))")
    print(f"settings: variant {args.variant} (torchvision {tv_name}, torchvision {torchvision.__version__}), "
          f"ResNet-{args.depth}, batch {args.batch_size} images of {H} x {W}, {args.objects} objects each, "
          f"{NUM_CLASSES} classes, amp(bf16)={args.amp and device.type == 'cuda'}, 512 RoIs/image, "
          f"steps {args.steps} in {args.rounds} rounds after {args.warmup} warm-up", flush=True)
    rows = run(args, device)
    print()
    print(report.table(rows, ["phase", "ours_img_s", "torchvision_img_s", "ratio_ours_over_tv", "ours_ms",
                              "torchvision_ms"]))
    print(f"\nload average at end: {report.load_average()}; goal: ratio ours/torchvision >= 1.0")
    return rows


if __name__ == "__main__":
    main()
