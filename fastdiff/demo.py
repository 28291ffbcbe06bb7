"""The embedded demo: a small UNet trained on scikit-learn's 8x8 handwritten digits, shipped as
safetensors in ``fastdiff/assets`` so that ``fastdiff sample`` draws something real with no
download.

Assets (each a safetensors file whose metadata holds the JSON config needed to rebuild it):

* ``demo_unet``        the diffusion model, v-prediction on a cosine schedule (1000 steps);
* ``demo_student``, ``demo_student4``  its progressive-distillation students (``fastdiff.training.distill``)
  for 2 and 4 DDIM steps;
* ``demo_consistency`` a consistency-distilled copy (``fastdiff.training.consistency``);
* ``demo_ocm_head``    a covariance head h(x_t, t) ~ sigma_t^2 diag Hessian of log p_t (OCM);
* ``demo_classifier``  a digits classifier whose penultimate features give a Frechet distance,
  with the feature statistics of the real digits stored beside it.

The data (``load_digits``) needs scikit-learn, which is only used to train and to evaluate;
loading and sampling need torch and safetensors only.
"""
from __future__ import annotations

import json
import math
import os
import struct
import zlib
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
ASSET_NAMES = ("demo_unet", "demo_student", "demo_student4", "demo_consistency", "demo_ocm_head", "demo_classifier")
IMAGE_SHAPE = (1, 8, 8)

# The teacher's diffusion setup; the students and the head share it.
DEMO_SCHEDULE = {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000}


def demo_schedule():
    from .engine.schedule import Schedule
    return Schedule(**DEMO_SCHEDULE)


# ------------------------------------------------------------------------------------------
# networks


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (Vaswani et al.; as in DDPM). [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class _ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class DemoUNet(nn.Module):
    """A two-resolution UNet (8x8 and 4x4) with sinusoidal timestep embedding.

    ``model(x_t, t)`` with x_t [B, C, 8, 8] (any even size works) and t int [B] returns a tensor of
    x_t's shape (``out_channels`` wide), read as ``prediction_type`` by the samplers. With
    ``channels=(32, 64), emb_dim=64`` it has about 0.37 M parameters; the OCM head uses (16, 32).
    ``out_activation="ocm"`` returns softplus(raw) - 1 >= -1, the range of an OCM head's h
    (Sigma0 = (sigma^2/ab)(1 + h) >= 0).
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, channels=(32, 64), emb_dim: int = 128,
                 groups: int = 8, out_activation: str = "none"):
        super().__init__()
        if out_activation not in ("none", "ocm"):
            raise ValueError(f"out_activation must be 'none' or 'ocm', got {out_activation!r}")
        c1, c2 = (int(c) for c in channels)
        self.config = {"in_channels": in_channels, "out_channels": out_channels, "channels": [c1, c2],
                       "emb_dim": emb_dim, "groups": groups, "out_activation": out_activation}
        self.out_activation = out_activation
        self.emb_dim = emb_dim
        self.emb = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.down1 = _ResBlock(c1, c1, emb_dim, groups)
        self.downsample = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.down2 = _ResBlock(c2, c2, emb_dim, groups)
        self.mid = _ResBlock(c2, c2, emb_dim, groups)
        self.up2 = _ResBlock(2 * c2, c2, emb_dim, groups)
        self.up1 = _ResBlock(c2 + c1, c1, emb_dim, groups)
        self.norm_out = nn.GroupNorm(groups, c1)
        self.conv_out = nn.Conv2d(c1, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.emb(timestep_embedding(t.reshape(-1).expand(x.shape[0]), self.emb_dim).to(x.dtype))
        h1 = self.down1(self.conv_in(x), emb)
        h2 = self.down2(self.downsample(h1), emb)
        h = self.mid(h2, emb)
        h = self.up2(torch.cat([h, h2], dim=1), emb)
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        h = self.up1(torch.cat([h, h1], dim=1), emb)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return F.softplus(out) - 1.0 if self.out_activation == "ocm" else out


class DigitsClassifier(nn.Module):
    """A small CNN for 8x8 digits; ``features(x)`` (64-d, before the last layer) is the space the
    demo's Frechet distance is measured in."""

    def __init__(self, width: int = 32, feature_dim: int = 64):
        super().__init__()
        self.config = {"width": width, "feature_dim": feature_dim}
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * 4, feature_dim), nn.SiLU())
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


_KINDS = {"unet": DemoUNet, "classifier": DigitsClassifier}


# ------------------------------------------------------------------------------------------
# weights


def asset_path(name: str) -> str:
    if name not in ASSET_NAMES:
        raise ValueError(f"unknown demo asset {name!r}: expected one of {ASSET_NAMES}")
    return os.path.join(ASSETS, name + ".safetensors")


def save_asset(path: str, model: nn.Module, kind: str, info: Optional[dict] = None,
               extra: Optional[Dict[str, torch.Tensor]] = None, half: bool = False) -> None:
    """Write ``model``'s weights (fp16 when ``half``, to keep the package small) with its config
    and ``info`` (prediction type, steps, training record) as JSON metadata."""
    from safetensors.torch import save_file

    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {tuple(_KINDS)}, got {kind!r}")
    tensors = {k: (v.detach().half() if half and v.is_floating_point() else v.detach()).contiguous().cpu()
               for k, v in model.state_dict().items()}
    for k, v in (extra or {}).items():
        tensors["extra." + k] = v.detach().contiguous().cpu()
    meta = {"kind": kind, "config": json.dumps(model.config), "info": json.dumps(info or {})}
    save_file(tensors, path, metadata=meta)


def load_asset(name_or_path: str, device="cpu") -> Tuple[nn.Module, dict, Dict[str, torch.Tensor]]:
    """(model in eval mode, float32, on ``device``; info dict; extra tensors) from a packaged asset
    name (``ASSET_NAMES``) or a safetensors path written by ``save_asset``."""
    try:
        from safetensors import safe_open
    except ImportError as exc:  # pragma: no cover - safetensors is a dependency
        raise ImportError("loading the demo weights needs the safetensors package (pip install safetensors)") from exc
    path = name_or_path if name_or_path.endswith(".safetensors") else asset_path(name_or_path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"demo weights {path} are missing: train them with scripts/train_demo.py")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("kind") not in _KINDS:
        raise ValueError(f"{path} is not a fastdiff demo asset (metadata kind={meta.get('kind')!r})")
    model = _KINDS[meta["kind"]](**json.loads(meta["config"]))
    state = {k: v.float() for k, v in tensors.items() if not k.startswith("extra.")}
    extra = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
    model.load_state_dict(state)
    model.to(device).eval().requires_grad_(False)
    return model, json.loads(meta.get("info", "{}")), extra


# ------------------------------------------------------------------------------------------
# data and images


def load_digits(device="cpu") -> Tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 8x8 digits as ([N, 1, 8, 8] float32 in [-1, 1], [N] int64 labels)."""
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as exc:
        raise ImportError("the digits data comes from scikit-learn (pip install scikit-learn); "
                          "it is needed to train or evaluate the demo, not to sample from it") from exc
    d = _load()
    x = torch.tensor(d.images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 8.0 - 1.0
    return x.to(device), torch.tensor(d.target, dtype=torch.int64, device=device)


def grid_shape(n: int, image_hw, nrow: Optional[int] = None, scale: int = 4, pad: int = 1) -> Tuple[int, int]:
    """(height, width) in pixels of ``image_grid`` for ``n`` images of ``image_hw`` pixels."""
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    return rows * (image_hw[0] * scale + pad) + pad, nrow * (image_hw[1] * scale + pad) + pad


def image_grid(images: torch.Tensor, nrow: Optional[int] = None, scale: int = 4, pad: int = 1) -> np.ndarray:
    """[B, 1, H, W] images in [-1, 1] -> a uint8 [rows*(H*scale+pad)+pad, ...] grey grid (nearest upscaling)."""
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"images must be [B, 1, H, W], got {tuple(images.shape)}")
    if scale < 1 or pad < 0:
        raise ValueError(f"scale must be >= 1 and pad >= 0, got scale={scale}, pad={pad}")
    b, _, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(b)))
    img = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()[:, 0]
    img = img.repeat(scale, axis=1).repeat(scale, axis=2)
    hs, ws = h * scale, w * scale
    grid = np.zeros(grid_shape(b, (h, w), nrow, scale, pad), dtype=np.uint8)
    for i in range(b):
        r, c = divmod(i, nrow)
        grid[pad + r * (hs + pad): pad + r * (hs + pad) + hs, pad + c * (ws + pad): pad + c * (ws + pad) + ws] = img[i]
    return grid


def write_png(path: str, image: np.ndarray) -> None:
    """Write a uint8 greyscale [H, W] array as a PNG: with PIL when installed, else a minimal
    writer (8-bit greyscale, filter 0 on every row, one zlib IDAT chunk)."""
    image = np.ascontiguousarray(image)
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"image must be a uint8 [H, W] array, got {image.dtype} {image.shape}")
    try:
        from PIL import Image
    except ImportError:
        Image = None
    if Image is not None:
        Image.fromarray(image, mode="L").save(path, format="PNG")
        return
    with open(path, "wb") as f:
        f.write(png_bytes(image))


def png_bytes(image: np.ndarray) -> bytes:
    """The PNG encoding of a uint8 greyscale [H, W] array, in pure Python (zlib + struct)."""
    h, w = image.shape

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + image[r].tobytes() for r in range(h))
    header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)  # 8-bit, greyscale, deflate, filter 0, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------------
# sampling from the packaged model

DEMO_SAMPLERS = ("ddpm", "ddim", "ocm-ddpm", "ocm-ddim", "student", "consistency", "dpmpp-2m", "unipc", "euler")
STUDENT_ASSETS = {2: "demo_student", 4: "demo_student4"}

_LOADED: Dict[tuple, tuple] = {}


def load(name: str, device="cpu"):
    """``load_asset`` with a per-process cache (the CLI and the benchmarks load each asset once)."""
    key = (name, str(torch.device(device)))
    if key not in _LOADED:
        _LOADED[key] = load_asset(name, device)
    return _LOADED[key]


def make_demo_sampler(sampler: str = "ocm-ddpm", steps: int = 10, *, eta: float = 0.0, device="cpu",
                      backend: Optional[str] = None):
    """(model, fastdiff sampler) for one of ``DEMO_SAMPLERS`` on the packaged weights.

    "ddpm" / "ddim" / "ocm-ddpm" / "ocm-ddim" run the teacher UNet (the OCM ones with the packaged
    covariance head), "student" the progressively distilled student (DDIM with 2 or 4 steps, the
    counts it was trained for) and "consistency" the consistency-distilled model with the
    multistep consistency sampler; "dpmpp-2m", "unipc" and "euler" run the teacher with
    DPM-Solver++(2M), UniPC (bh2, order 2) and Euler in sigma space. x0_hat is clipped to [-1, 1],
    the data range."""
    from .samplers import make_sampler

    if sampler not in DEMO_SAMPLERS:
        raise ValueError(f"unknown demo sampler {sampler!r}: expected one of {DEMO_SAMPLERS}")
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or not 1 <= steps <= 1000:
        raise ValueError(f"steps must be an int in [1, 1000] (the demo schedule has 1000 training steps), got {steps!r}")
    if sampler == "student":
        if steps not in STUDENT_ASSETS:
            raise ValueError(f"the distilled student was trained for {sorted(STUDENT_ASSETS)} steps only, got steps={steps}")
        model, info, _ = load(STUDENT_ASSETS[steps], device)
        s = make_sampler("ddim", DEMO_SCHEDULE, None, timesteps=info["timesteps"],
                         prediction_type=info["prediction_type"], clip_sample=True, backend=backend)
        return model, s
    if sampler == "consistency":
        model, info, _ = load("demo_consistency", device)
        return model, make_sampler("consistency", DEMO_SCHEDULE, int(steps), prediction_type=info["prediction_type"],
                                   clip_sample=True, backend=backend)
    model, info, _ = load("demo_unet", device)
    kw = {"prediction_type": info["prediction_type"], "clip_sample": True, "backend": backend}
    if sampler in ("ddim", "ocm-ddim"):
        kw["eta"] = eta
    elif eta:
        raise ValueError(f"eta applies to the DDIM samplers only, not {sampler!r}")
    if sampler.startswith("ocm"):
        kw["head"] = load("demo_ocm_head", device)[0]
    return model, make_sampler(sampler, DEMO_SCHEDULE, int(steps), **kw)


def sample(sampler: str = "ocm-ddpm", steps: int = 10, n: int = 64, *, seed: int = 0, eta: float = 0.0,
           device="cpu", backend: Optional[str] = None, progress: bool = False) -> torch.Tensor:
    """``n`` digits [n, 1, 8, 8] in [-1, 1] from the packaged demo model (see ``make_demo_sampler``).
    Deterministic in ``seed`` (the noise is Philox, keyed by seed, element and step); ``progress``
    shows a progress bar over the steps."""
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n (the number of samples) must be an int >= 1, got {n!r}")
    model, s = make_demo_sampler(sampler, steps, eta=eta, device=device, backend=backend)
    with torch.no_grad():
        return s.sample(model, (int(n),) + IMAGE_SHAPE, seed=seed, device=device, progress=progress)
