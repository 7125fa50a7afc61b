"""User errors at the command lines: unreadable or wrong weight files, bad ground truth, flags out of range. Each
ends in one message naming the file or the flag (no torch traceback, no advice to load with weights_only=False), or a
counted, warned skip; never a silently wrong result."""
import json
import pickle

import pytest
import torch

import augment
import coco_files
import eval as ev
import export
import finetune
import model
import runtime
import train
import voc_data
from test_train import tiny_args


@pytest.fixture()
def bad_files(tmp_path):
    """Weight files a user may pass by mistake: missing, text, a truncated zip, a pickle of a non-tensor object."""
    torch.save({"state_dict": {"backbone.w": torch.ones(2)}}, tmp_path / "ok.pth")
    (tmp_path / "text.pth").write_text("not weights")
    (tmp_path / "trunc.pth").write_bytes((tmp_path / "ok.pth").read_bytes()[:200])
    (tmp_path / "object.pth").write_bytes(pickle.dumps(Exception("an object")))
    return [tmp_path / n for n in ("missing.pth", "text.pth", "trunc.pth", "object.pth")]


def test_load_weights_names_the_file_and_never_suggests_unsafe_loading(bad_files):
    for path in bad_files:
        with pytest.raises(ValueError, match=rf"^{path}: ") as e:
            model.load_weights(path, "pretrained.pth")
        assert "weights_only" not in str(e.value).replace("weights_only=True refuses", "")
    assert model.load_weights(bad_files[0].parent / "ok.pth")["state_dict"]["backbone.w"].sum() == 2


def test_init_and_checkpoint_flags_give_one_line(pool, tmp_path, bad_files, monkeypatch):
    path = bad_files[2]  # truncated

    def listing(args):  # on ImageNet, minutes of listing files: a bad --init must fail before it
        raise AssertionError("the dataset was built before --init was read")
    monkeypatch.setattr(train, "build_data", listing)
    with pytest.raises(SystemExit, match=rf"{path}: cannot be read"):
        train.main(tiny_args(pool, tmp_path / "sep", "--mode", "separate", "--init", str(path)))
    monkeypatch.undo()
    args, _ = finetune.resolve(finetune.parse_args(["--init", str(path), "--depth", "18"]))
    with pytest.raises(SystemExit, match=rf"--init: {path}: cannot be read"):
        finetune.build_detector(args, 2, log=lambda *a: None)
    with pytest.raises(SystemExit, match=rf"--checkpoint: {path}: cannot be read"):
        ev.main(["--checkpoint", str(path), "--out", str(tmp_path / "ev")])


def test_export_refuses_the_wrong_file(tmp_path):
    """A train.py checkpoint.pth or a model_final.pth given for detectron2 wrote an empty / partial model before."""
    net = model.ADePT("joint", depth=18)
    torch.save({"model": net.state_dict(), "optimizer": {}, "step": 1}, tmp_path / "checkpoint.pth")
    torch.save({"state_dict": model.export_pretrained(net), "meta": {}}, tmp_path / "pretrained.pth")
    with pytest.raises(SystemExit, match="checkpoint.pth: not a train.py pretrained.pth .*export its pretrained"):
        export.main(["detectron2", str(tmp_path / "checkpoint.pth"), str(tmp_path / "d2.pkl")])
    with pytest.raises(SystemExit, match="pretrained.pth: not a finetune.py model_final.pth .*detectron2"):
        export.main(["torchvision", str(tmp_path / "pretrained.pth"), str(tmp_path / "tv.pth")])
    assert not (tmp_path / "d2.pkl").exists() and not (tmp_path / "tv.pth").exists()
    export.main(["detectron2", str(tmp_path / "pretrained.pth"), str(tmp_path / "d2.pkl")])
    with open(tmp_path / "d2.pkl", "rb") as f:
        assert any(k.startswith("backbone.bottom_up.") for k in pickle.load(f)["model"])


def test_ground_truth_checks_in_evaluation(tmp_path):
    """As fine-tuning reads a split: an unknown category is refused naming the entry, a box of width or height <= 0
    is dropped with a counted warning (it used to count as a miss), also for a COCO object already indexed."""
    cats = [{"id": 1, "name": "a"}]
    ann = lambda i, box, c=1: {"id": i, "image_id": 1, "category_id": c, "bbox": box}  # noqa: E731
    gt = {"images": [{"id": 1, "file_name": "1.png", "width": 50, "height": 50}], "categories": cats,
          "annotations": [ann(1, [0, 0, 10, 10]), ann(2, [5, 5, -5, 10]), ann(3, [5, 5, 10, 0])]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    with pytest.warns(UserWarning, match="2 ground-truth boxes with a width or height <= 0 dropped"):
        coco = coco_files.load_coco(path)
    assert [a["id"] for a in coco.loadAnns(coco.getAnnIds())] == [1]
    perfect = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 1.0}]
    with pytest.warns(UserWarning):
        assert ev.coco_eval(path, perfect)["AP"] == pytest.approx(100)
    indexed = coco_files.COCO()
    indexed.dataset = json.loads(path.read_text())
    indexed.createIndex()
    with pytest.warns(UserWarning, match="2 ground-truth"):
        assert len(coco_files.load_coco(indexed).getAnnIds()) == 1
    gt["annotations"].append(ann(4, [0, 0, 5, 5], c=42))
    path.write_text(json.dumps(gt))
    with pytest.raises(ValueError, match=r"gt.json: annotations\[3\] has category_id 42, not among the categories"):
        coco_files.load_coco(path)


def test_novel_ids_must_be_categories_of_the_split(tmp_path):
    assert voc_data.novel_ids("3,1", [1, 2, 3], "abc") == [3, 1]
    names = list(voc_data.VOC_CLASSES)
    assert voc_data.novel_ids("voc1", list(range(1, 21)), names) == [names.index(n) + 1 for n in
                                                                      ("bird", "bus", "cow", "motorbike", "sofa")]
    for bad in ("7,8", "voc1", "voc4", "x"):
        with pytest.raises(ValueError, match=rf"{bad}: expected category ids among \[1, 2, 3\]"):
            voc_data.novel_ids(bad, [1, 2, 3], "abc")
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"images": [{"id": 1, "file_name": "1.png", "width": 9, "height": 9}],
                              "categories": [{"id": 1, "name": "a"}], "annotations": []}))
    (tmp_path / "r.json").write_text("[]")
    for bad in ("7", "voc1"):  # checked before any --checkpoint is predicted
        with pytest.raises(SystemExit):  # argparse's error: usage line and the message, exit status 2
            ev.main(["--gt", str(gt), "--checkpoint", str(tmp_path / "never_read.pth"), "--novel", bad])


def test_numeric_flags_are_checked_before_anything_runs(capsys):
    for argv in (["--size", "0"], ["--small-size", "-1"], ["--batch-size", "0"], ["--ckpt-every", "0"],
                 ["--num-boxes", "0"], ["--min-visible", "1.5"], ["--min-visible", "nan"], ["--max-steps", "-1"]):
        with pytest.raises(SystemExit):
            train.parse_args(argv)
        assert f"argument {argv[0]}: expected" in capsys.readouterr().err, argv  # its flag, not another error
    for argv in (["--iters", "0"], ["--batch-size", "x"], ["--max-dets", "0"], ["--val-limit", "0"],
                 ["--precise-bn", "-1"], ["--train-proposals", "0"]):
        with pytest.raises(SystemExit):
            finetune.parse_args(argv)
        assert f"argument {argv[0]}: expected" in capsys.readouterr().err, argv
    assert train.parse_args(["--min-visible", "1", "--max-steps", "0", "--size", "32"]).min_visible == 1.0
    with pytest.raises(SystemExit, match="5 sides for 4 FPN levels"):
        runtime.anchor_sizes("8,16,32,64,128", 4)
    with pytest.raises(ValueError, match="view side"):  # used to loop forever
        augment._halvings(100, 100, 0)


def test_non_finite_stop_before_any_checkpoint_says_so(tmp_path):
    with pytest.raises(FloatingPointError, match="step 1; no checkpoint was written yet"):
        runtime.check_finite(torch.tensor(True), 1, 0, tmp_path)


def test_finetune_resume_compares_data_paths_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args, _ = finetune.resolve(finetune.parse_args(["--train-json", "a.json", "--train-images", "imgs",
                                                    "--val-json", "v.json", "--val-images", "imgs"]))
    saved = {**vars(args), "train_json": str(tmp_path / "a.json"), "val_images": str(tmp_path / "x" / ".." / "imgs")}
    finetune.check_same_run(tmp_path / "checkpoint.pth", {"args": saved}, args)  # the same files: resumes
    with pytest.raises(SystemExit, match="train_json"):
        finetune.check_same_run(tmp_path / "checkpoint.pth", {"args": {**saved, "train_json": "b.json"}}, args)
    # a run from before --keep-empty trained on the empty images: it resumes doing so, and says it
    old, said = {k: v for k, v in saved.items() if k != "keep_empty"}, []
    assert args.keep_empty is False
    finetune.check_same_run(tmp_path / "checkpoint.pth", {"args": old}, args, log=said.append)
    assert args.keep_empty is True and said == [f"{tmp_path / 'checkpoint.pth'}: written before --keep-empty existed; "
                                                "resumed with keep_empty = True, as it was trained"]
    with pytest.raises(SystemExit, match="keep_empty: False -> True"):  # a checkpoint that has the flag: compared
        finetune.check_same_run(tmp_path / "checkpoint.pth", {"args": {**old, "keep_empty": False}}, args)


def test_bad_input_files_end_in_one_line(pool, tmp_path, capsys):
    """A malformed file read by the data code ends the run with SystemExit and its one-line message, naming the file
    (no traceback; runtime.bad_input_exits); never numpy's advice to load pickled data."""
    import numpy as np
    import ss_proposals
    images, proposals = pool
    bad_json, foreign, empty, array = (tmp_path / n for n in ("bad.json", "foreign.npz", "empty.npz", "array.npy"))
    bad_json.write_text("{not json")
    np.savez(foreign, paths=np.array(["a.jpg"]))  # an .npz without offsets, boxes
    empty.write_bytes(b"")
    np.save(array, np.zeros(3))
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(proposals.read_bytes()[:300])  # the pool's own proposals file, cut short
    for props, why in ((bad_json, "not a selective_search.py proposals file"), (foreign, r"no \['boxes', 'offsets'\]"),
                       (empty, "not a selective"), (array, "a single array"), (truncated, "not a selective")):
        with pytest.raises(SystemExit, match=rf"^error: {props}: .*{why}") as e:
            train.main(tiny_args((images, props), tmp_path / "t"))
        assert "allow_pickle" not in str(e.value)
    with pytest.raises(SystemExit, match=rf"^error: {bad_json}: not valid JSON"):
        finetune.main(["--train-json", str(bad_json), "--train-images", str(images), "--val-json", str(bad_json),
                       "--val-images", str(images), "--out", str(tmp_path / "f"), "--depth", "18"])
    with pytest.raises(SystemExit, match=rf"^error: {bad_json}: not valid JSON"):
        ev.main(["--gt", str(bad_json), "--results", str(bad_json), "--out", str(tmp_path / "e")])
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "width": 8, "height": 8}],
                              "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    for flag in ("--results", "--proposals"):
        with pytest.raises(SystemExit, match=rf"^error: {bad_json}: "):
            ev.main(["--gt", str(gt), flag, str(bad_json), "--out", str(tmp_path / "e")])
    five = tmp_path / "five.json"
    five.write_text(json.dumps({"a.jpg": [[1, 2, 3, 4, 5]]}))
    with pytest.raises(SystemExit, match=rf"^error: {five}: the proposals of a.jpg are not"):
        ev.main(["--gt", str(gt), "--proposals", str(five), "--out", str(tmp_path / "e")])
    other = tmp_path / "other.json"  # results of another split: refused with or without --val-limit
    other.write_text(json.dumps([{"image_id": 7, "category_id": 1, "bbox": [0, 0, 2, 2], "score": 0.5}]))
    for extra in ([], ["--val-limit", "1"]):
        with pytest.raises(SystemExit, match=rf"^error: {other}: entry 0.* unknown image_id"):
            ev.main(["--gt", str(gt), "--results", str(other), "--out", str(tmp_path / "e"), *extra])
    with pytest.raises(SystemExit, match=rf"^error: no .* images under {tmp_path / 'none'}"):
        ss_proposals.main([str(tmp_path / "none"), str(tmp_path / "p.npz")])
    with pytest.raises(SystemExit, match=r"^error: .*image set list not found"):
        finetune.main(["voc2coco", str(tmp_path), "--sets", "VOC2007/test", "--out", str(tmp_path / "v.json")])
    for argv in (["--shard", "1/1"], ["--shard", "x"], ["--chunk-size", "0"], ["--min-side", "nan"],
                 ["--max-side", "0"]):
        with pytest.raises(SystemExit) as e:
            ss_proposals.main([str(images), str(tmp_path / "p.npz"), *argv])
        assert e.value.code == 2  # argparse's usage error, before any image is read
    assert "Traceback" not in capsys.readouterr().err
