"""Real diffusers pipelines with fastdiff's schedulers: tiny UNets with random weights built
locally (no download), the same generator, diffusers' scheduler vs fastdiff's.

Images are in [0, 1]; they agree to 1e-4. The two runs differ by float32 rounding of each step's
coefficients (diffusers rounds beta_ts = 1 - ab_t/ab_s in float32, which at the last DDPM
steps moves the output by ~1e-5) and the network carries that through 10 steps; an
actual difference in the update (a wrong coefficient, a missed noise draw) moves pixels by
1e-2 or more.
"""
import inspect
import types

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import fastdiff.diffusers as fdd  # noqa: E402
from fastdiff.diffusers import DDIMScheduler, DDPMScheduler, swap_scheduler  # noqa: E402

IMAGE_TOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny convolutions on a shared 2-core machine: two OpenMP threads spinning against other
    # processes made a 8x8 conv 40x slower (11 ms vs 0.25 ms) than one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4).eval()


def tiny_cond_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12, attention_head_dim=4, norm_num_groups=4).eval()


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_pipeline(eta):
    unet = tiny_unet()
    config = dict(beta_schedule="linear", clip_sample=True, timestep_spacing="leading")
    ref = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler(**config))
    fast = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler(**config))
    # DDIMPipeline.__init__ rebuilds any scheduler with diffusers' DDIMScheduler.from_config, so
    # fastdiff's goes in by assignment after construction (the README's two lines).
    fast.scheduler = DDIMScheduler.from_config(fast.scheduler.config)
    assert type(fast.scheduler) is DDIMScheduler
    kw = dict(batch_size=2, num_inference_steps=10, eta=eta, output_type="np")
    a = ref(generator=torch.Generator().manual_seed(0), **kw).images
    b = fast(generator=torch.Generator().manual_seed(0), **kw).images
    assert a.shape == b.shape == (2, 8, 8, 3)
    assert abs(a - b).max() <= IMAGE_TOL
    # Another seed moves the images (eta = 1 draws every step's noise from the generator).
    c = fast(generator=torch.Generator().manual_seed(1), **kw).images
    assert abs(c - b).max() > 1e-2


def test_ddim_pipeline_constructor_and_swap_scheduler():
    unet = tiny_unet()
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=DDIMScheduler())
    assert type(pipe.scheduler) is diffusers.DDIMScheduler  # what diffusers' constructor does
    swap_scheduler(pipe)
    assert type(pipe.scheduler) is DDIMScheduler
    ddpm_pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler())
    assert type(swap_scheduler(ddpm_pipe).scheduler) is DDPMScheduler
    with pytest.raises(ValueError, match="DDIMScheduler, DDPMScheduler, .*got PNDMScheduler"):
        swap_scheduler(types.SimpleNamespace(scheduler=diffusers.PNDMScheduler()))


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_ddpm_pipeline(variance_type):
    unet = tiny_unet()
    config = dict(variance_type=variance_type, clip_sample=True, prediction_type="epsilon")
    ref = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(**config))
    fast = diffusers.DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**config))
    assert type(fast.scheduler) is DDPMScheduler
    kw = dict(batch_size=2, num_inference_steps=10, output_type="np")
    a = ref(generator=torch.Generator().manual_seed(3), **kw).images
    b = fast(generator=torch.Generator().manual_seed(3), **kw).images
    assert abs(a - b).max() <= IMAGE_TOL


def sd_style_loop(unet, scheduler, generator, steps=8, guidance=5.0):
    """Stable Diffusion's denoising loop shape: init_noise_sigma, scale_model_input, classifier-free
    guidance, step(..., **extra_step_kwargs, return_dict=False)[0], the extra kwargs found by
    inspecting step's signature as StableDiffusionPipeline.prepare_extra_step_kwargs does."""
    text = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(7))  # [uncond, cond]
    scheduler.set_timesteps(steps, device="cpu")
    latents = torch.randn(1, 4, 8, 8, generator=generator) * scheduler.init_noise_sigma
    params = set(inspect.signature(scheduler.step).parameters)
    extra = {}
    if "eta" in params:
        extra["eta"] = 0.3
    if "generator" in params:
        extra["generator"] = generator
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        noise_pred = unet(model_in, t, encoder_hidden_states=text).sample
        uncond, cond = noise_pred.chunk(2)
        noise_pred = uncond + guidance * (cond - uncond)
        latents = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
    return latents


# The drop-ins in Stable Diffusion's loop: (id, diffusers' scheduler, fastdiff's, config changes over
# the PNDM config Stable Diffusion ships). Every row draws its noise as diffusers does: the
# stochastic ones (ddpm, sde-dpmsolver++, euler-a) call randn_tensor with the step's generator on
# the same steps with the same shape and dtype, so the generator that drew the initial latents
# gives both loops the same noise bit for bit, and no row needs to be left out.
SD_SCHEDULERS = [
    ("ddim", diffusers.DDIMScheduler, fdd.DDIMScheduler, {}),
    ("ddpm", diffusers.DDPMScheduler, fdd.DDPMScheduler, {}),
    ("dpmpp-2m", diffusers.DPMSolverMultistepScheduler, fdd.DPMSolverMultistepScheduler, {}),
    ("dpmpp-2m-karras", diffusers.DPMSolverMultistepScheduler, fdd.DPMSolverMultistepScheduler,
     dict(use_karras_sigmas=True)),
    ("sde-dpmpp-2m", diffusers.DPMSolverMultistepScheduler, fdd.DPMSolverMultistepScheduler,
     dict(algorithm_type="sde-dpmsolver++")),
    ("euler", diffusers.EulerDiscreteScheduler, fdd.EulerDiscreteScheduler, {}),
    ("euler-a", diffusers.EulerAncestralDiscreteScheduler, fdd.EulerAncestralDiscreteScheduler, {}),
    ("unipc", diffusers.UniPCMultistepScheduler, fdd.UniPCMultistepScheduler, {}),
    ("unipc-order3-bh1", diffusers.UniPCMultistepScheduler, fdd.UniPCMultistepScheduler,
     dict(solver_order=3, solver_type="bh1", final_sigmas_type="sigma_min")),
]


@pytest.mark.parametrize("ref_cls, fast_cls, changes", [row[1:] for row in SD_SCHEDULERS],
                         ids=[row[0] for row in SD_SCHEDULERS])
def test_stable_diffusion_style_loop(ref_cls, fast_cls, changes):
    unet = tiny_cond_unet()
    config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                  steps_offset=1, prediction_type="v_prediction", timestep_spacing="trailing")
    pndm = diffusers.PNDMScheduler(**{k: v for k, v in config.items() if k != "clip_sample"})
    # The swap users do: a pipeline's scheduler config (here PNDM's, as Stable Diffusion ships).
    ref, fast = ref_cls.from_config(pndm.config, **changes), fast_cls.from_config(pndm.config, **changes)
    assert type(fast) is fast_cls and all(fast.config[k] == v for k, v in changes.items())
    with torch.no_grad():
        a = sd_style_loop(unet, ref, torch.Generator().manual_seed(0))
        b = sd_style_loop(unet, fast, torch.Generator().manual_seed(0))
    scale = max(1.0, a.abs().max().item())
    assert torch.isfinite(b).all()
    assert (a - b).abs().max().item() <= IMAGE_TOL * scale


def test_pipeline_save_and_reload(tmp_path):
    """A pipeline saved with fastdiff's scheduler records it and reloads it (DDPMPipeline keeps
    the scheduler it is given)."""
    unet = tiny_unet()
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=DDPMScheduler(variance_type="fixed_large"))
    pipe.save_pretrained(tmp_path)
    loaded = diffusers.DDPMPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is DDPMScheduler
    assert loaded.scheduler.config.variance_type == "fixed_large"
