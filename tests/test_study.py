"""study.py / study_report.py: the cell plan per preset (dependencies, seeds, flags), resume / skip of done cells,
failure propagation, the per-cell subprocess runner, mean +- std and verdicts on hand-computed cases, and the report
(markdown tables with the paper's numbers, metrics.json, PNGs) from fabricated cell metrics. No training runs here."""
import json
import math
import os
import sys
import threading

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import study  # noqa: E402
import study_cells  # noqa: E402
import study_report  # noqa: E402

FILES = ("/d/train.json", "/d/train", "/d/val.json", "/d/val")


def _arg(argv, flag):
    return argv[argv.index(flag) + 1]


def test_plan_cpu_cells_and_dependencies(tmp_path):
    p = study.PRESETS["cpu"]
    cells = study.plan(p, range(3), tmp_path, FILES)
    by = {c.name: c for c in cells}
    assert len(by) == len(cells) and len({c.folder for c in cells}) == len(cells)
    pre = sorted(c.name for c in cells if c.kind == "pretrain")  # shared pre-training: seed 0 only
    assert pre == sorted(f"pretrain/{v}/s0" for v in ("byol", "soco", "separate", "joint", "rpngrad", "rpnprop",
                                                      "both"))
    sep = by["pretrain/separate/s0"]
    assert sep.deps == ("pretrain/soco/s0",)
    assert _arg(sep.cmds[0], "--init") == str(tmp_path.resolve() / "runs/pretrain/soco/s0/pretrained.pth")
    assert _arg(sep.cmds[0], "--mode") == "separate" and _arg(by["pretrain/both/s0"].cmds[0], "--mode") == "joint"
    assert {"--rpn-grad-to-backbone", "--rpn-proposals"} <= set(by["pretrain/both/s0"].cmds[0])
    assert "--rpn-proposals" not in by["pretrain/rpngrad/s0"].cmds[0]
    ft = [c for c in cells if c.kind == "finetune"]
    assert len(ft) == 5 * 3 * 3 + 3 * 1 * 3  # Table 1 methods x fractions x seeds + Table 4 switches at 10%
    assert len([c for c in cells if c.kind == "fewshot"]) == 3 * 3 * 3
    for c in ft + [c for c in cells if c.kind == "fewshot"]:
        argv = c.cmds[0]
        assert _arg(argv, "--seed") == str(c.info["seed"]) and _arg(argv, "--val-json") == FILES[2]
        if c.info["method"] == "scratch":
            assert c.deps == () and _arg(argv, "--init") == "none"
        else:
            assert c.deps == (f"pretrain/{c.info['method']}/s0",)
            assert _arg(argv, "--init") == str(by[c.deps[0]].folder / "pretrained.pth")
    shot = by["fewshot/joint/k5/s2"].cmds[0]
    assert _arg(shot, "--detector") == "faster" and _arg(shot, "--shots") == "5" and "--base-full" in shot
    assert _arg(shot, "--novel") == "5,6"
    frac = by["finetune/soco/f0.01/s1"].cmds[0]
    assert _arg(frac, "--detector") == "mask" and _arg(frac, "--label-fraction") == "0.01"
    assert _arg(frac, "--iters") == str(p["iters"][0.01])
    seen = set()
    for c in cells:  # dependencies come first in the plan
        assert set(c.deps) <= seen
        seen.add(c.name)


def test_plan_gpu_pretrains_per_seed(tmp_path):
    cells = study.plan(study.PRESETS["gpu"], [0, 1, 2], tmp_path, FILES)
    by = {c.name: c for c in cells}
    assert len([c for c in cells if c.kind == "pretrain"]) == 7 * 3
    assert by["pretrain/separate/s2"].deps == ("pretrain/soco/s2",)
    assert by["finetune/joint/f0.1/s1"].deps == ("pretrain/joint/s1",)
    assert _arg(by["pretrain/joint/s1"].cmds[0], "--depth") == "50" and "--amp" in by["pretrain/joint/s1"].cmds[0]
    assert len([c for c in cells if c.kind == "fewshot"]) == 5 * 3 * 3


def test_cpu_budget_fits_two_hours_on_two_cores(tmp_path):
    p = study.PRESETS["cpu"]
    cells = study.plan(p, range(p["seeds"]), tmp_path, FILES)
    total = sum(study.estimate(c, p, p["val_images"]) for c in cells)
    assert p["jobs"] == 2 and total / p["jobs"] <= 2.1 * 3600


def _smoke_cells(tmp_path, seeds=(0,)):
    return study.plan(study.PRESETS["smoke"], seeds, tmp_path, FILES)


def _write_done(cell, payload=None):
    cell.folder.mkdir(parents=True, exist_ok=True)
    (cell.folder / "cell.json").write_text(json.dumps(payload or {}))


def test_run_cells_skips_done_and_respects_order(tmp_path):
    cells = _smoke_cells(tmp_path)
    by = {c.name: c for c in cells}
    for name in ("pretrain/soco/s0", "finetune/scratch/f0.01/s0"):
        _write_done(by[name])
    calls, lock = [], threading.Lock()

    def fake(cell):
        with lock:
            assert all(by[d].done for d in cell.deps), cell.name
            calls.append(cell.name)
        _write_done(cell)
        return True
    state = study.run_cells(cells, jobs=2, runner=fake)
    assert "pretrain/soco/s0" not in calls and "finetune/scratch/f0.01/s0" not in calls
    assert sorted(calls) == sorted(c.name for c in cells if c.name not in ("pretrain/soco/s0",
                                                                           "finetune/scratch/f0.01/s0"))
    assert set(state.values()) == {"done"}
    assert study.run_cells(cells, jobs=1, runner=lambda c: pytest.fail("nothing left to run")) == state


def test_run_cells_failure_blocks_dependents(tmp_path):
    cells = _smoke_cells(tmp_path)
    calls = []

    def fake(cell):
        calls.append(cell.name)
        if cell.name == "pretrain/soco/s0":
            return False  # no cell.json written
        _write_done(cell)
        return True
    state = study.run_cells(cells, jobs=1, runner=fake)
    blocked = {"pretrain/separate/s0"} | {c.name for c in cells if c.deps in (("pretrain/soco/s0",),
                                                                               ("pretrain/separate/s0",))}
    assert {n for n, s in state.items() if s == "failed"} == blocked | {"pretrain/soco/s0"}
    assert not blocked & set(calls) and "finetune/joint/f0.1/s0" in calls


def test_run_cell_logs_cleans_up_and_stops_at_first_failure(tmp_path):
    for kind, keep in (("finetune", False), ("pretrain", False), ("fewshot", True)):
        out = tmp_path / kind
        ok = study.Cell("x/ok", kind, [[sys.executable, "-c", f"print('hello'); open({str(out / 'cell.json')!r}, 'w')"
                                        ".write('{}')"]], out, info={"keep": keep})
        ok.folder.mkdir()
        for name in ("checkpoint.pth", "model_final.pth", "pretrained.pth"):
            (ok.folder / name).write_bytes(b"x")
        assert study.run_cell(ok, dict(os.environ)) and "hello" in (ok.folder / "log.txt").read_text()
        left = {"model_final.pth", "pretrained.pth"} if kind == "pretrain" or keep else {"pretrained.pth"}
        assert {f.name for f in ok.folder.glob("*.pth")} == left  # the resume checkpoint of a done cell is gone
    bad = study.Cell("x/bad", "recall", [[sys.executable, "-c", "raise SystemExit(3)"],
                                         [sys.executable, "-c", "print('never')"]], tmp_path / "bad")
    assert not study.run_cell(bad, dict(os.environ)) and "never" not in (bad.folder / "log.txt").read_text()


def test_mean_std_and_format():
    assert study.mean_std([1, 2, 3]) == (2.0, 1.0, 3)
    m, s, n = study.mean_std([5.0, None, float("nan")])
    assert (m, n) == (5.0, 1) and math.isnan(s)
    assert study.mean_std([])[2] == 0
    assert study_report.fmt((2.0, 1.0, 3)) == "2.00 ± 1.00" and study_report.fmt((5.0, math.nan, 1)) == "5.00"
    assert study_report.fmt(study_report.NAN3) == "-"


def test_verdict_hand_cases():
    b = (1.0, 1.0, 4)  # SE of a difference with a = (., 1, 4): sqrt(1/4 + 1/4) = 0.707, 2 SE = 1.414
    assert study.verdict((2.5, 1.0, 4), b) == "reproduces"  # d = 1.5 > 1.414
    assert study.verdict((2.3, 1.0, 4), b) == "same sign, within noise"  # d = 1.3
    assert study.verdict((0.9, 1.0, 4), b) == "does not reproduce"
    assert study.verdict((2.0, math.nan, 1), b).startswith("higher (one seed")
    assert study.verdict(study_report.NAN3, b) == "not measured"


def _fabricate(cells):
    """cell.json per cell: AP_bb = base(method) + 10 * fraction + seed, so each group's std over seeds 0-2 is 1."""
    base = {"scratch": 1.0, "byol": 2.0, "soco": 3.0, "separate": 4.0, "joint": 5.0, "rpngrad": 4.5, "rpnprop": 0.1,
            "both": 0.2}
    for c in cells:
        i = c.info
        if c.kind == "finetune":
            ap = base[i["method"]] + 10 * i["key"] + i["seed"]
            tide = {e: ap / 10 + k for k, e in enumerate(study_report.TIDE_COLS)}
            _write_done(c, {"metrics": {"bbox": {"AP": ap}, "segm": {"AP": ap - 0.5}},
                            "tide_bbox": dict(tide, AP50=ap)})
        elif c.kind == "fewshot":
            _write_done(c, {"metrics": {"voc_map50": {"nAP": base[i["method"]] + i["key"] + i["seed"], "mAP": 7.0}}})
        elif i["variant"] == "selective_search":
            _write_done(c, {"recall": {"AR@all": 60.0, "proposals": 120.0, "filtered AR@all": 40.0,
                                       "filtered proposals": 30.0}})
        elif i["variant"] in ("byol", "soco"):
            _write_done(c, {"recall": None})
        else:
            _write_done(c, {"recall": {"AR@10": 10.0, "AR@100": 30.0 if i["variant"] != "random_rpn" else 5.0,
                                       "AR@1000": 50.0, "proposals": 900.0}})


def test_aggregate_tables_metrics_and_pngs(tmp_path):
    p = dict(study.PRESETS["smoke"], preset="smoke", seeds=3, val_n=4, novel=[5, 6])
    cells = _smoke_cells(tmp_path, seeds=(0, 1, 2))
    _fabricate(cells)
    md_path = study.aggregate(cells, tmp_path, p, FILES)
    md = md_path.read_text()
    # soco at 100%: AP_bb 3 + 10 + {0, 1, 2} -> 14.00 +- 1.00, AP_mk 13.50 +- 1.00; paper's 41.8 / 37.3 beside it
    soco = next(line for line in md.splitlines() if line.startswith("| SoCo |"))
    assert "14.00 ± 1.00 / 13.50 ± 1.00" in soco and "41.8 / 37.3" in soco
    assert "## Table 4" in md and "| L_det + L_RPN | SS + RPN |" in md and "0.003 / 0.002" in md  # paper, 10%
    assert "| L_det | SS | 7.00 ± 1.00 / 6.50 ± 1.00 | 28.576 / 25.794 |" in md  # Table 4's own joint row
    fs = next(line for line in md.splitlines() if line.startswith("| ADePT (joint) |") and "2.91" in line)
    assert "7.00 ± 1.00" in fs  # novel K=1: 5 + 1 + {0, 1, 2}
    assert "| selective search | - | - | 60.00 (all boxes) | 120.00 |" in md
    verdicts = json.loads((tmp_path / "metrics.json").read_text())["verdicts"]
    claims = {r["claim"]: r for r in verdicts}
    row = claims["Table 1, 1%, AP_bb: ADePT (joint) > SoCo"]
    assert row["verdict"] == "reproduces" and row["paper"] == "15.3 vs 15.0"  # 6.1 vs 4.1 (+- 1, 3 seeds): 2 > 1.63
    assert claims["Table 1, 1%, AP_bb: ADePT (sep) > SoCo"]["verdict"] == "same sign, within noise"  # d = 1
    assert not any(c.startswith("Table 1, 100%, AP_bb: ADePT (joint)") for c in claims)  # 41.8 vs 41.8: no claim
    row = claims["Table 2, K=5, novel mAP50: SoCo > ADePT (sep)"]  # the paper's direction: 1.91 vs 1.17
    assert row["verdict"] == "does not reproduce" and row["ours"] == "9.00 ± 1.00 vs 10.00 ± 1.00"
    assert claims["Table 4, 10%, AP_bb: L_det + SS (joint default) > L_det + SS + RPN"]["paper"] == "28.576 vs 0.02"
    summary = json.loads((tmp_path / "metrics.json").read_text())["summary"]
    assert summary["finetune"]["soco"]["1.0"]["AP_bb"] == [14.0, 1.0, 3]
    for png in ("ap_vs_labels.png", "tide.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert "No claim can be judged" not in md
    assert claims["premise (issue 6), Scratch AP_bb: 100% labels > 1%"]["verdict"] == "reproduces"  # 11 vs 1.1
    study.aggregate(cells, tmp_path, dict(p, fractions=(1.0,)), FILES)  # one label fraction: no premise to test
    assert not any(r["claim"].startswith("premise (issue 6)")
                   for r in json.loads((tmp_path / "metrics.json").read_text())["verdicts"])
    for c in cells:  # detectors that have not learned (AP_bb < 1 everywhere): the report says no claim is judged
        if c.kind == "finetune":
            d = json.loads((c.folder / "cell.json").read_text())
            d["metrics"]["bbox"]["AP"] = 0.5
            (c.folder / "cell.json").write_text(json.dumps(d))
    assert "No claim can be judged from this run: the best fine-tuned AP_bb is 0.50" in study.aggregate(
        cells, tmp_path, p, FILES).read_text()


@pytest.fixture
def tiny_val(tmp_path):
    """Two 64 x 64 images with one box each and their COCO json (2 categories)."""
    import cv2
    import numpy as np
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    images, anns = [], []
    for i in (1, 2):
        cv2.imwrite(str(tmp_path / "img" / f"{i}.png"), rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
        images.append({"id": i, "file_name": f"{i}.png", "width": 64, "height": 64})
        anns.append({"id": i, "image_id": i, "category_id": i, "bbox": [8, 8, 30, 20], "area": 600, "iscrowd": 0})
    coco = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    (tmp_path / "val.json").write_text(json.dumps(coco))
    return tmp_path / "val.json", tmp_path / "img"


def test_rpn_recall_loads_pretrained_rpn(tmp_path, tiny_val, monkeypatch):
    import torch

    import model
    import rpn
    torch.set_num_threads(1)
    fresh = study_cells.rpn_recall("none", *tiny_val, depth=18, top_n=50)
    assert set(fresh) == {"AR@10", "AR@100", "AR@1000", "proposals"} and 0 <= fresh["AR@100"] <= 100
    torch.manual_seed(0)  # the same initial weights as rpn_recall's "none": a file of them must give the same AR
    ext, head = model.FeatureExtractor(18), rpn.RPNHead()
    state = {**ext.state_dict(), **{f"rpn.{k}": v for k, v in head.state_dict().items()}}
    torch.save({"state_dict": state, "meta": {"depth": 18, "fpn_norm": "bn"}}, tmp_path / "p.pth")
    assert study_cells.rpn_recall(str(tmp_path / "p.pth"), *tiny_val, top_n=50) == fresh
    # the file's weights are what run (a random RPN scores AR 0 here, so AR alone cannot tell): an RPN head whose
    # delta conv is 0 with bias 10 gives deltas of 10 everywhere; an FPN whose output convs are 0 gives constant
    # maps, so every location's objectness is the same
    seen = []
    real = rpn.generate_proposals
    monkeypatch.setattr(rpn, "generate_proposals", lambda logits, deltas, *a: seen.append((logits, deltas)) or real(
        logits, deltas, *a))
    zero_d = {"rpn.d.weight": torch.zeros_like(state["rpn.d.weight"]), "rpn.d.bias": torch.full_like(
        state["rpn.d.bias"], 10.0)}
    zero_fpn = {k: torch.zeros_like(v) for k, v in state.items() if k.startswith("fpn.output.") and "conv" in k}
    for changed, check in ((zero_d, lambda lg, dl: bool((dl == 10).all())),
                           (zero_fpn, lambda lg, dl: bool((lg == lg[0, 0]).all())), ({}, lambda lg, dl: lg.std() > 0)):
        torch.save({"state_dict": {**state, **changed}, "meta": {"depth": 18}}, tmp_path / "x.pth")
        seen.clear()
        study_cells.rpn_recall(str(tmp_path / "x.pth"), *tiny_val, top_n=50)
        assert len(seen) == 2 and all(check(*s) for s in seen), sorted(changed)[:2]
    torch.save({"state_dict": ext.state_dict(), "meta": {"depth": 18}}, tmp_path / "soco.pth")  # no RPN in the file
    assert study_cells.rpn_recall(str(tmp_path / "soco.pth"), *tiny_val) is None


def test_predict_final_fallback_writes_valid_results(tmp_path, tiny_val):
    from dataclasses import asdict

    import torch

    import coco_files
    from detector import Detector, DetectorConfig
    torch.set_num_threads(1)
    cfg = DetectorConfig(num_classes=2, kind="faster", depth=18, min_size=(64,), max_size=64, test_size=64,
                         rpn_post_nms_test=50, max_dets=10, score_thresh=0.0)
    det = Detector(cfg)
    torch.save({"state_dict": det.state_dict(), "config": asdict(cfg), "cat_ids": [1, 2]}, tmp_path / "model_final.pth")
    study_cells._predict_final(tmp_path, str(tiny_val[0]), str(tiny_val[1]), tmp_path / "predictions.json")
    res = coco_files.load_results(tmp_path / "predictions.json")
    coco_files.check_results(res, coco_files.load_coco(tiny_val[0]))  # known image / category ids, finite scores, boxes
    assert res and {r["image_id"] for r in res} == {1, 2}


@pytest.mark.parametrize("preset", sorted(study.PRESETS))
def test_every_planned_command_parses_and_matches_pretraining(preset, tmp_path):
    """Each cell's argv is accepted by the script it calls, and every fine-tuned detector has the width, head and
    anchors of its pre-training (a mismatch would fail only after the pre-training had run)."""
    import inspect

    import finetune
    import train
    p = study.PRESETS[preset]
    for c in study.plan(p, range(2), tmp_path, FILES):
        for argv in c.cmds:
            if argv[1] == "train.py":
                a, _ = train.resolve_args(train.parse_args(argv[2:]))
                assert (a.head, a.fpn_channels, a.anchor_sizes) == (p["ft"]["head"], p["ft"]["fpn_channels"],
                                                                   p["pre_anchors"]), c.name
            elif argv[2] == "_finetune":
                a = finetune.parse_args(argv[argv.index("--") + 1:])
                assert (a.head, a.fpn_channels, a.anchor_sizes) == (p["ft"]["head"], p["ft"]["fpn_channels"],
                                                                   p["ft"]["anchor_sizes"]), c.name
            else:
                assert argv[2] == "_recall"
                inspect.signature(study.recall_cell).bind(*argv[3:])  # TypeError on a wrong argument count


def test_plan_overrides_make_a_smaller_study(tmp_path):
    """--methods / --fractions / --iters / --shots none / --no-ablation: only the cells asked for, with their
    pre-training dependencies (separate pulls in soco); bad values stop with the flag's name."""
    import copy
    a = study.parse_args(["--methods", "scratch,separate", "--fractions", "0.1", "--iters", "2000", "--shots", "none",
                          "--no-ablation", "--pre-steps", "30"])
    p = study.override(copy.deepcopy(study.PRESETS["cpu"]), a)
    cells = study.plan(p, range(2), tmp_path, FILES)
    names = {c.name for c in cells}
    assert {c.name for c in cells if c.kind == "pretrain"} == {"pretrain/soco/s0", "pretrain/separate/s0"}
    expected = {f"finetune/{m}/f0.1/s{s}" for m in ("scratch", "separate") for s in (0, 1)}
    assert {c.name for c in cells if c.kind == "finetune"} == expected
    assert not [n for n in names if n.startswith("fewshot/")]
    assert all(_arg(c.cmds[0], "--iters") == "2000" for c in cells if c.kind == "finetune")
    assert all(_arg(c.cmds[0], "--max-steps") == "30" for c in cells if c.kind == "pretrain")
    with pytest.raises(SystemExit, match="--methods"):
        study.override(copy.deepcopy(study.PRESETS["cpu"]), study.parse_args(["--methods", "scratch,moco"]))
    with pytest.raises(SystemExit, match="--iters"):
        study.override(copy.deepcopy(study.PRESETS["cpu"]), study.parse_args(["--fractions", "0.5"]))
    with pytest.raises(SystemExit, match="--pre-steps"):
        study.override(copy.deepcopy(study.PRESETS["cpu"]), study.parse_args(["--pre-steps", "0"]))
