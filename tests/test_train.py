"""train.py in process, no full run: a failed checkpoint write, the finite checks, proposal shards, bad inputs, the
--rpn-views / --min-visible flags, LARS and the lr schedule, the batch on the device (data.to_device), --compile's
flags and the one-graph capture. End-to-end runs, resume, torchrun and the cross-process checks: test_train_runs.py.
tiny_args and load are shared from here (test_train_runs.py, test_color_device.py); the pool fixture: conftest.py."""
import pytest
import torch

import compile_step
import data
import lars
import ss_proposals
import train
from test_model import views_and_boxes  # (B, K, size) -> three views and their K boxes


def tiny_args(pool, out, *extra):
    images, proposals = pool
    return ["--data", str(images), "--proposals", str(proposals), "--out", str(out), "--depth", "18",
            "--size", "64", "--small-size", "32", "--batch-size", "2", "--epochs", "1", "--workers", "0",
            "--log-every", "1", *extra]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    """A full disk mid-write (torch.save raises after writing part of the file): the last checkpoint survives, the
    partial temp file is removed, and the error names the file."""
    path = tmp_path / "checkpoint.pth"
    train.save_atomic({"step": 2, "w": torch.ones(3)}, path)
    real = torch.save

    def disk_full(obj, f, *a, **k):
        f.write(b"PK\x03\x04 partial")
        raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="checkpoint.pth.*previous one is kept"):
        train.save_atomic({"step": 4, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real)
    assert load(path)["step"] == 2 and torch.equal(load(path)["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"]


def test_proposal_shards_by_glob(pool, tmp_path):
    """--proposals takes a glob (the shards of selective_search.py --shard i/n)."""
    images, proposals = pool
    args, _ = train.resolve_args(train.parse_args(tiny_args((images, proposals.parent / "proposal*.npz"), tmp_path)))
    assert len(train.build_data(args)) == 8


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    ok, bad = torch.zeros((), dtype=torch.bool), torch.ones((), dtype=torch.bool)
    train.check_finite(ok, 3, 2, tmp_path, tensors=[torch.ones(4), torch.zeros(2, 2)])
    for flag, tensors in ((bad, None), (ok, [torch.ones(4), torch.tensor([1.0, float("nan")])]),
                          (ok, [torch.tensor([float("inf")])])):
        with pytest.raises(FloatingPointError, match="step 2.*left intact"):
            train.check_finite(flag, 3, 2, tmp_path, tensors=tensors)


@pytest.mark.parametrize("mode", train.model_lib.MODES)
def test_compile_model_is_one_graph_without_recompiles(mode):
    """compile_step.compile_model: Dynamo captures the whole forward of a step as one graph in every mode, and three
    steps reuse it (no graph break from a host read, no recompile from the anchor cache). A host read added to the
    step fails this."""
    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(0)
    net = train.model_lib.ADePT(mode, depth=18, fpn_channels=32)
    counter = CompileCounter()
    real = torch.nn.Module.compile
    torch._dynamo.reset()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.nn.Module, "compile", lambda self, *a, **k: real(self, *a, backend=counter, **k))
            compile_step.compile_model(net)
        views, boxes = views_and_boxes(size=64)
        for _ in range(3):
            net(views, boxes)["loss"].backward()
        assert counter.frame_count == 1
    finally:
        torch._dynamo.reset()


def test_bad_inputs_fail_before_training(pool, tmp_path):
    images, proposals = pool
    with pytest.raises(SystemExit, match="missing.npz"):
        train.main(tiny_args((images, tmp_path / "missing.npz"), tmp_path))
    with pytest.raises(SystemExit, match="--proposals"):
        train.main(["--data", str(images), "--out", str(tmp_path)])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match=r"^error: .*empty: no images"):  # one line (runtime.bad_input_exits)
        train.main(tiny_args((empty, proposals), tmp_path))
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.png").write_bytes((images / next(iter(ss_proposals.load_proposals(proposals)))).read_bytes())
    with pytest.raises(SystemExit, match=r"^error: .*no proposals for 1 of 1 images"):
        train.main(tiny_args((other, proposals), tmp_path))
    for bad in ("0,1", "1,1", "v1", ""):
        with pytest.raises(SystemExit, match="--rpn-views"):
            train.main(tiny_args(pool, tmp_path, "--rpn-views", bad))
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "checkpoint.pth").write_bytes(b"PK\x03\x04 cut short by a crash")
    with pytest.raises(SystemExit, match="ck/checkpoint.pth: cannot be read"):
        train.main(tiny_args(pool, tmp_path / "ck"))


def test_rpn_views_and_data_flags_reach_model_and_data(pool, tmp_path):
    args, _ = train.resolve_args(train.parse_args(tiny_args(pool, tmp_path, "--rpn-views", "3,1",
                                                            "--min-visible", "0.8", "--v2-ratio", "1,1",
                                                            "--no-box-jitter", "--ignore-border-anchors")))
    net = train.build_model(args, torch.device("cpu"))
    assert net.rpn_views == (1, 3) and net.ignore_border_anchors
    assert "ignore_border_anchors" in train.RESUME_KEYS
    ds = train.build_data(args)
    assert (ds.min_visible, ds.ratio, ds.jitter) == (0.8, (1.0, 1.0), False)
    args, _ = train.resolve_args(train.parse_args(tiny_args(pool, tmp_path)))
    assert train.build_model(args, torch.device("cpu")).rpn_views == (1, 2, 3)  # 3: all views feed the RPN
    ds = train.build_data(args)
    assert (ds.min_visible, ds.ratio, ds.jitter) == (0.5, (3 / 4, 4 / 3), True)  # SoCo's crop ratio and box jitter


def test_v2_ratio_flag(capsys):
    assert train.parse_args(["--v2-ratio", "0.75,4/3"]).v2_ratio == train.parse_args([]).v2_ratio == (0.75, 4 / 3)
    assert train.parse_args(["--v2-ratio", "0.5,2"]).v2_ratio == (0.5, 2.0)
    for bad in ("1", "4/3,3/4", "0,1", "a,b", "1/0,1", "1,2,3"):
        with pytest.raises(SystemExit):
            train.parse_args(["--v2-ratio", bad])
        assert "--v2-ratio: expected LO,HI" in capsys.readouterr().err


def test_lars_excludes_biases_and_norms_from_trust_and_decay():
    w = torch.nn.Parameter(torch.full((2, 2), 2.0))  # |w| = 4
    b = torch.nn.Parameter(torch.ones(2))
    w.grad, b.grad = torch.full((2, 2), 1.0), torch.full((2,), 1.0)
    opt = lars.LARS([{"params": [w]}, {"params": [b], "lars": False, "weight_decay": 0.0}], lr=1.0,
                     weight_decay=0.5, trust_coefficient=0.001)
    opt.step()
    d = 1.0 + 0.5 * 2.0  # grad + wd * w, per entry; |d| = 4
    assert torch.allclose(w, torch.full((2, 2), 2.0 - d * 0.001 * 4.0 / 4.0))
    assert torch.allclose(b, torch.zeros(2))  # plain SGD step of lr * grad


def test_lars_foreach_step_matches_the_per_parameter_equation():
    """Two steps on mixed shapes, a zero weight (trust 1) and a parameter without gradient (untouched)."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.zeros(2, 2)),
          torch.nn.Parameter(torch.randn(5, 1, 2)), torch.nn.Parameter(torch.randn(4))]
    frozen = torch.nn.Parameter(torch.randn(2, 2))
    ref = [p.detach().clone() for p in ps]
    bufs = [torch.zeros_like(p) for p in ps]
    opt = lars.LARS([{"params": ps[:3] + [frozen]}, {"params": ps[3:], "lars": False, "weight_decay": 0.0}],
                     lr=0.5, momentum=0.9, weight_decay=0.1, trust_coefficient=0.01)
    frozen_before = frozen.detach().clone()
    for _ in range(2):
        grads = [torch.randn_like(p) for p in ps]
        for p, g in zip(ps, grads):
            p.grad = g
        opt.step()
        for i, g in enumerate(grads):  # the equation in LARS's docstring, one parameter at a time
            d = g + 0.1 * ref[i] if i < 3 else g
            if i < 3 and ref[i].norm() > 0 and d.norm() > 0:
                d = d * 0.01 * ref[i].norm() / (d.norm() + 1e-8)
            bufs[i] = 0.9 * bufs[i] + d
            ref[i] = ref[i] - 0.5 * bufs[i]
    for p, r in zip(ps, ref):
        torch.testing.assert_close(p.detach(), r)
    assert torch.equal(frozen, frozen_before)


def test_lars_step_launches_a_constant_number_of_ops():
    # Issue 7 (fast path): after the first step (momentum buffers created), a step is a fixed handful of foreach ops
    # whatever the number of parameters (each op is a kernel launch on a GPU; it used to allocate a zeros_like per
    # parameter every step).
    from sync_ops import SyncOpCounter

    counts = []
    for n_params in (10, 200):
        ps = [torch.nn.Parameter(torch.randn(3, 3)) for _ in range(n_params)]
        opt = lars.LARS([{"params": ps}], lr=0.1)
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
        with SyncOpCounter() as counter:
            opt.step()
        counts.append(counter.ops)
    assert counts[0] == counts[1] < 30, counts


def test_lr_schedule():
    assert train.lr_at(0, 100, 10, 1.0) == pytest.approx(0.01)
    assert train.lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert train.lr_at(100, 100, 10, 1.0) == pytest.approx(0.0, abs=1e-12)
    assert train.lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert train.lr_at(5, 100, 10, 1.0) == pytest.approx(0.505)  # half-way up the warm-up: 0.01 + 0.99 x 5 / 10


def test_lars_param_groups_exclude_biases_and_norms():
    """lars.param_groups: conv / linear weights get LARS and weight decay; biases and norm parameters (1-D) get
    neither; frozen parameters are in no group."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1))
    net[2].requires_grad_(False)
    names = {id(p): name for name, p in net.named_parameters()}
    groups = lars.param_groups(net)
    assert [[names[id(p)] for p in g["params"]] for g in groups] == [["0.weight"], ["0.bias", "1.weight", "1.bias"]]
    assert groups[1].get("lars") is False and groups[1].get("weight_decay") == 0.0
    lars_group, plain = lars.LARS(groups, lr=0.1, weight_decay=1e-5).param_groups  # the defaults fill unset keys
    assert lars_group["lars"] is True and lars_group["weight_decay"] == 1e-5
    assert plain["lars"] is False and plain["weight_decay"] == 0.0


def test_to_device_boxes_for_the_rpn_and_the_head():
    """data.to_device: L_det's boxes are b1, b2, b3 (V1's jittered as SoCo's); Eq. 1's pseudo ground truth is r1, b2,
    b3 (V1's selective-search boxes before the jitter); no r1 in the batch: rpn_boxes None (the model takes boxes).
    The views are the colour function's output, normalised; without t1 the transforms are None."""
    g = torch.Generator().manual_seed(0)
    views = {f"v{j}": torch.randint(0, 256, (2, 3, s, s), dtype=torch.uint8, generator=g)
             for j, s in ((1, 8), (2, 8), (3, 4))}
    boxes = {k: torch.rand(2, 3, 4, generator=g) * 8 for k in ("b1", "b2", "b3", "r1")}
    extra = {**{f"t{j}": torch.rand(2, 4, generator=g) for j in (1, 2, 3)},
             **{f"c{j}": torch.full((2, 12), float(j)) for j in (1, 2, 3)}}
    calls = []

    def invert(v, params):  # a stand-in colour: records its parameters
        calls.append(params)
        return 255 - v

    cpu = torch.device("cpu")
    out_views, out_boxes, transforms, rpn_boxes = data.to_device({**views, **boxes, **extra}, cpu, False, invert)
    for j in (1, 2, 3):
        assert torch.equal(out_boxes[j - 1], boxes[f"b{j}"]) and torch.equal(transforms[j - 1], extra[f"t{j}"])
        assert torch.equal(calls[j - 1], extra[f"c{j}"])
        torch.testing.assert_close(out_views[j - 1], data.normalize(255 - views[f"v{j}"]))
    assert len(calls) == 3
    assert [torch.equal(a, b) for a, b in zip(rpn_boxes, (boxes["r1"], boxes["b2"], boxes["b3"]))] == [True] * 3
    assert not torch.equal(rpn_boxes[0], out_boxes[0])
    no_r1 = {k: v for k, v in boxes.items() if k != "r1"}
    out_views, out_boxes, transforms, rpn_boxes = data.to_device({**views, **no_r1}, cpu, False)  # no r1, t1, colour
    assert rpn_boxes is None and transforms is None
    assert all(torch.equal(a, b) for a, b in zip(out_boxes, (boxes["b1"], boxes["b2"], boxes["b3"])))
    for j in (1, 2, 3):
        torch.testing.assert_close(out_views[j - 1], data.normalize(views[f"v{j}"]))


@pytest.mark.parametrize("flags, expected", [
    (["--compile", "model", "--compile-mode", "reduce-overhead"], [("ADePT", "reduce-overhead")]),
    (["--compile", "--compile-mode", "max-autotune-no-cudagraphs"],
     [("FeatureExtractor", "max-autotune-no-cudagraphs")] * 2),
    (["--compile", "model"], [("ADePT", None)]),
])
def test_compile_flags_reach_torch_compile(monkeypatch, flags, expected):
    """--compile SCOPE --compile-mode MODE: which modules train.build_model compiles, and with which mode (recorded,
    not compiled: CUDA graphs need a GPU)."""
    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **k: calls.append((type(self).__name__, k["mode"])))
    args, _ = train.resolve_args(train.parse_args(["--depth", "18", *flags]))
    train.build_model(args, torch.device("cpu"))
    assert calls == expected


@pytest.mark.parametrize("flags, message", [
    (["--compile-mode", "default"], "--compile-mode default needs --compile"),
    (["--compile", "--compile-mode", "reduce-overhead"], "(CUDA graphs) needs --compile model"),
    (["--compile", "extractors", "--compile-mode", "max-autotune"], "(CUDA graphs) needs --compile model"),
])
def test_compile_mode_without_its_scope_is_refused(capsys, flags, message):
    with pytest.raises(SystemExit):
        train.parse_args(flags)
    assert message in capsys.readouterr().err
