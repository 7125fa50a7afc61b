"""Tests for ss_proposals.py (paper section 4.1.1): the resumable, shardable, multi-process precompute of
selective-search proposals on tiny generated images: file contents, unreadable images, workers, resume after a kill,
retries of recorded failures, shards, loading without ximgproc, and the grouping flag."""
import contextlib
import json
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:  # spawn workers inherit sys.path and import ss_proposals by name
    sys.path.insert(0, ROOT)

import selective_search as ss  # noqa: E402
import ss_proposals as ssp  # noqa: E402
from test_selective_search import check_boxes, make_image, write_rgb  # noqa: E402


@pytest.fixture
def image_root(tmp_path):
    """7 readable images in nested folders (mixed-case extensions), one corrupt .jpg and a non-image file."""
    root = tmp_path / "images"
    names = ["a/x1.png", "a/X2.JPG", "a/x3.jpeg", "b/c/y1.png", "b/c/y2.jpg", "b/z.PNG", "top.png"]
    for k, name in enumerate(names):
        write_rgb(root / name, make_image(k, 96 + 8 * k, 72))
    (root / "b" / "bad.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    (root / "b" / "notes.txt").write_text("not an image")
    return root


def read_all(path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def assert_same_file(a, b) -> None:
    da, db = read_all(a), read_all(b)
    assert da.keys() == db.keys()
    for key in da:
        np.testing.assert_array_equal(da[key], db[key], err_msg=key)


# ----------------------------------------------------------------------------------------------- precompute

def test_precompute_contents_and_unreadable(image_root, tmp_path):
    out = tmp_path / "props.npz"
    summary = ssp.precompute(image_root, out, workers=1, chunk_size=3, progress=False)
    props = ssp.load_proposals(out)
    expected = {"a/x1.png", "a/X2.JPG", "a/x3.jpeg", "b/c/y1.png", "b/c/y2.jpg", "b/z.PNG", "top.png"}
    assert set(props) == expected  # the unreadable image gets no entry
    assert summary["unreadable"] == ["b/bad.jpg"] and summary["images"] == 8 and summary["computed"] == 8
    assert sum(summary["levels"].values()) == 7
    z = read_all(out)  # loads with allow_pickle=False
    assert z["offsets"].dtype == np.int64 and z["boxes"].dtype == np.float32 and z["offsets"][-1] == len(z["boxes"])
    for (W, H), rel in zip(z["sizes"].tolist(), z["paths"].tolist()):
        check_boxes(props[rel], W, H)
    rgb = ss.decode_image((image_root / "b/c/y1.png").read_bytes())  # end to end equals the per-image functions
    ref, _ = ss.filter_with_fallback(ss.selective_search(rgb), rgb.shape[1], rgb.shape[0])
    np.testing.assert_array_equal(props["b/c/y1.png"], ref)
    assert not (tmp_path / "props.npz.parts").exists()  # parts removed after the merge


def test_precompute_workers_identical(image_root, tmp_path):
    ssp.precompute(image_root, tmp_path / "w1.npz", workers=1, chunk_size=2, progress=False)
    ssp.precompute(image_root, tmp_path / "w2.npz", workers=2, chunk_size=2, progress=False)
    assert_same_file(tmp_path / "w1.npz", tmp_path / "w2.npz")


def test_precompute_resumes_after_kill(image_root, tmp_path, monkeypatch):
    ssp.precompute(image_root, tmp_path / "full.npz", workers=1, chunk_size=2, progress=False)
    real, done = ssp._run_chunk, []  # done: the part files written, by name
    parts = lambda *c: [f"part{k:06d}" for k in c]  # noqa: E731

    def dies_on_chunk_2(task):
        if task[0] == 2:
            raise KeyboardInterrupt("simulated kill")
        done.append(Path(task[3]).stem)
        return real(task)

    monkeypatch.setattr(ssp, "_run_chunk", dies_on_chunk_2)
    out = tmp_path / "resumed.npz"
    with pytest.raises(KeyboardInterrupt):
        ssp.precompute(image_root, out, workers=1, chunk_size=2, progress=False)
    assert done == parts(0, 1) and not out.exists()
    assert sorted(p.name for p in (tmp_path / "resumed.npz.parts").glob("part*.npz")) == [
        "part000000.npz", "part000001.npz"]

    def counts(task):
        done.append(Path(task[3]).stem)
        return real(task)

    monkeypatch.setattr(ssp, "_run_chunk", counts)
    done.clear()  # b/bad.jpg, recorded unreadable in part 1 by the killed run, is retried once (it fails again)
    summary = ssp.precompute(image_root, out, workers=1, chunk_size=2, progress=False, keep_parts=True)
    assert done == parts(2, 3) + ["retry000000"] and summary["computed_chunks"] == [2, 3]
    assert summary["computed"] == 4 and summary["retried"] == 1 and summary["recovered"] == {}
    assert_same_file(out, tmp_path / "full.npz")
    assert sorted(p.name for p in (tmp_path / "resumed.npz.parts").iterdir()) == [f"{p}.npz" for p in parts(0, 1, 2, 3)]
    done.clear()  # a complete output is not recomputed: only its recorded failure is retried
    summary = ssp.precompute(image_root, out, workers=1, chunk_size=2, progress=False)
    assert summary["computed"] == 0 and done == ["retry000000"] and summary["unreadable"] == ["b/bad.jpg"]
    assert_same_file(out, tmp_path / "full.npz")
    out.unlink()  # lost final file and no parts: everything again
    done.clear()
    ssp.precompute(image_root, out, workers=1, chunk_size=2, progress=False)
    assert done == parts(0, 1, 2, 3)  # a failure of this run is not retried in it
    done.clear()  # another filter setting makes the old output stale
    assert ssp.precompute(image_root, out, workers=1, chunk_size=2, min_side=32, progress=False)["computed"] == 8


def test_precompute_deleted_part_recomputed(image_root, tmp_path, monkeypatch):
    out = tmp_path / "p.npz"
    ssp.precompute(image_root, out, workers=1, chunk_size=3, progress=False, keep_parts=True)
    reference = read_all(out)
    out.unlink()
    (tmp_path / "p.npz.parts" / "part000001.npz").unlink()
    real, done = ssp._run_chunk, []
    monkeypatch.setattr(ssp, "_run_chunk", lambda task: done.append(task[0]) or real(task))
    ssp.precompute(image_root, out, workers=1, chunk_size=3, progress=False)
    assert done == [1]
    for key, value in read_all(out).items():
        np.testing.assert_array_equal(value, reference[key])


@contextlib.contextmanager
def time_limit(seconds: int):
    """Raise TimeoutError in the main thread after `seconds`: a hang fails the test instead of the suite."""
    def fail(*_):
        raise TimeoutError(f"still running after {seconds} s: hung?")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# Loaded at start-up by the spawned workers only (PYTHONPATH): SIGKILL, as the OOM killer sends, on reading one image.
KILLER = """import os, signal
import numpy as np
_fromfile = np.fromfile
def fromfile(file, *args, **kwargs):
    if os.environ.get("SS_TEST_KILL_ON") and str(file).endswith(os.environ["SS_TEST_KILL_ON"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return _fromfile(file, *args, **kwargs)
np.fromfile = fromfile
"""


def test_precompute_worker_killed_names_chunk_and_resumes(image_root, tmp_path, monkeypatch):
    """A worker killed while it reads top.png (last of 4 chunks of 2) stops the run within a bounded time (a Pool used
    to hang) with an error naming that chunk; the finished parts are kept and a rerun computes only the others."""
    ssp.precompute(image_root, tmp_path / "ref.npz", workers=1, chunk_size=2, progress=False)
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(KILLER)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "hook"))
    monkeypatch.setenv("SS_TEST_KILL_ON", "top.png")
    out = tmp_path / "p.npz"
    with time_limit(90), pytest.raises(RuntimeError, match=r"worker process died") as err:
        ssp.precompute(image_root, out, workers=2, chunk_size=2, progress=False)
    assert "part000003 (b/z.PNG .. top.png)" in str(err.value) and "rerun the same command" in str(err.value)
    kept = sorted(int(p.stem[4:]) for p in (tmp_path / "p.npz.parts").glob("part*.npz"))
    assert not out.exists() and len(kept) >= 2 and 3 not in kept  # chunk 3 started after two had finished
    monkeypatch.delenv("SS_TEST_KILL_ON")
    with time_limit(90):
        summary = ssp.precompute(image_root, out, workers=2, chunk_size=2, progress=False)
    assert summary["computed_chunks"] == sorted({0, 1, 2, 3} - set(kept))
    assert_same_file(out, tmp_path / "ref.npz")


def test_precompute_retries_recorded_failures(image_root, tmp_path, capsys):
    """An image that failed once (corrupt, then restored) is retried by a rerun and enters the file as in a run where
    it never failed; the dataset, which refused the folder (the image reads now but has no proposals), accepts it.
    The truly corrupt b/bad.jpg is retried too and stays listed with its reason."""
    data = pytest.importorskip("data")
    image = image_root / "b/c/long_name_sorted_inside.png"  # longer than every other path: no truncated string
    write_rgb(image, make_image(9))
    ssp.precompute(image_root, tmp_path / "ref.npz", workers=1, chunk_size=3, progress=False)
    good = image.read_bytes()
    image.write_bytes(good[:100])  # truncated: cannot decode
    out = tmp_path / "p.npz"
    assert ssp.precompute(image_root, out, workers=1, chunk_size=3, progress=False)["unreadable"] == [
        "b/bad.jpg", "b/c/long_name_sorted_inside.png"]
    image.write_bytes(good)
    with pytest.raises(ValueError, match=r"no proposals for 2 of 9 images.*1 or more of them readable.*python "
                                         r"selective_search\.py"):
        data.PretrainDataset(image_root, out)
    capsys.readouterr()
    summary = ssp.precompute(image_root, out, workers=1, chunk_size=1, progress=False)  # 2 retry files
    assert summary["computed"] == 0 and summary["retried"] == 2 and summary["unreadable"] == ["b/bad.jpg"]
    assert summary["recovered"] == {"b/c/long_name_sorted_inside.png": "cannot decode"}
    printed = capsys.readouterr().out
    assert "unreadable: b/bad.jpg (cannot decode)" in printed and "had failed: cannot decode" in printed
    assert_same_file(out, tmp_path / "ref.npz")
    assert not (tmp_path / "p.npz.parts").exists()
    with pytest.warns(UserWarning, match="1 unreadable"):
        assert len(data.PretrainDataset(image_root, out)) == 8


def test_shards_union_equals_unsharded(image_root, tmp_path):
    ssp.precompute(image_root, tmp_path / "all.npz", workers=1, chunk_size=2, progress=False)
    s0 = ssp.precompute(image_root, tmp_path / "sh.npz", workers=1, shard=(0, 2), chunk_size=2, progress=False)
    ssp.main([str(image_root), str(tmp_path / "sh.npz"), "--shard", "1/2", "--workers", "1", "--chunk-size", "2"])
    files = [ssp.shard_path(tmp_path / "sh.npz", (i, 2)) for i in range(2)]
    assert all(f.exists() for f in files) and files[0].name == "sh.shard0of2.npz"
    assert s0["images"] == 4  # 8 files split 4 + 4
    full = ssp.load_proposals(tmp_path / "all.npz")
    for merged in (ssp.load_proposals(str(tmp_path / "sh.shard*of2.npz")), ssp.load_proposals(files)):
        assert merged.keys() == full.keys()
        for key in full:
            np.testing.assert_array_equal(merged[key], full[key])
    paths, offsets, boxes = ssp.read_proposal_arrays(files)
    assert len(offsets) == len(paths) + 1 and offsets[-1] == len(boxes)
    with pytest.raises(ValueError):  # the same image twice
        ssp.load_proposals([files[0], files[0]])


def test_precompute_empty_root(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        ssp.precompute(tmp_path / "empty", tmp_path / "x.npz", workers=1, progress=False)


def test_proposals_load_without_ximgproc(image_root, tmp_path, monkeypatch):
    """A machine with plain opencv (no contrib: e.g. the lent GPU's image) still loads a proposals file, and a search
    there stops with an error that names the package to install."""
    import cv2
    out = tmp_path / "p.npz"
    ssp.precompute(image_root, out, workers=1, chunk_size=3, progress=False)
    monkeypatch.delattr(cv2, "ximgproc")
    assert len(ssp.load_proposals(out)) > 0
    with pytest.raises(ImportError, match="opencv-contrib-python-headless"):
        ss.selective_search(make_image(0), preset="paper")


def test_precompute_grouping_flag(image_root, tmp_path):
    out = tmp_path / "n.npz"
    ssp.main([str(image_root), str(out), "--workers", "1", "--grouping", "numpy"])
    with np.load(out, allow_pickle=False) as z:
        assert json.loads(str(z["config"]))["grouping"] == "numpy"
    ssp.precompute(image_root, tmp_path / "a.npz", workers=1, progress=False)  # default: auto -> numpy
    assert_same_file(out, tmp_path / "a.npz")
    ssp.precompute(image_root, tmp_path / "o.npz", workers=1, progress=False, grouping="opencv")
    with np.load(tmp_path / "o.npz", allow_pickle=False) as z:
        assert "grouping" not in json.loads(str(z["config"]))  # as in files made before the option existed
    assert ssp.load_proposals(tmp_path / "o.npz").keys() == ssp.load_proposals(out).keys()
    # a file made with OpenCV's grouping stays valid for the default (the same boxes): nothing is recomputed
    assert ssp.precompute(image_root, tmp_path / "o.npz", workers=1, progress=False)["computed"] == 0
    with pytest.raises(ValueError, match="single-strategy"):  # before any image, not as per-image failures
        ssp.precompute(image_root, tmp_path / "f.npz", preset="fast", grouping="numpy", workers=1, progress=False)
    assert not (tmp_path / "f.npz.parts").exists()
