"""Pinned trajectories: every sampler and drop-in, on the torch path, gives exactly the bits it
gave before the engine redesign (hashes in tests/data/pinned.json, written by the pre-redesign
code with FASTDIFF_PIN_WRITE=1). A deliberate change of the numbers rewrites the file in the
same commit and says why.

Changed on purpose since: sampler/ddim_thresh/torch.bfloat16 (the engine redesign computes the
dynamic-thresholding quantile in one place, from x0_hat in float32 as the drop-ins always did;
the native samplers rounded x0_hat to bfloat16 first, which moved s by up to half a bf16 ulp)."""
import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import fastdiff

PINS = Path(__file__).parent / "data" / "pinned.json"


def _model(x, t):
    tt = t.to(torch.float32).reshape((-1,) + (1,) * (x.dim() - 1))
    return 0.3 * x + 0.2 * torch.sin(3.0 * x + tt / 97.0)


def _digest(*tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(t.dtype).encode())
        h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def _sampler_cases():
    from fastdiff.testbed import GaussianMixture
    gm = GaussianMixture.random(dim=6, n_components=3, seed=3)
    shape = (3, 2, 5, 3)
    flat = (5, 6)
    yield "ddim_eta0", dict(sampler="ddim", steps=7), shape, _model
    yield "ddim_eta07_v_lin", dict(sampler="ddim", steps=6, eta=0.7, prediction_type="v_prediction",
                                   timestep_spacing="linspace"), shape, _model
    yield "ddim_sample_clip_lead", dict(sampler="ddim", steps=5, eta=1.0, prediction_type="sample",
                                        clip_sample=True, clip_sample_range=0.8, timestep_spacing="leading",
                                        steps_offset=1), shape, _model
    yield "ddim_thresh", dict(sampler="ddim", steps=5, eta=0.3, thresholding=True, sample_max_value=1.5,
                              dynamic_thresholding_ratio=0.9), shape, _model
    yield "ddim_ratio_noalpha1", dict(sampler="ddim", steps=8, eta=0.2, prev_timestep_rule="ratio",
                                      set_alpha_to_one=False, schedule="scaled_linear"), shape, _model
    yield "ddpm_small", dict(sampler="ddpm", steps=9), shape, _model
    yield "ddpm_large_cos", dict(sampler="ddpm", steps=6, variance_type="fixed_large", schedule="cosine",
                                 use_clipped_model_output=True, clip_sample=True), shape, _model
    yield "ddpm_custom", dict(sampler="ddpm", steps=None, timesteps=[900, 611, 400, 123, 7, 0],
                              prediction_type="v_prediction"), shape, _model
    yield "ocm_ddpm", dict(sampler="ocm-ddpm", steps=6, head=gm.head()), flat, gm.model()
    yield "ocm_ddim", dict(sampler="ocm-ddim", steps=6, eta=0.0, head=gm.head(), clip_pixels=2.0), flat, gm.model()
    yield "ocm_ddim_eta", dict(sampler="ocm-ddim", steps=5, eta=0.5, head=gm.head(), cov_max=None), flat, gm.model()
    yield "ocm_ddpm_pair", dict(sampler="ocm-ddpm", steps=4, head=None), flat, gm.model(return_h=True)
    yield "consistency", dict(sampler="consistency", steps=3), shape, _model
    yield "consistency_v", dict(sampler="consistency", steps=1, prediction_type="v_prediction"), shape, _model
    yield "zero_snr_v", dict(sampler="ddim", steps=5, eta=0.4, prediction_type="v_prediction",
                             schedule=dict(beta_schedule="scaled_linear", rescale_betas_zero_snr=True,
                                           beta_start=0.00085, beta_end=0.012)), shape, _model


def _sampler_digests():
    out = {}
    for name, kw, shape, model in _sampler_cases():
        for dtype in (torch.float32, torch.bfloat16):
            x = fastdiff.sample(model, shape, seed=11, sample_offset=2, dtype=dtype, **kw)
            out[f"sampler/{name}/{dtype}"] = _digest(x)
    return out


def _dropin_loop(cls, config, steps, dtype, *, seed=None, generator=True, learned=False, step_kw=None):
    sched = cls(**config)
    sched.set_timesteps(steps)
    if seed is not None:
        sched.set_noise_seed(seed)
    g = torch.Generator().manual_seed(5) if generator else None
    x = torch.randn((2, 3, 4, 5), generator=torch.Generator().manual_seed(1)).to(dtype)
    outs = []
    for t in sched.timesteps:
        m = _model(x.float(), t.reshape(1).expand(2)).to(dtype)
        if learned:
            m = torch.cat([m, torch.tanh(m)], dim=1)
        res = sched.step(m, t, x, generator=g, **(step_kw or {}))
        x = res.prev_sample
        outs.append(res.pred_original_sample)
    return _digest(x, *outs)


def _dropin_digests():
    from fastdiff.diffusers import DDIMScheduler, DDPMScheduler
    out = {}
    cases = [
        ("ddim", DDIMScheduler, {}, 10, {}),
        ("ddim_eta", DDIMScheduler, dict(timestep_spacing="trailing", prediction_type="v_prediction"), 8,
         dict(step_kw=dict(eta=0.6))),
        ("ddim_clip_seed", DDIMScheduler, dict(clip_sample=True, set_alpha_to_one=False), 7,
         dict(seed=3, step_kw=dict(eta=1.0, use_clipped_model_output=True))),
        ("ddim_thresh", DDIMScheduler, dict(thresholding=True, clip_sample=False, prediction_type="sample"), 6,
         dict(step_kw=dict(eta=0.5))),
        ("ddpm", DDPMScheduler, {}, 12, {}),
        ("ddpm_large_lin", DDPMScheduler, dict(variance_type="fixed_large", timestep_spacing="linspace"), 9, {}),
        ("ddpm_learned_range", DDPMScheduler, dict(variance_type="learned_range"), 8, dict(learned=True)),
        ("ddpm_learned_seed", DDPMScheduler, dict(variance_type="learned", beta_schedule="squaredcos_cap_v2"), 6,
         dict(learned=True, seed=9)),
        ("ddpm_v_thresh", DDPMScheduler, dict(prediction_type="v_prediction", thresholding=True,
                                              beta_schedule="scaled_linear"), 7, {}),
    ]
    for name, cls, config, steps, kw in cases:
        for dtype in (torch.float32, torch.float16):
            out[f"dropin/{name}/{dtype}"] = _dropin_loop(cls, config, steps, dtype, **kw)
    return out


def _all_digests():
    return {**_sampler_digests(), **_dropin_digests()}


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", "torch")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_trajectories_match_the_pinned_bits(torch_backend):
    pytest.importorskip("diffusers")
    got = _all_digests()
    if os.environ.get("FASTDIFF_PIN_WRITE"):
        PINS.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    want = json.loads(PINS.read_text())
    assert set(got) == set(want)
    bad = sorted(k for k in want if got[k] != want[k])
    assert not bad, f"trajectories changed: {bad}"
