"""The paper's questions in miniature: a label-efficiency study on the embedded dataset (sections 1 Q1-Q3, 4.3-4.5:
Tables 1-4, Figure 1), resumable, with mean +- std over seeds and the paper's numbers beside ours.

    python study.py --preset cpu            # ResNet-18, ~2 h on 2 cores (planned budget printed at start)
    python study.py --preset gpu            # ResNet-50, 224 px pre-training (one H100)
    python study.py --preset smoke          # a step or two per cell, one seed: the pipeline end to end
    python study.py --preset cpu --dry-run  # the cell plan and its budget only
    python study.py --preset cpu --methods scratch,soco,joint --fractions 0.1,1 --iters 2000 --shots none \
        --no-ablation                       # a smaller plan: only the cells asked for (and their pre-training)

Cells (each a subprocess writing into results/runs/<cell>/, its output in log.txt; a cell whose cell.json exists is
skipped, and train.py / finetune.py resume from their checkpoint.pth):
    pretrain/<variant>/s<seed>   train.py: byol, soco, separate (--init: the soco cell's pretrained.pth), joint and
                                 Table 4's switches of joint (rpngrad: --rpn-grad-to-backbone, rpnprop:
                                 --rpn-proposals, both); then the RPN's proposal recall on val (3.2, 4.1.3)
    recall/{selective_search,random_rpn}   reference recalls: the paper's selective search, an untrained RPN
    finetune/<method>/f<fraction>/s<seed>   Mask R-CNN on 1 / 10 / 100% of train (4.3, Table 1; Table 4 variants)
    fewshot/<method>/k<K>/s<seed>            Faster R-CNN, K shots of the novel classes, base classes in full (4.4)
Fine-tuning cells save val predictions (predictions.json) and their TIDE errors (4.5.1) next to finetune.py's
metrics. Outputs: results/label_efficiency.md, results/metrics.json, results/ap_vs_labels.png, results/tide.png.

Symbols: AP_bb / AP_mk COCO box / mask AP; nAP / mAP VOC mAP50 of novel / all classes; AR@k proposal recall;
s seed; f label fraction; K shots; SE standard error of a difference of two means over seeds.

Public: PRESETS, Cell, plan(preset, seeds, root, files, novel, keep_weights) -> [Cell], estimate(cell, preset, val_n)
-> seconds, run_cell(cell, env) -> bool, run_cells(cells, jobs, runner) -> {name: state}, dataset_files(root,
val_images) -> (files, val image count, category ids) of the embedded dataset, parse_args(argv) -> Namespace,
override(preset, args) -> preset with the plan flags, main(argv); the cells' entry points (finetune_cell,
recall_cell, and the recalls they compute) live in study_cells.py; from study_report.py:
aggregate(cells, root, preset, files) -> md path, mean_std(values), verdict(a, b).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from study_cells import finetune_cell, recall_cell  # the cells' entry points (python study.py _finetune / _recall)
from study_report import aggregate, mean_std, verdict  # noqa: F401  (tables, plots, verdicts)

REPO = Path(__file__).resolve().parent
PY = sys.executable
TABLE1 = ("scratch", "byol", "soco", "separate", "joint")  # Table 1 rows (scratch: no pre-training)
SWITCHES = {"joint": (), "rpngrad": ("--rpn-grad-to-backbone",), "rpnprop": ("--rpn-proposals",),
            "both": ("--rpn-grad-to-backbone", "--rpn-proposals")}  # Table 4: joint's loss / proposal switches
# Costs (s per image, one process, OMP_NUM_THREADS=1, two such processes on the 2 cores) of the narrow CPU models
# (FT_CPU), measured on 2026-11-27: pre-training joint 0.27 (batch 16, 96 px), Mask R-CNN training 0.38 (batch 4,
# 128-160 px, 32 RoIs), Mask R-CNN inference 0.23 (100 proposals). soco, byol, separate and Faster R-CNN are scaled
# from the ratios measured on the 256-wide models (soco = joint, byol 0.29x, separate 0.25x; Faster 0.75x Mask).
# ~12 s to start a process.
CPU_COST = dict(source="measured on the 2-core development VM on 2026-11-27 (joint, Mask R-CNN), the rest scaled",
                start=12, pre=dict(joint=0.27, soco=0.27, byol=0.08, separate=0.07),
                train=dict(mask=0.38, faster=0.29), infer=dict(mask=0.23, faster=0.2), recall=0.15, ss=0.1)
# GPU: measured on one H100 on 2026-11-27 (bench/gpu_run.sh; results/gpu_part_h100.md): pre-training joint 373
# images/s end to end (ResNet-50, batch 128, 8 loader workers), Mask R-CNN training 67.5 images/s (batch 16,
# 256-320 px); soco, byol, separate and Faster R-CNN scaled by the CPU ratios above; inference not timed alone.
GPU_COST = dict(source="measured on one H100 (joint, Mask R-CNN training), the rest scaled", start=20,
                pre=dict(joint=1 / 373, soco=1 / 373, byol=0.29 / 373, separate=0.25 / 373),
                train=dict(mask=1 / 67.5, faster=0.75 / 67.5), infer=dict(mask=1 / 80, faster=1 / 100), recall=0.01,
                ss=0.1)
# finetune.py's CPU preset (its DEVIATIONs: 32 RoIs, 100 test proposals), warm-up shortened to the short schedules.
# All flags are passed explicitly: finetune.py applies its paper preset whenever --train-json is given.
# DEVIATION (CPU cost: 3.4x faster per step, bench/cpu_presets.py; pre-training uses the same g and C): 2fc box head vs
# SoCo's 4conv1fc, FPN width 128 instead of 256, mask head 64 wide instead of 256.
# DEVIATION (scale): the embedded images are 128-160 px at native size, objects 8-96 px (median short side 23 px), so
# the anchors are COCO's / 4 (8..128 on P2..P6, where COCO's 32 px smallest anchor missed most objects); pre-training
# anchors are the paper's / 4 too (6..48 on P2..P5), as in finetune.py's and train.py's CPU presets.
# DEVIATION (CPU / GPU budget): precise BN over 10 (cpu) / 50 (gpu) batches, not detectron2's 200.
FT_CPU = dict(depth=18, head="2fc", fpn_channels=128, mask_dim=64, anchor_sizes="8,16,32,64,128", batch_size=4,
              lr=0.02, warmup=10, min_size="128,144,160", max_size=256, test_size=144, workers=1, ckpt_every=20,
              log_every=5, roi_batch=32, test_proposals=100, max_dets=20, precise_bn=10)
# DEVIATION (CPU budget; flags --seeds, --val-images): "cpu" evaluates on the first 40 of the 200 val images and
# shares one pre-training run per variant across the fine-tuning seeds ("gpu": all val images, one run per seed);
# schedules are a few dozen steps (the paper: 100 ImageNet epochs, 9k-90k fine-tuning iterations).
# DEVIATION ("gpu" fine-tuning sizes): short side 256-320 px, not COCO's 640-800: the embedded images are 128-160 px.
PRESETS = {
    # 3 seeds in ~2 h on 2 cores (the budget); the iteration counts are what that budget buys
    "cpu": dict(depth=18, pre_anchors="6,12,24,48", pre_batch=16, pre_steps=60, size=96, small_size=48,
                warmup_epochs=0.1, pre_workers=1, shared_pretrain=True, fractions=(0.01, 0.1, 1.0),
                iters={0.01: 40, 0.1: 80, 1.0: 160}, shots=(1, 5, 10), shot_iters=60,
                fewshot=("soco", "separate", "joint"), ablation=(0.1,), val_images=40, seeds=3, jobs=2,
                ft=FT_CPU, cost=CPU_COST, amp=False),
    "gpu": dict(depth=50, pre_anchors="24,48,96,192", pre_batch=128, pre_steps=1000, size=224, small_size=112,
                warmup_epochs=10, pre_workers=8,
                shared_pretrain=False, fractions=(0.01, 0.1, 1.0), iters={0.01: 300, 0.1: 600, 1.0: 1500},
                shots=(1, 5, 10), shot_iters=300, fewshot=TABLE1, ablation=(0.01, 0.1, 1.0), val_images=None, seeds=3,
                jobs=1, cost=GPU_COST, amp=True,
                # images at 2x (256-320 px): objects 16-190 px, anchors COCO's / 2
                ft=dict(depth=50, head="4conv1fc", fpn_channels=256, mask_dim=256, anchor_sizes="16,32,64,128,256",
                        batch_size=16, lr=0.02, warmup=100, min_size="256,288,320", max_size=544, test_size=288,
                        workers=8, ckpt_every=500, log_every=20, roi_batch=128, test_proposals=300, max_dets=100,
                        precise_bn=50)),
    "smoke": dict(depth=18, pre_anchors="6,12,24,48", pre_batch=4, pre_steps=1, size=64, small_size=32,
                  warmup_epochs=0.1, pre_workers=0,
                  shared_pretrain=True, fractions=(0.01, 0.1, 1.0), iters={0.01: 1, 0.1: 1, 1.0: 1}, shots=(1, 5, 10),
                  shot_iters=1, fewshot=("soco", "separate", "joint"), ablation=(0.1,), val_images=4, seeds=1, jobs=1,
                  ft=dict(FT_CPU, batch_size=2, warmup=1, precise_bn=1), cost=CPU_COST, amp=False),
}


@dataclass
class Cell:
    """One unit of work: argv lists run in order inside REPO; done when folder/cell.json exists."""
    name: str
    kind: str  # pretrain | recall | finetune | fewshot
    cmds: list
    folder: Path
    deps: tuple = ()
    info: dict = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return (self.folder / "cell.json").exists()


def _flags(d: dict) -> list:
    return [s for k, v in d.items() for s in (f"--{k.replace('_', '-')}", str(v))]


def _variant_mode(v: str) -> str:
    return v if v in ("byol", "soco", "separate") else "joint"


def _pretrain_cell(p, variant, seed, root, files) -> Cell:
    out = root / "runs" / "pretrain" / variant / f"s{seed}"
    # --max-steps sets the run's length (and its cosine schedule); --epochs only has to exceed it; a checkpoint
    # every 20 steps bounds the work lost to an interruption
    argv = [PY, "train.py", "--mode", _variant_mode(variant), "--out", str(out), "--seed", str(seed), "--epochs",
            "100000", "--max-steps", str(p["pre_steps"]), "--ckpt-every", str(max(1, min(20, p["pre_steps"]))),
            "--log-every", "1"] + _flags({k: p[k] for k in ("depth", "size", "small_size", "warmup_epochs")})
    argv += _flags({k: p["ft"][k] for k in ("head", "fpn_channels")})  # the fine-tuned detector's g and d
    argv += ["--anchor-sizes", p["pre_anchors"]]
    argv += _flags(dict(batch_size=p["pre_batch"], workers=p["pre_workers"])) + list(SWITCHES.get(variant, ()))
    deps = ()
    if variant == "separate":  # 4.2: only the RPN, on the frozen extractor and head of the soco run
        argv += ["--init", str(root / "runs" / "pretrain" / "soco" / f"s{seed}" / "pretrained.pth")]
        deps = (f"pretrain/soco/s{seed}",)
    argv += ["--amp", "--channels-last"] if p["amp"] else []
    recall = [PY, "study.py", "_recall", str(out / "cell.json"), str(out / "pretrained.pth"), *files[2:4]]
    return Cell(f"pretrain/{variant}/s{seed}", "pretrain", [argv, recall], out, deps,
                dict(variant=variant, seed=seed, images=p["pre_steps"] * p["pre_batch"]))


def _finetune_cell(p, kind, method, key, seed, root, files, novel) -> Cell:
    """kind finetune (key = label fraction, Mask R-CNN) or fewshot (key = K shots, Faster R-CNN)."""
    tag = f"f{key:g}" if kind == "finetune" else f"k{key}"
    out = root / "runs" / kind / method / tag / f"s{seed}"
    ps = 0 if p["shared_pretrain"] else seed
    init = "none" if method == "scratch" else str(root / "runs" / "pretrain" / method / f"s{ps}" / "pretrained.pth")
    iters = p["iters"][key] if kind == "finetune" else p["shot_iters"]
    argv = [PY, "study.py", "_finetune", str(out), "--", "--init", init, "--seed", str(seed), "--iters", str(iters),
            "--train-json", files[0], "--train-images", files[1], "--val-json", files[2], "--val-images", files[3]]
    argv += _flags(p["ft"]) + (["--amp"] if p["amp"] else [])
    if kind == "finetune":
        argv += ["--detector", "mask", "--label-fraction", str(key)]
    else:  # 4.4 with base classes in full (finetune.py --base-full), K shots of each novel class
        argv += ["--detector", "faster", "--shots", str(key), "--novel", ",".join(map(str, novel)), "--base-full"]
    deps = () if method == "scratch" else (f"pretrain/{method}/s{ps}",)
    return Cell(f"{kind}/{method}/{tag}/s{seed}", kind, [argv], out, deps,
                dict(method=method, key=key, seed=seed, images=iters * p["ft"]["batch_size"],
                     detector="mask" if kind == "finetune" else "faster"))


def plan(p: dict, seeds, root: Path, files: tuple, novel=(5, 6), keep_weights=False) -> list:
    """The ordered cells (dependencies first). files: (train json, train images, val json, val images);
    keep_weights keeps each fine-tuned model_final.pth (predictions.json is always kept)."""
    root, files = Path(root).resolve(), tuple(str(f) for f in files)
    pseeds = [0] if p["shared_pretrain"] else list(seeds)
    methods = p.get("methods", TABLE1)  # a subset with --methods
    need = set(methods) | set(p["fewshot"]) | ({"soco"} if "separate" in methods else set())
    variants = [v for v in ("byol", "soco", "separate", "joint") if v in need]
    variants += [v for v in SWITCHES if v != "joint" and p["ablation"]]
    cells = [_pretrain_cell(p, v, s, root, files) for s in pseeds for v in variants]
    for ref in ("selective_search", "random_rpn"):
        out = root / "runs" / "recall" / ref
        cells.append(Cell(f"recall/{ref}", "recall", [[PY, "study.py", "_recall", str(out / "cell.json"),
                     "ss" if ref == "selective_search" else "none", *files[2:4], str(p["depth"]),
                     str(p["ft"]["fpn_channels"]), p["pre_anchors"]]], out, (),
                     dict(variant=ref)))
    for s in seeds:
        cells += [_finetune_cell(p, "finetune", m, f, s, root, files, novel) for m in methods for f in p["fractions"]]
        cells += [_finetune_cell(p, "finetune", v, f, s, root, files, novel) for v in SWITCHES if v != "joint"
                  for f in p["ablation"]]
        cells += [_finetune_cell(p, "fewshot", m, k, s, root, files, novel) for m in p["fewshot"] for k in p["shots"]]
    for c in cells:
        c.info["keep"] = keep_weights
    return cells


def estimate(cell: Cell, p: dict, val_n: int) -> float:
    """Planned seconds of one cell from the preset's measured per-image costs."""
    c, i = p["cost"], cell.info
    if cell.kind == "pretrain":
        return 2 * c["start"] + i["images"] * c["pre"][_variant_mode(i["variant"])] + val_n * c["recall"]
    if cell.kind == "recall":
        return c["start"] + val_n * (c["ss"] if i["variant"] == "selective_search" else c["recall"])
    return c["start"] + i["images"] * c["train"][i["detector"]] + val_n * c["infer"][i["detector"]]


def run_cell(cell: Cell, env: dict) -> bool:
    """Run the cell's commands in order, output appended to folder/log.txt; True when cell.json exists. A done
    cell's resume checkpoint (and a fine-tuned model, unless info["keep"]) is deleted: ~0.4 GB per cell."""
    cell.folder.mkdir(parents=True, exist_ok=True)
    with open(cell.folder / "log.txt", "a") as log:
        for argv in cell.cmds:
            log.write(f"\n$ {' '.join(argv)}\n")
            log.flush()
            if subprocess.run(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env).returncode != 0:
                return False
    spent = ("checkpoint.pth",) + (() if cell.kind == "pretrain" or cell.info.get("keep") else ("model_final.pth",))
    for name in spent if cell.done else ():
        (cell.folder / name).unlink(missing_ok=True)
    return cell.done


def run_cells(cells: list, jobs: int = 1, runner=None) -> dict:
    """Run the cells not yet done (jobs at a time, each after its dependencies); returns {name: "done"|"failed"}."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    runner = runner or (lambda c: run_cell(c, env))
    state = {c.name: "done" for c in cells if c.done}
    pending = [c for c in cells if c.name not in state]
    bar = tqdm(total=len(cells), initial=len(state), desc="study cells", dynamic_ncols=True)
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        running = {}
        while pending or running:
            for c in list(pending):
                if any(state.get(d) == "failed" for d in c.deps):  # never runs: counted as failed
                    pending.remove(c), state.update({c.name: "failed"}), bar.update(1)
                elif len(running) < jobs and all(state.get(d) == "done" for d in c.deps):
                    pending.remove(c)
                    running[pool.submit(runner, c)] = c
            if not running:
                break  # a dependency outside the plan that is not done
            bar.set_postfix_str(" | ".join(c.name for c in running.values()))
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in finished:
                c = running.pop(f)
                state[c.name] = "done" if f.exception() is None and f.result() and c.done else "failed"
                bar.update(1)
                if state[c.name] == "failed":
                    tqdm.write(f"FAILED {c.name} ({f.exception() or 'see'} {c.folder / 'log.txt'})")
    bar.close()
    return state


# ---------------- the study ---------------------------------------------------------------------------------------
def dataset_files(root: Path, val_images):
    """(train json, train images, val json, val images) of the embedded dataset; val cut to its first val_images
    images (by id) into root/val_subset.json when given. Also the category ids."""
    import data
    from coco_files import atomic_write
    d = Path(data.ensure_synthetic_dataset())
    val = d / "annotations" / "val.json"
    coco = json.loads(val.read_text())
    if val_images:
        keep = {i["id"] for i in sorted(coco["images"], key=lambda i: i["id"])[:val_images]}
        coco = dict(coco, images=[i for i in coco["images"] if i["id"] in keep],
                    annotations=[a for a in coco["annotations"] if a["image_id"] in keep])
        val = root / "val_subset.json"
        atomic_write(val, json.dumps(coco))
    files = (d / "annotations" / "train.json", d / "train", val, d / "val")
    return files, len(coco["images"]), sorted(c["id"] for c in coco["categories"])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    p.add_argument("--seeds", type=int, help="seeds per cell (cpu/gpu: 3, smoke: 1)")
    p.add_argument("--jobs", type=int, help="cells run at once (cpu: 2 one-thread processes on 2 cores)")
    p.add_argument("--val-images", type=int, help="evaluate on the first N val images (cpu: 40; 0: all 200)")
    p.add_argument("--results", help="output folder (default: results/; the smoke preset: out/study_smoke/, so that it "
                                   "never overwrites the committed results/label_efficiency.md)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and its budget, run nothing")
    p.add_argument("--keep-weights", action="store_true", help="keep fine-tuned model_final.pth files (0.12 GB each)")
    p.add_argument("--report-only", action="store_true", help="write the report from the cells done so far")
    p.add_argument("--methods", help=f"a subset of the Table 1 rows, comma-separated (default all: {','.join(TABLE1)})")
    p.add_argument("--fractions", help="label fractions of Table 1, comma-separated (default 0.01,0.1,1)")
    p.add_argument("--iters", type=int, help="fine-tuning iterations of every Table 1 and K-shot cell")
    p.add_argument("--shots", help="K of the K-shot cells, comma-separated; 'none' skips them (default 1,5,10)")
    p.add_argument("--no-ablation", action="store_true", help="skip Table 4's switches")
    p.add_argument("--pre-steps", type=int, help="pre-training steps of every variant (cpu: 60, gpu: 1000; 4.1.2)")
    return p.parse_args(argv)


def override(p: dict, a) -> dict:
    """The preset p with the plan's command-line overrides (--methods, --fractions, --iters, --shots,
    --no-ablation, --pre-steps) applied; SystemExit naming the flag on a bad value."""
    if a.methods:
        p["methods"] = tuple(m for m in a.methods.split(","))
        bad = [m for m in p["methods"] if m not in TABLE1]
        if bad:
            raise SystemExit(f"--methods: unknown {bad}; choose from {','.join(TABLE1)}")
        p["fewshot"] = tuple(m for m in p["fewshot"] if m in p["methods"])
    if a.fractions:
        p["fractions"] = tuple(float(f) for f in a.fractions.split(","))
    if a.iters:
        p["iters"], p["shot_iters"] = {f: a.iters for f in p["fractions"]}, a.iters
    missing = [f for f in p["fractions"] if f not in p["iters"]]
    if missing:
        raise SystemExit(f"--fractions {missing}: the preset has no iteration count for them; give --iters")
    if a.shots:
        p["shots"] = () if a.shots == "none" else tuple(int(k) for k in a.shots.split(","))
    if a.no_ablation:
        p["ablation"] = ()
    if a.pre_steps is not None:
        if a.pre_steps < 1:
            raise SystemExit(f"--pre-steps {a.pre_steps}: must be >= 1")
        p["pre_steps"] = a.pre_steps
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_finetune":
        return finetune_cell(Path(argv[1]), argv[3:])
    if argv and argv[0] == "_recall":
        return recall_cell(Path(argv[1]), *argv[2:])
    a = parse_args(argv)
    p = copy.deepcopy(PRESETS[a.preset])
    for k in ("seeds", "jobs", "val_images"):
        if getattr(a, k) is not None:
            p[k] = getattr(a, k)
    p = override(p, a)
    root = Path(a.results or ("out/study_smoke" if a.preset == "smoke" else "results")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    files, val_n, cats = dataset_files(root, p["val_images"])
    novel = cats[-2:]  # the last two classes are held out as "novel" (4.4)
    p["novel"] = novel
    cells = plan(p, range(p["seeds"]), root, files, novel, a.keep_weights)
    todo = [c for c in cells if not c.done]
    plan_s = sum(estimate(c, p, val_n) for c in todo)
    print(f"study: preset {a.preset}, {p['seeds']} seed(s), {len(cells)} cells ({len(cells) - len(todo)} done), "
          f"{val_n} val images, novel classes {novel}, jobs {p['jobs']}\nplanned budget: {plan_s / 3600:.2f} "
          f"process-hours -> ~{plan_s / p['jobs'] / 3600:.2f} h wall with {p['jobs']} job(s) (per-image costs "
          f"{p['cost']['source']})", flush=True)
    for kind in ("pretrain", "recall", "finetune", "fewshot"):
        ks = [c for c in todo if c.kind == kind]
        print(f"  {kind:9s} {len(ks):3d} cells  {sum(estimate(c, p, val_n) for c in ks) / 60:7.1f} process-min")
    if a.dry_run:
        return None
    t0 = time.time()
    state = {c.name: "done" if c.done else "not run" for c in cells} if a.report_only else run_cells(cells, p["jobs"])
    failed = sorted(n for n, s in state.items() if s != "done")
    elapsed = None if a.report_only else time.time() - t0
    command = " ".join(["python study.py", *(x for x in argv if x != "--report-only")])  # what reproduces the plan
    md = aggregate(cells, root, dict(p, preset=a.preset, elapsed_s=elapsed, val_n=val_n, command=command), files)
    print(f"done in {(time.time() - t0) / 60:.1f} min; {md}, {root / 'metrics.json'}, PNGs in {root}"
          + (f"\ncells not done ({len(failed)}; logs in their folders' log.txt): {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
