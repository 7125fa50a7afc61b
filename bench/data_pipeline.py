"""Benchmark: three-view pre-training samples per second per loader worker (issue 7, item 4; paper 4.1.2).

data.PretrainDataset (decode, box-aware geometry of V1/V2/V3, colour jitter, grayscale, blur, solarize, box
jitter, K = 4 boxes visible in all views) behind a torch DataLoader with num_workers 0, 1, 2 (default collate:
uint8 views, normalisation happens later on the device). Goal: >= 250 samples/s per worker.

Source images (--source):
    jpeg   (default) --images JPEG photos of ~500 x 375 (matplotlib's grace_hopper.jpg variants, as in
           selective_search_speed.py) written to a temp folder; proposals: --proposals random boxes per image that
           pass the 4.1.1 filter (the boxes' content does not change the cost; their number barely does)
    synth  the embedded pool (data.ensure_synthetic_dataset()/unlabelled, PNG), same random proposals
Columns: wall samples/s after the first batch (worker start-up reported apart), the same per worker, and samples
per CPU-second of all processes (load-independent: what one free core would give). Also a per-sample breakdown in
this process: decode alone, geometry without colour, the full three_views, the collate, the collate plus pickling
the batch as a worker sends it (into shared memory). Each loader setting runs
with torch's default_collate and with data.collate_channels_last (what train.py uses on CUDA; same values, checked),
and once more with the colour left to the device (train.py --color-on device: the worker draws the colour parameters,
color_device.color_batch applies them to the batch; its cost on this CPU is in the per-sample table).

    python bench/data_pipeline.py                 # 224 / 112, 192 samples per setting

    python bench/data_pipeline.py --compile-color # also color_batch torch.compile'd (train.py --compile)
    python bench/data_pipeline.py --same-as REV   # only: are this tree's samples bit-identical to git revision REV's?

--same-as extracts REV's tree (git archive) into a temp folder, lets it render items of the bench's JPEG pool (3
epochs) and of random images (three_views, random sizes) in a subprocess, renders the same here and compares every
view, box and affine tensor with torch.equal (for refactors that must not change a sample).

Last table: seconds per epoch of train.py's way of loading, a fresh DataLoader per epoch (worker start-up and an
empty pipeline every epoch) against one loader with persistent workers (what train.py does now).

Public: random_proposals, main(argv).
"""
from __future__ import annotations

import argparse
import io
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402

sys.path.insert(0, str(report.repo_root()))
import augment  # noqa: E402
import data  # noqa: E402
import selective_search as ss  # noqa: E402


def random_proposals(files: list[str], root: Path, n: int = 50, seed: int = 0) -> dict:
    """{relative path: (n, 4) float32 xyxy} random boxes inside each image that pass selective_search.filter_boxes."""
    rng = np.random.default_rng(seed)
    out = {}
    for f in files:
        H, W = cv2.imread(str(root / f), cv2.IMREAD_REDUCED_GRAYSCALE_2).shape[:2]
        H, W = 2 * H, 2 * W  # the reduced read halves the size (cheap header-ish read)
        side = np.sqrt(W * H) * rng.uniform(0.3, 0.8, n)  # 4.1.1 scale range
        ratio = np.exp(rng.uniform(np.log(1 / 3), np.log(3), n))  # w / h in [1/3, 3]
        w, h = np.minimum(side * np.sqrt(ratio), W), np.minimum(side / np.sqrt(ratio), H)
        x, y = rng.uniform(0, W - w), rng.uniform(0, H - h)
        boxes = np.stack([x, y, x + w, y + h], 1).astype(np.float32)
        out[f] = ss.filter_boxes(boxes, W, H) if len(ss.filter_boxes(boxes, W, H)) else boxes
    return out


def write_jpegs(root: Path, n: int) -> None:
    import selective_search_speed

    for i, im in enumerate(selective_search_speed.sample_images(n, seed=1)):
        sub = root / f"n{i % 4:02d}"  # nested folders, like ImageNet's train layout
        sub.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(sub / f"{i:05d}.jpg"), cv2.cvtColor(im, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])


def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_loader(ds, workers: int, samples: int, batch: int, collate=None) -> dict:
    """Iterate `samples` items (cycling over the dataset) with `workers` loader processes."""
    index = [i % len(ds) for i in range(samples)]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, index), batch_size=batch, num_workers=workers,
                                         shuffle=False, drop_last=False, collate_fn=collate)
    c0, ch0, t0 = time.process_time(), _cpu_children(), time.perf_counter()
    it = iter(loader)
    first = next(it)
    t1 = time.perf_counter()
    n = 0
    for b in it:
        n += b["v1"].shape[0]
    t2 = time.perf_counter()
    del it, loader  # joins the workers: their CPU time lands in RUSAGE_CHILDREN
    cpu = time.process_time() - c0 + _cpu_children() - ch0
    total = first["v1"].shape[0] + n
    return {"workers": workers, "collate": "channels_last" if collate else "default", "color_on": ds.color_on,
            "samples": total, "startup_s": t1 - t0, "samples_per_s": n / (t2 - t1),
            "per_worker": n / (t2 - t1) / max(workers, 1), "samples_per_cpu_s": total / cpu,
            "load_1m": os.getloadavg()[0]}


def epochs_loader(ds, workers: int, epochs: int, batch: int, persistent: bool) -> float:
    """Wall seconds for `epochs` passes over ds as train.py loads them: a fresh DataLoader per epoch (train.py before
    2026-11-27) or one loader whose workers persist, the epoch handed to them by data.EpochSampler (train.py now)."""
    sampler = data.EpochSampler(torch.utils.data.SequentialSampler(ds))
    make = lambda: torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers, sampler=sampler,  # noqa
                                               drop_last=True, persistent_workers=persistent)
    loader, t0 = make() if persistent else None, time.perf_counter()
    for e in range(epochs):
        sampler.set_epoch(e)
        for _ in (loader if persistent else make()):
            pass
    return time.perf_counter() - t0


def _send(batch) -> bytes:
    """Pickle a batch as a loader worker puts it on its queue: torch's reducers move each tensor's storage into
    shared memory (a copy into a fresh segment: its first-touch page faults are most of the cost)."""
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401 (registers torch's reducers with ForkingPickler)

    buf = io.BytesIO()
    ForkingPickler(buf, 2).dump(batch)
    return buf.getvalue()


def per_sample(ds, n: int, compile_color: bool = False) -> list[dict]:
    """In this process, ms per sample: decode only; views without colour; the full item; the item with the colour
    left to the device; the collates, and sending a batch as a worker does; color_batch (and compiled, if asked)."""
    rows = []

    def timed(name, fn):
        c0, t0 = time.process_time(), time.perf_counter()
        for i in range(n):
            fn(i % len(ds))
        rows.append({"part": name, "cpu_ms": 1e3 * (time.process_time() - c0) / n,
                     "wall_ms": 1e3 * (time.perf_counter() - t0) / n})
    timed("decode_image only", lambda i: data.decode_image(ds.path(i)))
    color = ds.color
    ds.color = False
    timed("item without colour ops (decode + geometry + boxes)", ds.__getitem__)
    ds.color = color
    timed("full item (three_views with colour)", ds.__getitem__)
    ds.color_on = "device"
    timed("item with color_on='device' (colour parameters drawn, not applied)", ds.__getitem__)
    ds.color_on = "loader"
    from torch.utils.data import default_collate

    items = [ds[i % len(ds)] for i in range(32)]
    a, b = default_collate(items), data.collate_channels_last(items)
    assert all(torch.equal(a[k], b[k]) for k in a), "collate_channels_last changes the batch"
    for name, fn in (("default_collate, per sample of a batch of 32", default_collate),
                     ("collate_channels_last, per sample", data.collate_channels_last),
                     ("collate_channels_last + sending the batch as a loader worker does, per sample",
                      lambda its: _send(data.collate_channels_last(its)))):
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(5):
            fn(items)
        rows.append({"part": name, "cpu_ms": 1e3 * (time.process_time() - c0) / 160,
                     "wall_ms": 1e3 * (time.perf_counter() - t0) / 160})
    # the work color_on="device" moves out of the worker, timed here on this CPU (one thread); bench/gpu_check.py
    # stage 1b times it on a GPU
    import color_device

    batch = data.collate_channels_last(items)
    fns = [("color_device.color_batch", color_device.color_batch)]
    if compile_color:  # as train.py --compile --color-on device (train.color_fn); compiled before the timing
        fn, c0 = torch.compile(color_device.color_batch, dynamic=False), time.perf_counter()
        for k in (1, 2, 3):
            fn(batch[f"v{k}"], batch[f"c{k}"])
        fns.append((f"the same, torch.compile'd (Inductor; compiled in {time.perf_counter() - c0:.0f} s)", fn))
    for name, fn in fns:
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(3):
            for k in (1, 2, 3):
                fn(batch[f"v{k}"], batch[f"c{k}"])
        rows.append({"part": f"{name} of the 3 views on this CPU, per sample of a batch of 32",
                     "cpu_ms": 1e3 * (time.process_time() - c0) / 96, "wall_ms": 1e3 * (time.perf_counter() - t0) / 96})
    return rows


# run in REV's extracted tree after render's source: its own augment.py and data.py render the items
_AT_REV = """
import augment, data
root, props_path, out = sys.argv[1:4]
torch.save(render(data, augment, root, torch.load(props_path, weights_only=True)), out)
"""


def render(data_mod, augment_mod, root, props: dict) -> list[dict]:
    """Items to compare between trees: the pool's 3 epochs and 40 three_views calls on random images (v, b, t only)."""
    ds = data_mod.PretrainDataset(root, {k: v.numpy() for k, v in props.items()}, K=4)
    items = [ds[(e, i)] for e in range(3) for i in range(len(ds))]
    rng = np.random.default_rng(0)
    for n in range(40):
        h, w = (int(v) for v in rng.integers(40, 400, 2))
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        views = augment_mod.three_views(img, np.array([[0, 0, w / 2, h / 2]]), torch.Generator().manual_seed(n), 64, 32)
        items.append({f"{k}{j}": t for j, view in enumerate(views, 1) for k, t in zip("vb", view)})
    keep = lambda k: k[0] in "vbt" and k[1:].isdigit()  # noqa: E731
    return [{k: v.contiguous() for k, v in it.items() if keep(k)} for it in items]


def same_as(rev: str, root: Path, props: dict) -> dict:
    """Render the items with REV's tree (a subprocess in its extracted copy) and with this tree; compare them."""
    import inspect
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "archive", rev], cwd=report.repo_root(), check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        torch.save({k: torch.from_numpy(v) for k, v in props.items()}, Path(tmp) / "props.pt")
        code = "import sys\nimport numpy as np\nimport torch\n" + inspect.getsource(render) + _AT_REV
        subprocess.run([sys.executable, "-c", code, str(root), str(Path(tmp) / "props.pt"), str(Path(tmp) / "it.pt")],
                       cwd=tmp, check=True, env={**os.environ, "PYTHONPATH": tmp})
        theirs = torch.load(Path(tmp) / "it.pt", weights_only=True)
    ours = render(data, augment, root, {k: torch.from_numpy(v) for k, v in props.items()})
    pairs = [(k, a[k], b.get(k)) for a, b in zip(ours, theirs) for k in a]
    different = sum(b is None or not torch.equal(a, b) for _, a, b in pairs)
    return {"revision": rev, "items": len(ours), "items_at_rev": len(theirs), "tensors_compared": len(pairs),
            "different": different, "identical": different == 0 and len(ours) == len(theirs)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default="jpeg", choices=("jpeg", "synth"))
    p.add_argument("--images", type=int, default=64, help="JPEGs to write (jpeg source)")
    p.add_argument("--proposals", type=int, default=50, help="random filtered boxes per image")
    p.add_argument("--samples", type=int, default=192, help="samples per loader setting")
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--epoch-workers", type=int, default=2, help="workers of the per-epoch vs persistent comparison")
    p.add_argument("--epochs", type=int, default=4,
                   help="epochs of that comparison (one epoch = the --images); 0 skips it")
    p.add_argument("--small-size", type=int, default=112)
    p.add_argument("--same-as", metavar="REV", help="only compare this tree's samples with git revision REV's")
    p.add_argument("--compile-color", action="store_true",
                   help="also time color_batch torch.compile'd, as train.py --compile --color-on device (~30 s)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)  # this process only orchestrates; workers get 1 thread from the DataLoader anyway
    print(report.header("three-view data pipeline (bench/data_pipeline.py)"))
    with tempfile.TemporaryDirectory() as tmp:
        if a.source == "jpeg":
            root = Path(tmp) / "pool"
            write_jpegs(root, a.images)
        else:
            root = data.ensure_synthetic_dataset() / "unlabelled"
        files = data.list_images(root)
        props = random_proposals(files, root, a.proposals)
        if a.same_as:
            print(report.table([same_as(a.same_as, root, props)], ["revision", "items", "items_at_rev",
                                                                  "tensors_compared", "different", "identical"]))
            return
        ds = data.PretrainDataset(root, props, K=4, size=a.size, small_size=a.small_size)
        shape = cv2.imread(str(root / files[0])).shape
        print(f"source {a.source}: {len(ds)} images (e.g. {shape[1]} x {shape[0]}), {a.proposals} random filtered "
              f"proposals each, views {a.size}/{a.size}/{a.small_size}, K = 4, batch {a.batch_size}\n")
        print(report.table(per_sample(ds, min(64, a.samples), a.compile_color), ["part", "cpu_ms", "wall_ms"]))
        print()
        ds_dev = data.PretrainDataset(root, props, K=4, size=a.size, small_size=a.small_size, color_on="device")
        rows = [run_loader(d, int(w), a.samples, a.batch_size, collate) for w in a.workers.split(",")
                for d, collate in ((ds, None), (ds, data.collate_channels_last), (ds_dev, data.collate_channels_last))]
        print(report.table(rows, ["workers", "collate", "color_on", "samples", "startup_s", "samples_per_s",
                                  "per_worker", "samples_per_cpu_s", "load_1m"]))
        print()
        rows = []
        # interleaved, so that load from other processes hits both alike; --epochs 0 skips the comparison
        for persistent in (False, True, False, True) if a.epochs > 0 else ():
            rows.append({"loader": "one, persistent workers" if persistent else "fresh per epoch",
                         "workers": a.epoch_workers, "epochs": a.epochs, "steps_per_epoch": len(ds) // a.batch_size,
                         "s_per_epoch": epochs_loader(ds, a.epoch_workers, a.epochs, a.batch_size, persistent)
                         / a.epochs, "load_1m": os.getloadavg()[0]})
        if rows:
            print(report.table(rows, ["loader", "workers", "epochs", "steps_per_epoch", "s_per_epoch", "load_1m"]))
    print(f"\nload average at end: {report.load_average()}; goal: >= 250 samples/s per worker")


if __name__ == "__main__":
    main()
