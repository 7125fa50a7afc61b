"""color_device.py: the colour augmentation on the device against torchvision's ops and the loader's OpenCV path;
the dataset's color_on="device" items; no host sync; one training step with --color-on device."""
import colorsys
import json

import cv2
import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

import augment
import color_device as cd
import data
import synthetic
import train
from test_data import write_images
from test_train import tiny_args  # the pool fixture is in tests/conftest.py

NO = augment.NO_COLOR


def scenes(n: int = 6, size: int = 64, seed: int = 0) -> np.ndarray:
    """(n, size, size, 3) uint8: synthetic scenes (flat colours, edges), slightly blurred like resized photos."""
    rng = np.random.default_rng(seed)
    return np.stack([cv2.GaussianBlur(synthetic.synthetic_scene(rng, (size, size), min_side=10)[0], (0, 0), 1.0)
                     for _ in range(n)])


def on_device(x: np.ndarray, params) -> np.ndarray:
    """(B, H, W, 3) uint8, params (B, P) or one row -> color_batch's output as int (B, H, W, 3)."""
    p = torch.tensor(params, dtype=torch.float32).expand(len(x), -1) if np.ndim(params) == 1 else torch.tensor(params)
    return cd.color_batch(torch.from_numpy(x).permute(0, 3, 1, 2), p).permute(0, 2, 3, 1).numpy().astype(int)


def jitter_only(op: int, f: float) -> list:
    """Parameters that apply only COLOR_OPS[op] with factor f (the others at their identity: hue 0 is exact here)."""
    p = list(NO)
    p[0], p[1 + op], p[5:9] = 1.0, f, [op] + [k for k in range(4) if k != op]
    return p


def test_no_color_is_the_identity_and_the_output_is_uint8():
    x = scenes(3)
    out = cd.color_batch(torch.from_numpy(x).permute(0, 3, 1, 2), torch.tensor([NO] * 3))
    assert out.dtype == torch.uint8 and out.shape == (3, 3, 64, 64)
    assert np.array_equal(out.permute(0, 2, 3, 1).numpy(), x)
    cl = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    g = augment.Draws(torch.Generator().manual_seed(2))
    params = torch.tensor([augment.draw_color(g, 1.0, 0.5) for _ in range(3)])
    out = cd.color_batch(cl, params)  # the input's memory format is kept (train.py --channels-last)
    assert out.is_contiguous(memory_format=torch.channels_last)
    plain = cd.color_batch(cl.contiguous(), params)
    assert plain.is_contiguous() and torch.equal(out, plain)
    with torch.autocast("cpu", torch.bfloat16):  # float32 inside whatever the caller's autocast
        assert torch.equal(cd.color_batch(cl, params), out)
    with pytest.raises(ValueError, match="6 px|sides"):
        cd.color_batch(torch.zeros(1, 3, 6, 20, dtype=torch.uint8), torch.tensor([NO]))


@pytest.mark.parametrize("op, f, tv_op", [(0, 1.35, TF.adjust_brightness), (0, 0.65, TF.adjust_brightness),
                                          (1, 1.35, TF.adjust_contrast), (1, 0.65, TF.adjust_contrast),
                                          (2, 1.18, TF.adjust_saturation), (2, 0.82, TF.adjust_saturation),
                                          (3, 0.08, TF.adjust_hue), (3, -0.06, TF.adjust_hue)])
def test_each_jitter_op_matches_torchvision_and_the_loader(op, f, tv_op):
    x = scenes()
    ours = on_device(x, jitter_only(op, f))
    ref = np.stack([tv_op(torch.from_numpy(v).permute(2, 0, 1), f).permute(1, 2, 0).numpy() for v in x]).astype(int)
    assert np.abs(ours - ref).max() <= 1  # torchvision truncates where we round
    assert np.abs(ours - x).max() > 5  # the operation did something
    cpu_op = (augment._brightness, augment._contrast, augment._saturation, augment._hue)[op]  # the loader's op alone
    cpu = np.stack([cpu_op(v, f) for v in x]).astype(int)
    if op < 2:  # brightness, contrast: the loader's OpenCV arithmetic exactly
        assert np.array_equal(ours, cpu)
    elif op == 2:  # saturation: within one level
        assert np.abs(ours - cpu).max() <= 1
    else:  # the loader's hue has 256 steps per turn and 8-bit S: a few levels off (torchvision: <= 1 from ours)
        assert np.abs(ours - cpu).max() <= 12 and np.abs(ours - cpu).mean() < 1.0


def test_gray_blur_solarize_match_the_loader():
    x = scenes()
    for sigma in (0.1, 0.4, 1.0, 1.7, 2.0):
        p = NO[:10] + [sigma, 0.0]
        cpu = np.stack([augment.apply_color(v, p) for v in x]).astype(int)
        assert np.abs(on_device(x, p) - cpu).max() <= 1, sigma
    gray = NO[:9] + [1.0, 0.0, 0.0]
    assert np.abs(on_device(x, gray) - np.stack([augment.apply_color(v, gray) for v in x])).max() <= 1
    solar = NO[:11] + [1.0]
    assert np.array_equal(on_device(x, solar), np.stack([augment.apply_color(v, solar) for v in x]))


def test_gaussian_taps_are_opencvs_kernel():
    sigma = torch.tensor([0.0, 0.1, 0.3, 0.9, 1.5, 2.0], dtype=torch.float64)
    taps = cd.gaussian_taps(sigma)
    assert taps.shape == (6, 2 * cd.MAX_RADIUS + 1)
    for s, t in zip(sigma.tolist(), taps):
        r = int(round(3 * s))
        ref = np.zeros(2 * cd.MAX_RADIUS + 1)
        ref[cd.MAX_RADIUS - r: cd.MAX_RADIUS + r + 1] = cv2.getGaussianKernel(2 * r + 1, s)[:, 0] if s else 1.0
        assert np.allclose(t.numpy(), ref, atol=1e-12), s


def test_hsv_round_trip_and_hand_values():
    px = [(1.0, 0.0, 0.0), (0.0, 0.5, 1.0), (0.2, 0.2, 0.2), (0.9, 0.7, 0.1), (0.0, 0.0, 0.0), (0.3, 0.6, 0.45)]
    x = torch.tensor(px).T.reshape(1, 3, 1, len(px))
    hsv = cd.rgb_to_hsv(x)
    for j, rgb in enumerate(px):
        assert torch.allclose(hsv[0, :, 0, j], torch.tensor(colorsys.rgb_to_hsv(*rgb), dtype=torch.float32), atol=1e-6)
    assert torch.allclose(cd.hsv_to_rgb(hsv), x, atol=1e-6)
    rnd = torch.rand(2, 3, 7, 9, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(cd.hsv_to_rgb(cd.rgb_to_hsv(rnd)), rnd, atol=1e-5)


def sequential(x: torch.Tensor, p: list) -> torch.Tensor:
    """One view (3, H, W) float, its parameters: the jitter applied one operation after another in p's order, with the
    module's own single-operation steps (what the batched split around the hue must reproduce)."""
    y = x[None]
    if p[0]:
        for op in p[5:9]:
            y = cd.color_batch(y.to(torch.uint8), torch.tensor([jitter_only(int(op), p[1 + int(op)])])).float()
    rest = NO[:9] + p[9:]
    return cd.color_batch(y.to(torch.uint8), torch.tensor([rest]))[0]


def test_per_view_order_in_one_batch_equals_one_view_at_a_time():
    x = torch.from_numpy(scenes(8)).permute(0, 3, 1, 2)
    g = augment.Draws(torch.Generator().manual_seed(3))
    params = [augment.draw_color(g, 0.5, 0.5, jitter_p=1.0) for _ in range(8)]
    params[5][0] = 0.0  # one view without jitter
    assert len({tuple(p[5:9]) for p in params}) >= 4  # several orders in the batch
    batch = cd.color_batch(x, torch.tensor(params)).int()
    seq = torch.stack([sequential(v.float(), p) for v, p in zip(x, params)]).int()
    assert (batch - seq).abs().max() <= 1 and ((batch - seq).abs() > 0).float().mean() < 1e-3
    # the order matters: applying each view's operations in reverse order gives other pixels
    rev = [p[:5] + p[5:9][::-1] + p[9:] for p in params]
    assert (cd.color_batch(x, torch.tensor(rev)).int() - seq).abs().max() > 5


def test_random_parameters_agree_with_the_loader_path():
    x = scenes(24, seed=1)
    g = augment.Draws(torch.Generator().manual_seed(0))
    params = [augment.draw_color(g, 0.5, 0.2) for _ in range(len(x))]
    cpu = np.stack([augment.apply_color(v, p) for v, p in zip(x, params)]).astype(int)
    diff = np.abs(on_device(x, params) - cpu)
    assert diff.mean() < 0.5 and np.percentile(diff, 99.9) <= 8, (diff.mean(), diff.max())


def test_dataset_device_mode_draws_the_same_and_leaves_the_pixels(tmp_path):
    props = write_images(tmp_path, 4, seed=2)
    kw = dict(K=3, seed=5, size=48, small_size=24)
    loader, device = data.PretrainDataset(tmp_path, props, **kw), data.PretrainDataset(tmp_path, props, **kw,
                                                                                        color_on="device")
    plain = data.PretrainDataset(tmp_path, props, **kw, color=False)
    for i in range(len(loader)):
        a, b, c = loader[(1, i)], device[(1, i)], plain[(1, i)]
        for k in (1, 2, 3):
            assert torch.equal(a[f"b{k}"], b[f"b{k}"]) and torch.equal(a[f"t{k}"], b[f"t{k}"])
            assert torch.equal(a[f"c{k}"], b[f"c{k}"]) and a[f"c{k}"].shape == (len(augment.COLOR_FIELDS),)
            assert torch.equal(b[f"v{k}"], c[f"v{k}"])  # device mode: the pixels before colour
            assert torch.equal(c[f"c{k}"], torch.tensor(NO))
            params = [float(v) for v in a[f"c{k}"]]  # what the loader applied (rounded to float32 here)
            redo = augment.apply_color(np.ascontiguousarray(b[f"v{k}"].permute(1, 2, 0).numpy()), params)
            assert np.abs(redo.astype(int) - a[f"v{k}"].permute(1, 2, 0).numpy()).max() <= 1
    with pytest.raises(ValueError, match="color_on"):
        data.PretrainDataset(tmp_path, props, color_on="gpu")


def test_color_batch_has_no_host_sync():
    from sync_ops import SyncOpCounter

    x = torch.from_numpy(scenes(4)).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    g = augment.Draws(torch.Generator().manual_seed(1))
    params = torch.tensor([augment.draw_color(g, 1.0, 0.5) for _ in range(4)])
    cd.color_batch(x, params)  # the per-device constants are made once, outside the step
    with SyncOpCounter() as counter:
        cd.color_batch(x, params)
    assert counter.counts == {}


def test_one_step_with_colour_on_the_device(pool, tmp_path, monkeypatch):
    """--color-on device: train_step colours each of the batch's 3 views with color_batch and that view's c1..c3
    parameters (recorded through train.color_fn and train.train_step)."""
    calls, batches = [], []
    real_color_fn, real_step = train.color_fn, train.train_step

    def recording_color_fn(args):
        fn = real_color_fn(args)
        assert fn is cd.color_batch

        def recording(views, params):
            calls.append((views, params))
            return fn(views, params)
        return recording

    def recording_step(ddp, net, opt, batch, *a, **k):
        batches.append(batch)
        return real_step(ddp, net, opt, batch, *a, **k)

    monkeypatch.setattr(train, "color_fn", recording_color_fn)
    monkeypatch.setattr(train, "train_step", recording_step)
    train.main(tiny_args(pool, tmp_path, "--color-on", "device", "--max-steps", "1"))
    rec = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert rec["step"] == 1 and np.isfinite(rec["loss"]) and rec["loss_rpn"] > 0
    assert len(batches) == 1 and len(calls) == 3  # one step: the three views, once each
    batch = batches[0]
    for j, (views, params) in enumerate(calls, 1):
        assert torch.equal(views, batch[f"v{j}"]) and torch.equal(params, batch[f"c{j}"]), j
    assert any((batch[f"c{j}"] != torch.tensor(NO)).any() for j in (1, 2, 3))  # the draws colour something


def test_train_colour_function_and_its_compiled_form(monkeypatch):
    """train.color_fn: None with the colour in the loader, color_batch with --color-on device, torch.compile'd with
    --compile (here with the aot_eager backend: the same capture, no code generation; the same values)."""
    assert train.color_fn(train.parse_args([])) is None
    assert train.color_fn(train.parse_args(["--color-on", "device"])) is cd.color_batch
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend="aot_eager", **kw))
    torch._dynamo.reset()
    try:
        fn = train.color_fn(train.parse_args(["--color-on", "device", "--compile"]))
        assert fn is not cd.color_batch
        x = torch.from_numpy(scenes(4)).permute(0, 3, 1, 2)
        g = augment.Draws(torch.Generator().manual_seed(4))
        params = torch.tensor([augment.draw_color(g, 0.5, 0.5) for _ in range(4)])
        assert torch.equal(fn(x, params), cd.color_batch(x, params))
    finally:
        torch._dynamo.reset()
