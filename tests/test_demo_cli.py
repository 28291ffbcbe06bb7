"""The packaged demo model and the `fastdiff` command line: the assets load and stay small,
sampling is deterministic, the samples are digits (by the packaged classifier), the CLI writes
valid PNGs, and bad arguments give clear errors."""
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

from fastdiff import cli, demo


def _decode_png(data: bytes) -> np.ndarray:
    """A minimal independent PNG decoder for 8-bit greyscale, non-interlaced images (all five
    row filters), used to check what the writers produce."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "bad PNG signature"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF, f"bad CRC in {tag!r}"
        if tag == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif tag == b"IDAT":
            idat += body
        pos += 12 + length
    w, h, depth, color, _, _, interlace = header
    assert (depth, color, interlace) == (8, 0, 0), header
    raw = zlib.decompress(idat)
    out = np.zeros((h, w), dtype=np.int64)
    prev = np.zeros(w, dtype=np.int64)
    for r in range(h):
        f, line = raw[r * (w + 1)], np.frombuffer(raw[r * (w + 1) + 1:(r + 1) * (w + 1)], dtype=np.uint8).astype(np.int64)
        cur = np.zeros(w, dtype=np.int64)
        for c in range(w):
            a = cur[c - 1] if c else 0
            b = prev[c]
            cc = prev[c - 1] if c else 0
            if f == 0:
                pred = 0
            elif f == 1:
                pred = a
            elif f == 2:
                pred = b
            elif f == 3:
                pred = (a + b) // 2
            else:
                p = a + b - cc
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - cc)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else cc)
            cur[c] = (line[c] + pred) % 256
        out[r], prev = cur, cur
    return out.astype(np.uint8)


def test_assets_load_and_are_small():
    total = 0
    for name in demo.ASSET_NAMES:
        path = demo.asset_path(name)
        assert os.path.exists(path), f"{path} is missing (scripts/train_demo.py)"
        total += os.path.getsize(path)
        model, info, _ = demo.load_asset(name)
        n_params = sum(p.numel() for p in model.parameters())
        assert 0 < n_params <= 500_000, (name, n_params)
    assert total < 5 * 2**20, f"the demo assets take {total} bytes, over 5 MiB"


def test_pure_python_png_writer_roundtrip():
    img = np.random.default_rng(0).integers(0, 256, size=(7, 13), dtype=np.uint8)
    assert np.array_equal(_decode_png(demo.png_bytes(img)), img)
    with pytest.raises(ValueError, match="uint8 \\[H, W\\]"):
        demo.write_png("x.png", img.astype(np.float32))


def test_image_grid_layout():
    x = torch.linspace(-1, 1, 5 * 64).reshape(5, 1, 8, 8)
    grid = demo.image_grid(x, nrow=3, scale=2, pad=1)
    assert grid.shape == (2 * 17 + 1, 3 * 17 + 1) and grid.dtype == np.uint8
    want = ((x[4, 0] + 1) * 127.5).round().to(torch.uint8).numpy().repeat(2, 0).repeat(2, 1)
    assert np.array_equal(grid[18:34, 18:34], want)  # image 4: row 1, column 1
    assert grid[0].max() == 0  # padding
    with pytest.raises(ValueError, match="\\[B, 1, H, W\\]"):
        demo.image_grid(torch.zeros(2, 3, 8, 8))


@pytest.mark.parametrize("sampler, steps", [("ddim", 6), ("ocm-ddpm", 5), ("student", 2), ("consistency", 2),
                                           ("dpmpp-2m", 5), ("unipc", 6), ("euler", 5)])
def test_demo_sampling_is_deterministic(sampler, steps):
    a = demo.sample(sampler, steps, 6, seed=3)
    b = demo.sample(sampler, steps, 6, seed=3)
    c = demo.sample(sampler, steps, 6, seed=4)
    assert a.shape == (6, 1, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert float(a.abs().max()) <= 1.0 + 1e-6  # x0_hat is clipped to the data range
    # Splitting the batch by sample_offset gives the same digits.
    model, s = demo.make_demo_sampler(sampler, steps)
    with torch.no_grad():
        tail = s.sample(model, (2, 1, 8, 8), seed=3, sample_offset=4)
    assert torch.allclose(tail, a[4:], rtol=0, atol=1e-5)


def test_samples_are_recognisable_digits():
    """The packaged classifier is confident on the demo's samples, as on real digits, and the
    samples cover most classes."""
    clf = demo.load("demo_classifier")[0]
    x = demo.sample("ddim", 10, 100, seed=0)
    with torch.no_grad():
        prob = torch.softmax(clf(x), dim=1)
    conf = prob.max(1).values
    classes = prob.argmax(1).bincount(minlength=10)
    assert float(conf.mean()) > 0.8, float(conf.mean())
    assert int((classes > 0).sum()) >= 8, classes.tolist()


def _run_cli(args, capsys):
    code = cli.main(args)
    return code, capsys.readouterr()


def test_cli_sample_writes_png(tmp_path, capsys):
    out = tmp_path / "digits.png"
    code, cap = _run_cli(["sample", "--sampler", "ocm-ddpm", "--steps", "10", "--n", "12", "--nrow", "4",
                          "--scale", "3", "--out", str(out)], capsys)
    assert code == 0 and "wrote" in cap.out
    img = _decode_png(out.read_bytes())
    assert img.shape == (3 * 25 + 1, 4 * 25 + 1)
    assert img.max() > 200 and img[0].max() == 0  # ink on the digits, black padding
    # The same samples as the library call.
    want = demo.image_grid(demo.sample("ocm-ddpm", 10, 12, seed=0), nrow=4, scale=3)
    assert np.array_equal(img, want)


def test_cli_sample_without_pil_uses_the_builtin_writer(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)  # `from PIL import Image` raises ImportError
    out = tmp_path / "d.png"
    code, _ = _run_cli(["sample", "--sampler", "student", "--steps", "2", "--n", "4", "--out", str(out)], capsys)
    assert code == 0
    img = _decode_png(out.read_bytes())
    assert img.shape == (2 * 33 + 1, 2 * 33 + 1)


def test_cli_info_and_bench(capsys):
    code, cap = _run_cli(["info"], capsys)
    assert code == 0 and "triton" in cap.out and "backend" in cap.out
    code, cap = _run_cli(["bench", "--device", "cpu", "--shape", "3x5x7", "--repeat", "2"], capsys)
    assert code == 0
    assert "(3, 5, 7)" in cap.out and "fused ms" in cap.out and "eager ms" in cap.out


def test_console_entry_point_runs():
    res = subprocess.run([sys.executable, "-m", "fastdiff.cli", "info"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("fastdiff ")


@pytest.mark.parametrize("args, message", [
    (["sample", "--steps", "0"], "--steps must be in [1, 1000], got 0"),
    (["sample", "--steps", "ten"], "--steps must be an integer"),
    (["sample", "--sampler", "heun"], "invalid choice: 'heun'"),
    (["sample", "--sampler", "student", "--steps", "3"], "trained for [2, 4] steps only, got steps=3"),
    (["sample", "--eta", "-1"], "--eta must be a finite number >= 0"),
    (["sample", "--sampler", "ddpm", "--eta", "0.5"], "eta applies to the DDIM samplers only"),
    (["sample", "--out", "digits.jpg"], "--out must name a .png file"),
    (["sample", "--n", "0"], "--n must be in [1, 4096]"),
    (["sample", "--out", "/nonexistent-dir/x.png", "--n", "1", "--steps", "1"], "does not exist"),
    (["bench", "--shape", "4x0"], "--shape must have 1 to 4 positive sizes"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "the following arguments are required"),
])
def test_bad_arguments_exit_2_with_a_clear_message(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.gpu
def test_cuda_sampling_matches_cpu():
    """The fused Triton step on the GPU draws the same digits as the CPU reference path (same
    Philox noise; the UNet's fp32 arithmetic differs slightly between devices)."""
    cpu = demo.sample("ocm-ddpm", 10, 16, seed=5)
    gpu = demo.sample("ocm-ddpm", 10, 16, seed=5, device="cuda").cpu()
    assert (gpu - cpu).abs().max() < 2e-2


def test_bench_full_outside_a_checkout_says_why(monkeypatch, capsys):
    real_exists = os.path.exists
    monkeypatch.setattr(os.path, "exists", lambda p: False if str(p).endswith("bench_step.py") else real_exists(p))
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--full"])
    assert exc.value.code == 2
    assert "runs benchmarks/bench_step.py from the fastdiff source tree" in capsys.readouterr().err


def test_usage_errors_are_found_before_sampling(monkeypatch, capsys):
    """A bad --out directory or an unusable --backend is reported before any sampling work, as
    a usage error (exit 2), not a traceback."""
    from fastdiff import demo
    from fastdiff.engine import backend

    def no_sampling(*a, **k):
        raise AssertionError("sampled before checking the arguments")

    monkeypatch.setattr(demo, "sample", no_sampling)
    with pytest.raises(SystemExit) as exc:
        cli.main(["sample", "--out", "/nonexistent-dir/x.png", "--steps", "1000"])
    assert exc.value.code == 2 and "does not exist" in capsys.readouterr().err
    monkeypatch.setattr(backend, "interpreting", lambda: False)
    with pytest.raises(SystemExit) as exc:
        cli.main(["sample", "--device", "cpu", "--backend", "triton"])
    assert exc.value.code == 2 and "needs CUDA tensors" in capsys.readouterr().err
