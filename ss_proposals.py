"""Selective-search proposals for an image tree: the resumable, sharded, multi-process precompute and the proposals
file (paper sections 3.2 and 4.1.1).

Section 3.2: the selective-search boxes are pre-computed once before training. precompute runs selective_search.py's
search and 4.1.1 filter (with SoCo's fallback) on every image of a folder tree, in chunks written as part files by a
spawn process pool, so that a kill or a dead worker loses at most the chunks in flight and a rerun resumes; a rerun
also retries the images recorded as unreadable. --shard i/n splits the tree across machines, one file per shard.
The command line is `python selective_search.py IMAGE_ROOT OUT.npz [--workers N] [--shard i/n] ...` (main).

Proposals file (one per shard; loadable with np.load(..., allow_pickle=False)): an .npz holding
    paths (N,) unicode relative paths (posix, sorted), offsets (N+1,) int64, boxes (total, 4) float32 xyxy,
    levels (N,) uint8 index into selective_search.LEVELS, sizes (N, 2) int32 (W, H), unreadable (U,) and
    unreadable_reason (U,) unicode, config () unicode JSON. Image i owns boxes[offsets[i]:offsets[i + 1]]. An
    unreadable image gets no entry (it is listed in `unreadable`); the dataset skips it if it cannot read it either,
    else it reports it as missing, and a rerun of precompute retries it (precompute).

Public
    find_images(root) -> sorted relative paths;   shard_path(out_path, shard) -> Path
    precompute(image_root, out_path, ...) -> summary dict (NoImages: none under image_root);   main(argv) CLI
                                         (run as `python selective_search.py`)
    read_proposal_arrays(path) -> (paths, offsets, boxes);   load_proposals(path) -> {relative path: (N, 4)}
    proposal_files(path) -> [Path]       a file, a glob of shard files or a list of either
    shard_spec(text) -> (i, n)           argparse type of --shard: 'i/n' with 0 <= i < n

Project-local dependencies: selective_search.py (the search, the filter, decoding; loading a file needs no OpenCV
contrib build); through it ss_grouping.py. The spawned workers import this module by name (_run_chunk).
"""
from __future__ import annotations

import argparse
import bisect
import glob
import json
import multiprocessing
import os
import shutil
import time
import zipfile
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import cv2
import numpy as np

from selective_search import (GROUPINGS, LEVELS, PRESETS, SOCO_MIN_SIDE, decode_image, filter_with_fallback,
                              resolve_grouping, selective_search)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
DEFAULT_CHUNK = 256  # images per part file: a kill loses at most one chunk per worker


def find_images(root: str | os.PathLike) -> list[str]:
    """All .jpg/.jpeg/.png files (case-insensitive) under root, recursively -> sorted posix relative paths."""
    root = Path(root)
    found = []
    for dirpath, _, files in os.walk(root, followlinks=True):
        for name in files:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append((Path(dirpath) / name).relative_to(root).as_posix())
    return sorted(found)


def shard_path(out_path: str | os.PathLike, shard: tuple[int, int] = (0, 1)) -> Path:
    """Output file of shard (i, n): out_path itself when n == 1, else 'name.shard{i}of{n}.npz'."""
    out, (i, n) = Path(out_path), shard
    return out if n == 1 else out.with_name(f"{out.stem}.shard{i}of{n}{out.suffix or '.npz'}")


def _save_npz_atomic(path: Path, **arrays) -> None:
    """Write an .npz through a temp file + os.replace, so a kill never leaves a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _process_image(root: str, rel: str, cfg: dict):
    """One image -> (boxes (M, 4), level, (W, H)) or an error string."""
    try:
        image = decode_image(np.fromfile(os.path.join(root, rel), dtype=np.uint8))
        if image is None:
            return "cannot decode"
        boxes = selective_search(image, cfg["preset"], cfg["max_side"], cfg.get("grouping", "opencv"))
        H, W = image.shape[:2]
        return (*filter_with_fallback(boxes, W, H, cfg["min_side"]), (W, H))
    except (OSError, cv2.error, ValueError, MemoryError) as e:  # never fatal: listed in the summary
        return f"{type(e).__name__}: {e}"


def _run_chunk(task: tuple) -> tuple[int, int]:
    """Worker: selective search on one chunk of images, written as one part file. -> (chunk index, #images)."""
    index, root, rels, part, cfg = task
    done = [(rel, _process_image(root, rel, cfg)) for rel in rels]
    ok, bad = [(r, o) for r, o in done if not isinstance(o, str)], [(r, o) for r, o in done if isinstance(o, str)]
    _save_npz_atomic(Path(part), **_arrays([r for r, _ in ok], [len(o[0]) for _, o in ok],
                                           np.concatenate([np.zeros((0, 4), np.float32)] + [o[0] for _, o in ok]),
                                           [LEVELS.index(o[1]) for _, o in ok], [o[2] for _, o in ok],
                                           [r for r, _ in bad], [o for _, o in bad], cfg))
    return index, len(rels)


def _arrays(paths, counts, boxes, levels, sizes, unreadable, unreadable_reason, cfg) -> dict:
    """The proposals-file arrays (see the module docstring); counts (N,) boxes per image, boxes (total, 4)."""
    return {"paths": np.asarray(paths, dtype=str), "offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            "boxes": np.asarray(boxes, np.float32).reshape(-1, 4), "levels": np.asarray(levels, dtype=np.uint8),
            "sizes": np.asarray(sizes, np.int32).reshape(-1, 2), "unreadable": np.asarray(unreadable, dtype=str),
            "unreadable_reason": np.asarray(unreadable_reason, dtype=str),
            "config": np.asarray(json.dumps(cfg, sort_keys=True))}


def _is_complete(path: Path, rels: list[str], cfg: dict) -> bool:
    """True when the file at path exists, was made with cfg and covers exactly the images rels.

    The grouping is provenance, not part of the comparison: both give the same boxes (bench/RESULTS.md 3b), so a
    file made with either stays valid (recomputing ImageNet's would cost ~50-130 core-hours)."""
    key = lambda c: {k: v for k, v in c.items() if k != "grouping"}  # noqa: E731
    try:
        with np.load(path, allow_pickle=False) as z:
            same_cfg = key(json.loads(str(z["config"]))) == key(json.loads(json.dumps(cfg)))
            return same_cfg and sorted(z["paths"].tolist() + z["unreadable"].tolist()) == rels
    except (OSError, KeyError, ValueError):
        return False


def _read(files: list[Path]) -> dict:
    """Proposals files -> their arrays concatenated in order, as _arrays' arguments (counts (N,), no offsets)."""
    loaded = []
    for f in files:
        try:
            z = np.load(f, allow_pickle=False)  # pickled objects are refused, never loaded
            if not isinstance(z, np.lib.npyio.NpzFile):  # a bare .npy array
                raise KeyError("a single array, not an .npz")
            with z:
                loaded.append({k: z[k] for k in z.files})
            missing = {"paths", "offsets", "boxes"} - set(loaded[-1])
            if missing:
                raise KeyError(f"no {sorted(missing)}")
        except FileNotFoundError:
            raise FileNotFoundError(f"{f}: proposals file not found") from None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # not an .npz, truncated, empty
            why = f"; {e.args[0]}" if isinstance(e, KeyError) else ""
            raise ValueError(f"{f}: not a selective_search.py proposals file (an .npz of plain arrays paths, offsets, "
                             f"boxes{why})") from None
    loaded = loaded or [_arrays([], [], [], [], [], [], [], {})]  # an empty shard
    cat = {k: np.concatenate([z[k] for z in loaded]) for k in loaded[0] if k not in ("offsets", "config")}
    return {**cat, "counts": np.concatenate([np.diff(z["offsets"]) for z in loaded])}


def _patch(out: Path, retried: list[Path], cfg: dict) -> dict[str, str]:
    """Insert into the shard's file out the images that its retry files (then deleted) read, in path order,
    atomically -> {image read now: the failure out had recorded}; the others keep their recorded failure."""
    new = _read(retried)
    for f in retried:
        f.unlink()
    if not len(new["paths"]):
        return {}  # out is not even read
    old = _read([out])
    pos = np.searchsorted(old["paths"], new["paths"])  # (R,) where they go: both sorted, disjoint
    at = {"boxes": np.repeat(np.concatenate([[0], np.cumsum(old["counts"])])[pos], new["counts"])}  # (R's boxes,)
    arrays = {k: np.insert(old[k].astype(np.result_type(old[k], new[k])), at.get(k, pos), new[k], axis=0)
              for k in ("paths", "counts", "boxes", "levels", "sizes")}  # result_type: no truncated path
    still = ~np.isin(old["unreadable"], new["paths"])
    _save_npz_atomic(out, **_arrays(**arrays, unreadable=old["unreadable"][still],
                                    unreadable_reason=old["unreadable_reason"][still], cfg=cfg))
    return dict(zip(old["unreadable"][~still].tolist(), old["unreadable_reason"][~still].tolist()))


def _chunks(root, rels: list[str], size: int, work: Path, name: str, cfg: dict) -> list[tuple]:
    """rels in chunks of size -> tasks (index c, root, relative paths, part file work/'{name}{c:06d}.npz', cfg)."""
    return [(c, str(root), rels[s: s + size], str(work / f"{name}{c:06d}.npz"), cfg)
            for c, s in enumerate(range(0, len(rels), size))]


def _run_tasks(tasks: list, workers: int, progress: bool) -> None:
    """Run _run_chunk over tasks with a progress bar: in-process for workers <= 1, else on a spawn process pool with
    one chunk in flight per worker, so that a worker's death (OOM killer, crash in OpenCV) names its chunks."""
    from tqdm import tqdm

    bar = tqdm(total=sum(len(t[2]) for t in tasks), unit="img", disable=not progress, dynamic_ncols=True)
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            bar.update(_run_chunk(task)[1])
    else:  # spawn: safe with threads (OpenCV, torch) in the parent; workers import this module by name
        todo, running, n = tasks[::-1], {}, min(workers, len(tasks))
        with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"), initializer=cv2.setNumThreads,
                                 initargs=(1,)) as pool:
            while todo or running:
                while todo and len(running) < n:
                    task = todo.pop()
                    running[pool.submit(_run_chunk, task)] = task
                for f in wait(running, return_when=FIRST_COMPLETED)[0]:
                    task = running.pop(f)
                    if isinstance(f.exception(), BrokenProcessPool):  # the others in flight fail with it
                        lost = [task] + [t for g, t in running.items() if not g.done() or g.exception()]
                        raise RuntimeError(_died(lost, f.exception())) from f.exception()
                    bar.update(f.result()[1])
    bar.close()


def _died(lost: list[tuple], error: BaseException) -> str:
    """The error of a dead worker: the chunks in flight (first .. last image), and what to do."""
    chunks = "; ".join(f"{Path(t[3]).stem} ({t[2][0]} .. {t[2][-1]})" for t in sorted(lost, key=lambda t: t[0]))
    return (f"a selective-search worker process died (killed, e.g. by the OOM killer, or crashed in OpenCV: {error}) "
            f"in one of the chunks {chunks} under {lost[0][1]}. The finished chunks are kept in "
            f"{Path(lost[0][3]).parent}: rerun the same command to resume (fewer --workers or a --max-side if memory "
            "ran out).")


class NoImages(FileNotFoundError):
    """precompute: no image under IMAGE_ROOT (a wrong path)."""


def precompute(image_root, out_path, preset: str = "paper", workers: int | None = os.cpu_count(),
               shard: tuple[int, int] = (0, 1), max_side: int | None = None, min_side: float = 0,
               chunk_size: int = DEFAULT_CHUNK, keep_parts: bool = False, progress: bool = True,
               grouping: str = "auto") -> dict:
    """Selective search + 4.1.1 filter for every image of shard (i, n) of image_root -> shard_path(out_path, shard).

    Resumable: each chunk of chunk_size images is written atomically to '<out>.parts/partNNNNNN.npz'; a rerun only
    computes the chunks whose part is missing or stale; when all are there they are merged atomically into the
    output (and the parts are deleted unless keep_parts). A dead worker stops the run with an error naming its chunks.
    A rerun also retries the images an earlier run recorded as unreadable (a failure may be transient: I/O, memory)
    and inserts those it reads now. Automatic, not a flag: a truly corrupt image costs a read and a failed decode
    (ms) per rerun, and the output is rewritten only when one is recovered. Returns the summary dict, also printed.
    workers > 1 uses 'spawn' processes: a calling script needs the `if __name__ == "__main__":` guard. Run one
    precompute per output file at a time (under torchrun: rank 0 only, then a barrier). grouping: see
    selective_search; resolved, it enters the file's config when not "opencv" (files made by OpenCV's grouping
    before this option existed have no such key). It is recorded only: an existing file made with the other
    grouping is kept (the same boxes), not recomputed.
    """
    i, n = shard
    grouping = resolve_grouping(preset, grouping)
    if not (0 <= i < n) or chunk_size < 1:
        raise ValueError(f"bad shard {shard} or chunk_size {chunk_size}")
    all_rels = find_images(image_root)
    if not all_rels:
        raise NoImages(f"no {'/'.join(IMAGE_EXTENSIONS)} images under {image_root}")
    rels = all_rels[len(all_rels) * i // n: len(all_rels) * (i + 1) // n]  # contiguous shard
    cfg = {"preset": preset, "max_side": max_side, "min_side": min_side}
    if grouping != "opencv":
        cfg["grouping"] = grouping
    out = shard_path(out_path, shard)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.with_name(out.name + ".parts")
    start, tasks = time.time(), []
    if not _is_complete(out, rels, cfg):
        work.mkdir(exist_ok=True)
        chunks = _chunks(image_root, rels, chunk_size, work, "part", cfg)
        tasks = [t for t in chunks if not _is_complete(Path(t[3]), t[2], cfg)]
        _run_tasks(tasks, workers or 1, progress)
        _save_npz_atomic(out, **_arrays(**_read([Path(t[3]) for t in chunks]), cfg=cfg))  # the parts, in order
    done = {t[0] for t in tasks}
    with np.load(out, allow_pickle=False) as z:  # failures recorded by an earlier run (not this one's chunks)
        retry = [p for p in z["unreadable"].tolist() if bisect.bisect_left(rels, p) // chunk_size not in done]
    retries, recovered = _chunks(image_root, retry, chunk_size, work, "retry", cfg), {}
    if retries:
        work.mkdir(exist_ok=True)
        _run_tasks(retries, workers or 1, progress)
        recovered = _patch(out, [Path(t[3]) for t in retries], cfg)
    if not keep_parts and work.exists():
        shutil.rmtree(work)
    return _summarise(out, tasks, len(retry), recovered, time.time() - start)


def _summarise(out: Path, tasks: list, retried: int, recovered: dict, seconds: float) -> dict:
    """Print and return: images computed this run, images/s, per-level counts, unreadable images (whole shard) with
    their recorded failure, images read on retry (recovered: {path: the failure recorded before})."""
    with np.load(out, allow_pickle=False) as z:
        levels, bad, why = z["levels"], z["unreadable"].tolist(), z["unreadable_reason"].tolist()
    computed = sum(len(t[2]) for t in tasks)
    summary = {"out_path": str(out), "images": len(levels) + len(bad), "computed": computed,
               "computed_chunks": sorted(t[0] for t in tasks), "seconds": seconds,
               "images_per_s": computed / seconds if seconds > 0 else 0.0,
               "levels": {name: int((levels == k).sum()) for k, name in enumerate(LEVELS)}, "unreadable": bad,
               "retried": retried, "recovered": recovered}
    notes = [f"unreadable: {p} ({r})" for p, r in zip(bad, why)] + [f"read on retry: {p} (had failed: {r})"
                                                                     for p, r in recovered.items()]
    print(f"[selective_search] {out}: {summary['images']} images, {computed} computed in {seconds:.1f} s "
          f"({summary['images_per_s']:.2f} images/s), {retried} earlier failures retried; fallback levels "
          f"{summary['levels']}; {len(bad)} unreadable" + "".join(f"\n  {n}" for n in notes), flush=True)
    return summary


def proposal_files(path) -> list[Path]:
    """A file, a glob pattern or a list of either -> the list of files (FileNotFoundError: a glob matching none)."""
    if isinstance(path, (list, tuple)):
        return [p for item in path for p in proposal_files(item)]
    if any(ch in str(path) for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(path)))
        if not files:
            raise FileNotFoundError(f"no proposals file matches {path}")
        return files
    return [Path(path)]


def read_proposal_arrays(path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A proposals file, a glob or a list of shard files -> merged (paths (N,) str, offsets (N+1,) int64,
    boxes (total, 4) float32), without building per-image objects (for 1.28 M images)."""
    z = _read(proposal_files(path))
    if len(np.unique(z["paths"])) != len(z["paths"]):
        raise ValueError(f"the proposals files {path} hold the same image more than once")
    return z["paths"], np.concatenate([[0], np.cumsum(z["counts"])]).astype(np.int64), z["boxes"]


def load_proposals(path) -> dict[str, np.ndarray]:
    """A proposals file, a glob or a list of shard files -> {relative path: float32 (N, 4) xyxy original pixels}."""
    paths, offsets, boxes = read_proposal_arrays(path)
    return dict(zip(paths.tolist(), np.split(boxes, offsets[1:-1])))


def main(argv: list[str] | None = None) -> dict:
    """The command line, run as `python selective_search.py IMAGE_ROOT OUT.npz ...`: precompute -> its summary."""
    p = argparse.ArgumentParser(description="Pre-compute selective-search proposals (ADePT sections 3.2, 4.1.1) for "
                                "every .jpg/.jpeg/.png under IMAGE_ROOT, filtered with 1/3 <= w/h <= 3 and "
                                "0.3 <= sqrt(wh)/sqrt(WH) <= 0.8. Resumable: rerun the same command after a kill or a "
                                "dead worker; a rerun also retries the images recorded as unreadable.")
    p.add_argument("image_root", help="folder tree of images (e.g. ImageNet train/)")
    p.add_argument("out", help="proposals .npz (with --shard i/n: out.shard{i}of{n}.npz)")
    p.add_argument("--preset", default="paper", choices=list(PRESETS),
                   help="paper: sec. 4.1.1, k=500 sigma=0.9 min_size=10 on HSV; soco: SoCo's k=300 sigma=0.9 "
                   "min_size=100; fast/quality: OpenCV's selective-search modes")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes (default: all cores)")
    p.add_argument("--shard", type=shard_spec, default=(0, 1),
                   help="i/n: do the i-th (0-based) of n contiguous slices, one per machine")
    p.add_argument("--max-side", type=int, default=None, help="resize the long side to at most this before the search")
    p.add_argument("--min-side", type=float, default=0,
                   help=f"SoCo's extra filter w, h >= MIN_SIDE (SoCo: {SOCO_MIN_SIDE}; the paper, sec. 4.1.1: 0)")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK, help="images per resumable part file")
    p.add_argument("--keep-parts", action="store_true", help="keep the part files after merging")
    p.add_argument("--grouping", default="auto", choices=GROUPINGS,
                   help="opencv: ximgproc's grouping; numpy: ss_grouping.py on the same segmentation (the same "
                   "boxes, 34-42 %% of the CPU time; presets paper and soco); auto: numpy where it can")
    a = p.parse_args(argv)
    for flag, value, low in (("--workers", a.workers, 0), ("--chunk-size", a.chunk_size, 1),
                             ("--max-side", 1 if a.max_side is None else a.max_side, 1), ("--min-side", a.min_side, 0)):
        if not value >= low:  # not >=: NaN too
            p.error(f"{flag} must be >= {low}, got {value}")
    try:
        return precompute(a.image_root, a.out, a.preset, a.workers, a.shard, a.max_side, a.min_side, a.chunk_size,
                          a.keep_parts, grouping=a.grouping)
    except NoImages as e:  # one line, no traceback (any other error keeps its traceback)
        raise SystemExit(f"error: {e}") from None


def shard_spec(text: str) -> tuple[int, int]:
    """argparse type of --shard: 'i/n' with 0 <= i < n -> (i, n)."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        i, n = 0, 0
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"expected i/n with 0 <= i < n (e.g. 0/4), got {text!r}")
    return i, n
