"""Benchmark: selective search at the paper preset (section 4.1.1) on ~500 x 375 photos (issue 7, item 3).

Tables
    1. per core: selective_search.selective_search(preset="paper") in this process with cv2.setNumThreads(1), with
       grouping="opencv" (ximgproc) and grouping="numpy" (ss_grouping.py): images per CPU-second
       (time.process_time) and per wall second; the pure-Python `selectivesearch` package (AlpacaDB;
       benchmark-only dependency, bench/requirements.txt) at the same parameters (scale = k = 500, sigma = 0.9,
       min_size = 10) on the first --python-images images; speed ratio in CPU time.
    1b. equivalence of grouping="numpy" with OpenCV's on the same images: box counts, identical box sets, and the
       share of OpenCV's 4.1.1-filtered boxes that ours finds at IoU >= 0.7 and vice versa.
    2. scaling: ss_proposals.precompute(workers=w) for w = 1..N over JPEG files (decode included), wall images/s
       and images per CPU-second (RUSAGE_CHILDREN for the spawn pool); pool start-up is inside the wall time and
       the CPU time (hence 64 images by default: with 16, the start-up read as ~20 % of the per-core rate).
    3. --breakdown: where the time goes: RGB -> HSV, graph segmentation alone, each similarity strategy alone,
       cv2 threads, and smaller images (max_side) with the share of the full-size filtered boxes still found
       (IoU >= 0.7); then grouping="numpy" part by part (gradients, texture codes, histograms, boxes, neighbour
       pairs, the merge loop).
    4. --against REV (alone): this tree's ss_grouping.py against the one at git revision REV in one process,
       alternating rounds: selective_search per image and hierarchical_grouping alone, best and median; whether the
       boxes are the same.
Goals: >= 8 images/s per core; >= 5x the pure-Python package.

Images: matplotlib's sample photo grace_hopper.jpg (600 x 512), cut into --images deterministic variants (crops at
several offsets and scales, flips, a portrait 375 x 500 rotation, brightness changes), each resized to 500 x 375 or
375 x 500. No download.

    python bench/selective_search_speed.py --breakdown
    pip install -r bench/requirements.txt        # for the pure-Python column

Public: sample_images(n, seed) -> list of uint8 (H, W, 3) RGB, main(argv).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402

sys.path.insert(0, str(report.repo_root()))
import selective_search as ss  # noqa: E402
import ss_proposals  # noqa: E402

SEG = cv2.ximgproc.segmentation
PAPER = ss.PRESETS["paper"]  # sigma 0.9, k 500, min_size 10


def sample_images(n: int = 8, seed: int = 0) -> list[np.ndarray]:
    """n RGB uint8 photos of ~500 x 375 cut from matplotlib's grace_hopper.jpg (deterministic)."""
    import matplotlib.cbook

    path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    base = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)  # (512, 600, 3)
    rng = np.random.default_rng(seed)
    H, W = base.shape[:2]
    out = []
    for i in range(n):
        portrait = i % 4 == 3
        scale = rng.uniform(0.6, 1.0)  # crop a fraction of the photo, then resize: objects at several sizes
        ch, cw = (int(H * scale), int(H * scale * 0.75)) if portrait else (int(W * scale * 0.75), int(W * scale))
        ch, cw = min(ch, H), min(cw, W)
        y, x = rng.integers(0, H - ch + 1), rng.integers(0, W - cw + 1)
        crop = base[y:y + ch, x:x + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        img = cv2.resize(np.ascontiguousarray(crop), (375, 500) if portrait else (500, 375),
                         interpolation=cv2.INTER_AREA)
        gain = rng.uniform(0.8, 1.2)  # brightness change
        out.append(np.clip(img.astype(np.float32) * gain, 0, 255).astype(np.uint8))
    return out


def _cpu_wall(fn, repeat: int = 1):
    """(CPU seconds, wall seconds) of the best of `repeat` calls of fn, and its last result."""
    best, res = (float("inf"), float("inf")), None
    for _ in range(repeat):
        c0, w0 = time.process_time(), time.perf_counter()
        res = fn()
        best = min(best, (time.process_time() - c0, time.perf_counter() - w0))
    return best, res


GROUPING_NAMES = {"opencv": "selective_search.py grouping=opencv (ximgproc), paper preset",
                  "numpy": "selective_search.py grouping=numpy (ss_grouping.py), paper preset"}


def per_core(images, python_images: int, repeat: int = 1) -> list[dict]:
    """Table 1: OpenCV, our numpy grouping and the pure-Python package, one thread, CPU and wall time per image
    (best of `repeat` passes over the images for the first two)."""
    cv2.setNumThreads(1)
    rows = []
    for grouping, name in GROUPING_NAMES.items():
        (cpu, wall), res = _cpu_wall(lambda g=grouping: [ss.selective_search(im, "paper", grouping=g) for im in images],
                                     repeat)
        rows.append({"implementation": name, "images": len(images), "cpu_s_per_img": cpu / len(images),
                     "img_per_cpu_s": len(images) / cpu, "img_per_wall_s": len(images) / wall,
                     "boxes_per_img": float(np.mean([len(r) for r in res]))})
    if python_images < 1:
        return rows
    try:
        import selectivesearch
    except ImportError:
        print("note: the pure-Python `selectivesearch` package is not installed: its column is skipped "
              "(pip install -r bench/requirements.txt)")
        return rows
    import warnings

    sub = images[:python_images]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skimage warns about LBP on float images inside the package
        (cpu_p, wall_p), res = _cpu_wall(lambda: [selectivesearch.selective_search(
            im, scale=PAPER["k"], sigma=PAPER["sigma"], min_size=PAPER["min_size"])[1] for im in sub])
    rows.append({"implementation": "selectivesearch (pure Python, AlpacaDB), same parameters", "images": len(sub),
                 "cpu_s_per_img": cpu_p / len(sub), "img_per_cpu_s": len(sub) / cpu_p,
                 "img_per_wall_s": len(sub) / wall_p, "boxes_per_img": float(np.mean([len(r) for r in res]))})
    for row in rows[:2]:
        row["speedup_vs_python"] = rows[-1]["cpu_s_per_img"] / row["cpu_s_per_img"]
    return rows


def equivalence(images, preset: str = "paper") -> list[dict]:
    """Table 1b: grouping="numpy" against OpenCV's on each image: box counts (all, 4.1.1-filtered), identical sets,
    the share of OpenCV's filtered boxes ours finds at IoU >= 0.7 (recall) and of ours that OpenCV's finds."""
    cv2.setNumThreads(1)
    rows = []
    for k, im in enumerate(images):
        H, W = im.shape[:2]
        ref, ours = (ss.selective_search(im, preset, grouping=g) for g in ("opencv", "numpy"))
        fr, fo = ss.filter_boxes(ref, W, H), ss.filter_boxes(ours, W, H)
        same = {tuple(b) for b in ref.tolist()} & {tuple(b) for b in ours.tolist()}
        rows.append({"image": k, "size": f"{W} x {H}", "boxes_opencv": len(ref), "boxes_numpy": len(ours),
                     "boxes_in_both": len(same), "identical": len(same) == len(ref) == len(ours),
                     "filtered_opencv": len(fr), "filtered_numpy": len(fo), "recall_of_opencv": _recall(fr, fo),
                     "recall_of_numpy": _recall(fo, fr)})
    total = {key: sum(r[key] for r in rows) for key in ("boxes_opencv", "boxes_numpy", "boxes_in_both",
                                                          "filtered_opencv", "filtered_numpy")}
    rows.append({"image": "all", "size": "-", **total, "identical": f"{sum(r['identical'] for r in rows)}/{len(rows)}",
                 "recall_of_opencv": float(np.mean([r["recall_of_opencv"] for r in rows])),
                 "recall_of_numpy": float(np.mean([r["recall_of_numpy"] for r in rows]))})
    return rows


def scaling(images, max_workers: int) -> list[dict]:
    """Table 2: precompute over JPEG files with workers = 1..max_workers, for each grouping."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        root.mkdir()
        for i, im in enumerate(images):
            cv2.imwrite(str(root / f"{i:04d}.jpg"), cv2.cvtColor(im, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
        for grouping, w in [(g, w) for g in GROUPING_NAMES for w in range(1, max_workers + 1)]:
            cv2.setNumThreads(1)
            out = Path(tmp) / f"props_{grouping}_w{w}.npz"
            ch0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            c0, t0 = time.process_time(), time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):  # precompute prints its own summary line
                ss_proposals.precompute(root, out, preset="paper", workers=w, chunk_size=-(-len(images) // w),
                                        progress=False, grouping=grouping)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            ch1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu += (ch1.ru_utime - ch0.ru_utime) + (ch1.ru_stime - ch0.ru_stime)
            rows.append({"grouping": grouping, "workers": w, "images": len(images), "wall_s": wall,
                         "img_per_s": len(images) / wall, "img_per_s_per_worker": len(images) / wall / w,
                         "img_per_cpu_s": len(images) / cpu, "load_1m": os.getloadavg()[0]})
    return rows


def _search(hsv, strategy, gs_params=PAPER):
    s = SEG.createSelectiveSearchSegmentation()
    s.addImage(hsv)
    s.addGraphSegmentation(SEG.createGraphSegmentation(sigma=gs_params["sigma"], k=gs_params["k"],
                                                       min_size=gs_params["min_size"]))
    s.addStrategy(strategy)
    return s.process()


def _recall(ref: np.ndarray, got: np.ndarray, thresh: float = 0.7) -> float:
    """Share of ref boxes (N, 4) that some got box overlaps with IoU >= thresh."""
    import torch
    from torchvision.ops import box_iou

    if len(ref) == 0:
        return float("nan")
    if len(got) == 0:
        return 0.0
    return float((box_iou(torch.from_numpy(ref), torch.from_numpy(got)).max(dim=1).values >= thresh).float().mean())


def breakdown(images) -> list[dict]:
    """Table 3: CPU seconds per image of each part (one cv2 thread unless said), over the given images."""
    cv2.setNumThreads(1)
    n, rows = len(images), []
    hsv = [cv2.cvtColor(im, cv2.COLOR_RGB2HSV) for im in images]

    def add(name, fn, boxes=None, note=""):
        (cpu, wall), res = _cpu_wall(fn)
        rows.append({"part": name, "cpu_ms_per_img": 1e3 * cpu / n, "wall_ms_per_img": 1e3 * wall / n,
                     "boxes_per_img": boxes if boxes is not None else (
                         float(np.mean([len(r) for r in res])) if isinstance(res, list) else "-"), "note": note})
    add("RGB -> HSV (cv2.cvtColor)", lambda: [cv2.cvtColor(im, cv2.COLOR_RGB2HSV) for im in images], boxes="-")
    gs = SEG.createGraphSegmentation(sigma=PAPER["sigma"], k=PAPER["k"], min_size=PAPER["min_size"])
    (cpu, _), segs = _cpu_wall(lambda: [gs.processImage(h) for h in hsv])
    regions = float(np.mean([s.max() + 1 for s in segs]))
    rows.append({"part": "graph segmentation alone", "cpu_ms_per_img": 1e3 * cpu / n, "boxes_per_img": "-",
                 "note": f"{regions:.0f} initial regions per image"})
    for name, mk in (("Color", SEG.createSelectiveSearchSegmentationStrategyColor),
                     ("Texture", SEG.createSelectiveSearchSegmentationStrategyTexture),
                     ("Size", SEG.createSelectiveSearchSegmentationStrategySize),
                     ("Fill", SEG.createSelectiveSearchSegmentationStrategyFill)):
        add(f"segmentation + grouping, strategy {name} only", lambda mk=mk: [_search(h, mk()) for h in hsv])
    add("segmentation + grouping, Multiple(C, T, S, F) = paper", lambda: [_search(h, ss._strategy()) for h in hsv])
    cv2.setNumThreads(os.cpu_count() or 1)
    search = functools.partial(ss.selective_search, preset="paper", grouping="opencv")  # this table: OpenCV's
    add(f"paper preset (OpenCV grouping), cv2 threads = {os.cpu_count()}", lambda: [search(im) for im in images],
        note="CPU time summed over threads")
    cv2.setNumThreads(1)
    full = [ss.filter_boxes(search(im), im.shape[1], im.shape[0]) for im in images]
    for side in (400, 300, 250):
        (cpu, wall), res = _cpu_wall(lambda side=side: [search(im, max_side=side) for im in images])
        kept = [ss.filter_boxes(b, im.shape[1], im.shape[0]) for b, im in zip(res, images)]
        rec = float(np.nanmean([_recall(f, k) for f, k in zip(full, kept)]))
        rows.append({"part": f"paper preset (OpenCV grouping), max_side={side}", "cpu_ms_per_img": 1e3 * cpu / n,
                     "wall_ms_per_img": 1e3 * wall / n, "boxes_per_img": float(np.mean([len(r) for r in res])),
                     "note": f"{100 * rec:.0f} % of the full-size filtered boxes found at IoU >= 0.7 "
                             f"({np.mean([len(k) for k in kept]):.0f} vs {np.mean([len(f) for f in full]):.0f} "
                             f"filtered boxes)"})
    return rows + numpy_breakdown(hsv, segs)


def numpy_breakdown(hsv, segs, repeat: int = 3) -> list[dict]:
    """Table 3, continued: grouping="numpy" part by part on the HSV images and their segmentations (best of
    `repeat` passes; the segmentation itself is the row above)."""
    import ss_grouping as sg

    n, rows = len(hsv), []
    feats = [sg.region_features(h, s) for h, s in zip(hsv, segs)]
    pairs = [sg.neighbour_pairs(s) for s in segs]
    parts = [("gradients (Scharr, 45-degree rotations)", lambda: [sg._gradients(h) for h in hsv]),
             ("  + texture codes (min-max to uint8, bins)", lambda: [sg._texture_codes(h) for h in hsv]),
             ("region_features (all histograms, sizes, boxes)", lambda: [sg.region_features(h, s)
                                                                       for h, s in zip(hsv, segs)]),
             ("  of which region boxes (ends of label runs)", lambda: [sg._boxes(s, s.max() + 1) for s in segs]),
             ("neighbour_pairs", lambda: [sg.neighbour_pairs(s) for s in segs]),
             ("group (merge loop: heap, similarities)", lambda: [sg.group(*f, p, s.size)
                                                                 for f, p, s in zip(feats, pairs, segs)]),
             ("hierarchical_grouping (all of the above)", lambda: [sg.hierarchical_grouping(h, s)
                                                                  for h, s in zip(hsv, segs)])]
    for name, fn in parts:
        (cpu, wall), _ = _cpu_wall(fn, repeat)
        rows.append({"part": f"numpy grouping: {name}", "cpu_ms_per_img": 1e3 * cpu / n,
                     "wall_ms_per_img": 1e3 * wall / n, "boxes_per_img": "-",
                     "note": f"{np.mean([len(p) for p in pairs]):.0f} neighbour pairs" if name == "neighbour_pairs"
                     else ""})
    return rows


def _module_at(rev: str):
    """ss_grouping.py as it was at git revision rev, loaded as a separate module (for table 4)."""
    import subprocess
    import types

    src = subprocess.run(["git", "show", f"{rev}:ss_grouping.py"], cwd=report.repo_root(), check=True,
                         capture_output=True, text=True).stdout
    mod = types.ModuleType(f"ss_grouping_{rev}")
    exec(compile(src, f"{rev}:ss_grouping.py", "exec"), mod.__dict__)  # noqa: S102 (our own file from git)
    return mod


def against(images, rev: str, rounds: int = 5, repeat: int = 3) -> list[dict]:
    """Table 4: this tree's ss_grouping.py against the one at rev, in one process, alternating rounds (the load of
    a shared machine hits both alike). Per version: selective_search(img, "paper") (best of `repeat` passes per
    round, then best and median over rounds) and hierarchical_grouping alone on the same segmentations."""
    import statistics

    import ss_grouping

    versions = {"this tree": ss_grouping, f"ss_grouping.py at {rev}": _module_at(rev)}
    hsv = [cv2.cvtColor(im, cv2.COLOR_RGB2HSV) for im in images]
    seg = SEG.createGraphSegmentation(sigma=PAPER["sigma"], k=PAPER["k"], min_size=PAPER["min_size"])
    labels = [seg.processImage(h) for h in hsv]
    out = {name: [] for name in versions}
    grouping = {name: [] for name in versions}
    try:
        for r in range(rounds):
            for name in (list(versions) if r % 2 == 0 else list(versions)[::-1]):
                sys.modules["ss_grouping"] = versions[name]  # what selective_search imports
                (cpu, _), _ = _cpu_wall(lambda: [ss.selective_search(im, "paper", grouping="numpy") for im in images],
                                        repeat)
                out[name].append(cpu / len(images))
                (cpu, _), _ = _cpu_wall(lambda m=versions[name]: [m.hierarchical_grouping(h, lab)
                                                                  for h, lab in zip(hsv, labels)], repeat)
                grouping[name].append(cpu / len(images))
    finally:
        sys.modules["ss_grouping"] = ss_grouping
    ref = [ss_grouping.hierarchical_grouping(h, lab) for h, lab in zip(hsv, labels)]
    rows = []
    for name, mod in versions.items():
        same = sum(np.array_equal(mod.hierarchical_grouping(h, lab), b) for h, lab, b in zip(hsv, labels, ref))
        best, med = min(out[name]), statistics.median(out[name])
        rows.append({"version": name, "rounds": rounds, "ms_per_img_best": 1e3 * best,
                     "ms_per_img_median": 1e3 * med, "img_per_cpu_s_best": 1 / best,
                     "img_per_cpu_s_median": 1 / med, "grouping_ms_best": 1e3 * min(grouping[name]),
                     "grouping_ms_median": 1e3 * statistics.median(grouping[name]),
                     "boxes_as_this_tree": f"{same}/{len(images)}"})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=32, help="number of ~500 x 375 images")
    p.add_argument("--python-images", type=int, default=2, help="images for the slow pure-Python package")
    p.add_argument("--max-workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--scaling-images", type=int, default=64, help="images for the workers table (enough to amortise "
                   "the pool's start-up, ~0.3-0.5 s per worker: 16 images read ~20 %% slow)")
    p.add_argument("--breakdown", action="store_true", help="table 3: where the time goes")
    p.add_argument("--repeat", type=int, default=1, help="table 1: best of this many passes over the images")
    p.add_argument("--equivalence-extra", type=int, default=0, metavar="N",
                   help="table 1c: totals of table 1b over N more variants (seed 1), their grayscale copies, "
                   "250-px copies, and the soco preset")
    p.add_argument("--against", metavar="REV", help="only table 4: this tree's ss_grouping.py against the one at git "
                   "revision REV, in one process (e.g. --against 939d5fa)")
    p.add_argument("--rounds", type=int, default=5, help="table 4: alternating rounds")
    a = p.parse_args(argv)
    print(report.header("selective search speed, paper preset (bench/selective_search_speed.py)"))
    print(f"OpenCV {cv2.__version__}; images: {a.images} variants of grace_hopper.jpg at 500 x 375 / 375 x 500\n")
    if a.against:
        print(f"### 4. ss_grouping.py of this tree against {a.against} (CPU time per image, best of {a.repeat} "
              f"passes per round, {a.rounds} alternating rounds)\n")
        print(report.table(against(sample_images(a.images), a.against, a.rounds, a.repeat),
                           ["version", "rounds", "ms_per_img_best", "ms_per_img_median", "img_per_cpu_s_best",
                            "img_per_cpu_s_median", "grouping_ms_best", "grouping_ms_median", "boxes_as_this_tree"]))
        print(f"\nload average at end: {report.load_average()}; goal: >= 8 images per CPU-second")
        return
    images = sample_images(max(a.images, a.scaling_images))
    print("### 1. per core (one thread)\n")
    print(report.table(per_core(images[:a.images], a.python_images, a.repeat),
                       ["implementation", "images", "cpu_s_per_img", "img_per_cpu_s", "img_per_wall_s",
                        "boxes_per_img", "speedup_vs_python"]))
    print(f"\nload average: {report.load_average()}; goals: >= 8 images/s per core, >= 5x the pure-Python package")
    print("\n### 1b. grouping='numpy' against OpenCV's grouping (same images, paper preset)\n")
    columns = ["image", "size", "boxes_opencv", "boxes_numpy", "boxes_in_both", "identical", "filtered_opencv",
               "filtered_numpy", "recall_of_opencv", "recall_of_numpy"]
    print(report.table(equivalence(images[:a.images]), columns))
    if a.equivalence_extra:
        more = sample_images(a.equivalence_extra, seed=1)
        sets = {"variants (seed 1), paper": (more, "paper"),
                "their grayscale copies, paper": ([np.repeat(cv2.cvtColor(im, cv2.COLOR_RGB2GRAY)[..., None], 3, 2)
                                                   for im in more], "paper"),
                "their 250-px copies, paper": ([cv2.resize(im, (im.shape[1] // 2, im.shape[0] // 2),
                                                           interpolation=cv2.INTER_AREA) for im in more], "paper"),
                "variants (seed 1), soco preset": (more, "soco")}
        print(f"\n### 1c. the same, totals over more images ({a.equivalence_extra} variants of seed 1)\n")
        print(report.table([{**equivalence(ims, preset)[-1], "image": name} for name, (ims, preset) in sets.items()],
                           columns))
    print("\n### 2. scaling over worker processes (precompute, JPEG decode included)\n")
    print(report.table(scaling(images[:a.scaling_images], a.max_workers),
                       ["grouping", "workers", "images", "wall_s", "img_per_s", "img_per_s_per_worker",
                        "img_per_cpu_s", "load_1m"]))
    if a.breakdown:
        print(f"\n### 3. where the time goes ({a.images} images, CPU time per image)\n")
        print(report.table(breakdown(images[:a.images]),
                           ["part", "cpu_ms_per_img", "wall_ms_per_img", "boxes_per_img", "note"]))
    print(f"\nload average at end: {report.load_average()}")


if __name__ == "__main__":
    main()
