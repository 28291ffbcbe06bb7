"""A shard of a latent draws exactly its part of the full latent's noise (one process).

fastdiff.engine.shard.Shard gives the step and philox.randn an element offset and runs of
consecutive global indices (``index_run``); the Triton kernel (through the interpreter on a CPU)
and the torch reference must each give, on a shard, the bits of the same backend on the full
tensor, sliced. The multi-process runs are in tests/test_distributed.py.
"""
import numpy as np
import pytest
import torch

import fastdiff
from fastdiff import DDIMSampler, DDPMSampler, OCMDDPMSampler, graphs
from fastdiff.distributed import Shard, shard_step
from fastdiff.engine.kernels import philox
from fastdiff.engine.step import StepOptions, step

BACKENDS = ["torch", "triton"]
gen = torch.Generator().manual_seed(2024)


def fresh(*shape):
    return torch.randn(shape, generator=gen)


def model(x, t):
    scale = 0.4 + t.to(torch.float32).view(-1, *([1] * (x.dim() - 1))) / 4000
    return torch.tanh(x) * scale + 0.03


# -- Shard ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("size,parts", [(5, 2), (5, 3), (2, 3), (7, 7), (12, 5)])
def test_split_is_tensor_split_in_order(size, parts):
    full = torch.arange(3 * size * 2).view(3, size, 2)
    pieces = [Shard.split(full.shape, 1, parts, i) for i in range(parts)]
    for sh, ref in zip(pieces, torch.tensor_split(full, parts, dim=1)):
        assert torch.equal(sh.take(full), ref) and sh.local_shape == tuple(ref.shape)
    assert torch.equal(torch.cat([sh.take(full) for sh in pieces], dim=1), full)


def test_noise_index_is_the_global_index_of_each_element():
    full = (3, 4, 5, 2)
    g = torch.arange(np.prod(full)).view(full)
    for sh in (Shard(full, 1, 1, 2), Shard(full, 2, 3, 2), Shard(full, 0, 1, 2), Shard(full, -1, 1, 1),
               Shard(full, 3, 0, 2), Shard(full, None, 7, 50), Shard(full, 2, 0, 5, sample_offset=4)):
        want = sh.take(g).reshape(-1) + sh.sample_offset * 40
        run = philox.check_index_run(sh.index_run, sh.numel)
        got = (philox.run_indices(sh.index_offset, run, 0, sh.numel, "cpu") if run is not None
               else torch.arange(sh.numel) + sh.index_offset)
        assert torch.equal(got, want), sh


def test_shard_errors_name_the_constraint():
    with pytest.raises(ValueError, match="must lie inside"):
        Shard((2, 3), 1, 2, 2)
    with pytest.raises(ValueError, match="dim must be None"):
        Shard((2, 3), 2, 0, 1)
    with pytest.raises(ValueError, match="full_shape"):
        Shard((2, 0), 1, 0, 0)
    with pytest.raises(ValueError, match=r"index must lie in \[0, parts=2\)"):
        Shard.split((4, 3), 0, 2, 2)
    with pytest.raises(ValueError, match=r"shape \(2, 1\)"):
        Shard((2, 3), 1, 0, 1).check_local("x", torch.zeros(2, 2))
    with pytest.raises(ValueError, match="index_run must be"):
        philox.check_index_run((4, 2), 10)
    x = fresh(2, 3)
    table, _, ids = DDPMSampler(steps=3).device_state("cpu")
    with pytest.raises(ValueError, match="not both"):
        step(x, x, table, ids[0], seed=torch.tensor([1]), sample_offset=1, index_offset=3)


# -- noise ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("full,dim,start,length", [((3, 7, 5), 1, 2, 3), ((2, 3, 4, 5, 3), 3, 1, 3),
                                                   ((4, 9), 1, 4, 5), ((5, 3, 2), 0, 1, 3),
                                                   ((3, 6, 4), 1, 2, 3)])  # runs of whole Philox groups
def test_randn_on_a_shard_is_that_part_of_the_full_noise(backend, full, dim, start, length):
    sh = Shard(full, dim, start, length, sample_offset=3)
    whole = philox.randn(full, 77, index_offset=3 * int(np.prod(full[1:])), backend=backend)
    part = philox.randn(sh.local_shape, 77, backend=backend, **sh.noise_index)
    assert torch.equal(part, sh.take(whole))


@pytest.mark.parametrize("inner", [3, 4])  # runs of single elements / of whole Philox groups
def test_torch_runs_straddle_chunks(monkeypatch, inner):
    monkeypatch.setattr(philox, "_TORCH_CHUNK", 64)  # chunk edges fall inside runs
    sh = Shard((3, 50, inner), 1, 7, 29)
    whole = philox.randn((3, 50, inner), 5, backend="torch")
    assert torch.equal(philox.randn(sh.local_shape, 5, backend="torch", **sh.noise_index), sh.take(whole))


# -- the step ----------------------------------------------------------------------------------------

STEP_CASES = {
    "ddpm": (DDPMSampler(steps=5), StepOptions()),
    "ddim-eta-v-clip": (DDIMSampler(steps=5, eta=0.6, prediction_type="v_prediction"),
                        StepOptions(prediction_type="v_prediction", clip_range=1.0)),
    "ocm": (OCMDDPMSampler(steps=5, head=lambda x, t: 0.2 * x), StepOptions(var_mode="ocm")),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(STEP_CASES))
@pytest.mark.parametrize("full,dim,start,length", [((3, 7, 5), 1, 2, 3), ((2, 3, 4, 5, 3), 2, 1, 2),
                                                   ((2, 6, 5), -1, 3, 2), ((4, 3, 2), 0, 1, 2),
                                                   ((2, 6, 8), 1, 1, 3)])
def test_step_on_a_shard_is_that_part_of_the_full_step(backend, case, full, dim, start, length):
    sampler, options = STEP_CASES[case]
    table, _, ids = sampler.device_state("cpu")
    x, m, h = fresh(*full), fresh(*full), 0.3 * torch.tanh(fresh(*full))
    seed = torch.tensor([9])
    aux = h if options.var_mode == "ocm" else None
    whole = step(x, m, table, ids[2], options, seed=seed, aux=aux, backend=backend)
    sh = Shard(full, dim, start, length)
    # the slices are views (non-contiguous): the strided paths must place the noise by logical index
    got = shard_step(sh.take(x), sh.take(m), table, ids[2], options, shard=sh, seed=seed,
                     aux=sh.take(h) if aux is not None else None, backend=backend)
    assert torch.equal(got, sh.take(whole))
    # the same on contiguous copies, written in place
    xs = sh.take(x).contiguous()
    shard_step(xs, sh.take(m).contiguous(), table, ids[2], options, shard=sh, seed=seed, out=xs,
               aux=sh.take(h).contiguous() if aux is not None else None, backend=backend)
    assert torch.equal(xs, sh.take(whole))


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_on_a_flattened_range(backend):
    table, _, ids = DDPMSampler(steps=4).device_state("cpu")
    x, m = fresh(3, 5, 7), fresh(3, 5, 7)
    seed = torch.tensor([4])
    whole = step(x, m, table, ids[1], seed=seed, backend=backend).reshape(-1)
    sh = Shard((3, 5, 7), None, 37, 41)  # starts and ends inside a sample and a Philox group
    got = shard_step(sh.take(x), sh.take(m), table, ids[1], shard=sh, seed=seed, backend=backend)
    assert torch.equal(got, whole[37:78])


def test_shard_step_refuses_what_a_shard_cannot_do():
    table, _, ids = DDPMSampler(steps=4).device_state("cpu")
    sh = Shard((2, 6, 3), 1, 0, 3)
    x = fresh(2, 3, 3)
    with pytest.raises(ValueError, match="dynamic thresholding"):
        shard_step(x, x, table, ids[0], StepOptions(thresholding=True), shard=sh, seed=torch.tensor([1]))
    with pytest.raises(TypeError, match="do not pass sample_offset"):
        shard_step(x, x, table, ids[0], shard=sh, seed=torch.tensor([1]), sample_offset=2)
    with pytest.raises(ValueError, match=r"shape \(2, 3, 3\)"):
        shard_step(fresh(2, 4, 3), fresh(2, 4, 3), table, ids[0], shard=sh)


# -- samplers, graphs and drop-ins ------------------------------------------------------------------------

@pytest.mark.parametrize("name,kw", [("ddim", {"eta": 0.8}), ("flow-stochastic", {}),
                                     ("ocm-ddpm", {"head": lambda x, t: 0.25 * torch.tanh(x)})])
def test_sampling_a_shard_is_that_part_of_the_full_samples(name, kw):
    full = (2, 9, 4)
    whole = fastdiff.sample(model, full, sampler=name, steps=4, seed=3, **kw)
    for index in range(3):
        sh = Shard.split(full, 1, 3, index)
        assert torch.equal(fastdiff.sample(model, sampler=name, steps=4, seed=3, shard=sh, **kw), sh.take(whole))
    x_T = fresh(*full)
    whole = fastdiff.sample(model, x=x_T, sampler=name, steps=4, seed=3, **kw)
    sh = Shard(full, 2, 1, 2)
    assert torch.equal(fastdiff.sample(model, x=sh.take(x_T), sampler=name, steps=4, seed=3, shard=sh, **kw),
                       sh.take(whole))


def test_sampler_shard_errors():
    sh = Shard((2, 6, 3), 1, 0, 3)
    with pytest.raises(ValueError, match="dynamic thresholding"):
        DDPMSampler(steps=2, thresholding=True).sample(model, shard=sh)
    with pytest.raises(ValueError, match="not a flattened range"):
        DDPMSampler(steps=2).sample(model, shard=Shard((2, 6, 3), None, 0, 3))
    with pytest.raises(ValueError, match=r"shard's shape \(2, 3, 3\)"):
        DDPMSampler(steps=2).sample(model, (2, 6, 3), shard=sh)
    with pytest.raises(ValueError, match="its sample_offset places the batch"):
        DDPMSampler(steps=2).sample(model, shard=sh, sample_offset=1)


def test_graph_key_holds_the_shard():
    cache = graphs.GraphCache()
    s = DDIMSampler(steps=3, eta=0.5)
    keys = {cache.key(s, model, (2, 3, 3), torch.float32, "cpu", shard=sh)
            for sh in (None, Shard((2, 6, 3), 1, 0, 3), Shard((2, 6, 3), 1, 3, 3))}
    assert len(keys) == 3


def test_drop_ins_on_a_shard_draw_its_part_of_the_noise():
    pytest.importorskip("diffusers")
    from fastdiff.diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    full = (2, 8, 6)
    x, m = fresh(*full), fresh(*full)
    for make in (lambda: DDPMScheduler(num_train_timesteps=1000),
                 lambda: FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)):
        sched = make()
        sched.set_timesteps(5)
        t = sched.timesteps[1]
        sched.set_noise_seed(21)
        whole = sched.step(m, t, x).prev_sample
        for index in range(2):
            sh = Shard.split(full, 1, 2, index)
            part = make()
            part.set_timesteps(5)
            part.set_noise_seed(21, shard=sh)
            assert torch.equal(part.step(sh.take(m), t, sh.take(x)).prev_sample, sh.take(whole))
        with pytest.raises(ValueError, match="must be this shard"):
            part.step(m, t, x)
        with pytest.raises(ValueError, match="give it with a seed"):
            part.set_noise_seed(None, shard=sh)


# -- on a GPU: the compiled kernels -----------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_shard_noise_and_step_are_the_full_ones_sliced(dtype):
    """normal_at (a shard's per-element noise) and normal_block (consecutive indices) compiled for
    the GPU give the same bits; so do the sharded and full steps, eager and graphed."""
    full = (2, 4, 96, 40)  # a shard of rows: 2 * 4 runs of 24 * 40 indices
    sh = Shard.split(full, 2, 4, 1)
    whole = philox.randn(full, 5, device="cuda", dtype=dtype)
    assert torch.equal(philox.randn(sh.local_shape, 5, device="cuda", dtype=dtype, **sh.noise_index), sh.take(whole))
    table, _, ids = DDIMSampler(steps=5, eta=0.9).device_state("cuda")
    x = torch.randn(full, device="cuda", dtype=dtype)
    m = torch.randn(full, device="cuda", dtype=dtype)
    seed = torch.tensor([3], device="cuda")
    ref = step(x, m, table, ids[1], seed=seed)
    assert torch.equal(shard_step(sh.take(x), sh.take(m), table, ids[1], shard=sh, seed=seed), sh.take(ref))
    kw = dict(sampler="ddim", eta=0.9, steps=5, seed=2, device="cuda", dtype=dtype)
    with torch.no_grad():
        eager = fastdiff.sample(model, full, **kw)
        assert torch.equal(fastdiff.sample(model, shard=sh, **kw), sh.take(eager))
        assert torch.equal(fastdiff.sample(model, shard=sh, cuda_graph=True, **kw), sh.take(eager))
    graphs.reset()
