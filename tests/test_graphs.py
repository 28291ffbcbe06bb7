"""CUDA-graph sampling loops (fastdiff.graphs).

CPU tests cover the runner's logic: cache keys, the eager fallback and its warning, errors,
release, and (with a stand-in graph that re-runs the recorded body on replay, so it reads its
static buffers exactly as a CUDA graph does) seeds, buffers, re-capture and eviction.
GPU tests (`gpu` marker) check the real thing: replay bit-identical to the eager fused loop.
"""
import math
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff import DDIMSampler, DDPMSampler, graphs
from fastdiff.graphs import GraphCache, GraphedSampler, GraphFallbackWarning
from fastdiff.engine.kernels import philox


def pointwise_model(x, t):
    """eps(x, t): elementwise and t-dependent, so samples are independent of the batch split."""
    scale = 0.4 + t.to(torch.float32).view(-1, *([1] * (x.dim() - 1))) / 4000
    return (torch.tanh(x.float()) * scale + 0.03).to(x.dtype)


def f64_ddim_eta0(x_T, sampler, model):
    """Deterministic DDIM (eta = 0) in float64 from betas written here (linear 1e-4 .. 0.02)."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    ab = np.cumprod(1.0 - betas)
    x = x_T.double()
    ts = [int(t) for t in sampler.timesteps]
    for i, t in enumerate(ts):
        a_t = ab[t]
        a_s = ab[ts[i + 1]] if i + 1 < len(ts) else 1.0
        eps = model(x, torch.full((x.shape[0],), t, dtype=torch.int64))
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        x = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s) * eps
    return x


# -- cache keys --------------------------------------------------------------------------------------

def test_key_changes_with_what_changes_the_graph_only():
    cache = GraphCache()
    s = DDIMSampler(steps=6, eta=0.3)
    shape, dt, dev = (2, 3, 4, 4), torch.float32, torch.device("cpu")
    base = cache.key(s, pointwise_model, shape, dt, dev)
    assert hash(base) is not None
    # the seed is not an argument of key() at all; equal configurations give equal keys
    assert cache.key(DDIMSampler(steps=6, eta=0.3), pointwise_model, list(shape), dt, "cpu") == base
    other_model = lambda x, t: pointwise_model(x, t)  # noqa: E731 - a different object, same function
    changed = {
        "shape": cache.key(s, pointwise_model, (3, 3, 4, 4), dt, dev),
        "dtype": cache.key(s, pointwise_model, shape, torch.float16, dev),
        "device": cache.key(s, pointwise_model, shape, dt, torch.device("cuda", 0)),
        "sample_offset": cache.key(s, pointwise_model, shape, dt, dev, sample_offset=2),
        "x given": cache.key(s, pointwise_model, shape, dt, dev, given_x=True),
        "model": cache.key(s, other_model, shape, dt, dev),
        "steps": cache.key(DDIMSampler(steps=7, eta=0.3), pointwise_model, shape, dt, dev),
        "eta": cache.key(DDIMSampler(steps=6, eta=0.4), pointwise_model, shape, dt, dev),
        "prediction": cache.key(DDIMSampler(steps=6, eta=0.3, prediction_type="v_prediction"),
                                pointwise_model, shape, dt, dev),
        "sampler": cache.key(DDPMSampler(steps=6), pointwise_model, shape, dt, dev),
        "schedule": cache.key(DDIMSampler("scaled_linear", steps=6, eta=0.3), pointwise_model, shape, dt, dev),
        "spacing": cache.key(DDIMSampler(steps=6, eta=0.3, timestep_spacing="leading"), pointwise_model,
                             shape, dt, dev),
        "backend": cache.key(DDIMSampler(steps=6, eta=0.3, backend="torch"), pointwise_model, shape, dt, dev),
        "clip": cache.key(DDIMSampler(steps=6, eta=0.3, clip_sample=True), pointwise_model, shape, dt, dev),
    }
    for what, key in changed.items():
        assert key != base, what
    assert len(set(changed.values())) == len(changed)


def test_key_of_a_model_pair_and_an_ocm_head():
    ocm = pytest.importorskip("fastdiff.samplers.ocm")
    cache = GraphCache()
    net, head = torch.nn.Identity(), torch.nn.Identity()
    shape = (1, 2)
    # a (network, head) tuple is keyed by its members, not by the tuple object
    assert cache.key(DDPMSampler(steps=3), (net, head), shape, torch.float32, "cpu") == \
        cache.key(DDPMSampler(steps=3), (net, head), shape, torch.float32, "cpu")
    h1, h2 = torch.nn.Identity(), torch.nn.Identity()
    k1 = cache.key(ocm.OCMDDIMSampler(steps=3, head=h1), net, shape, torch.float32, "cpu")
    assert k1 == cache.key(ocm.OCMDDIMSampler(steps=3, head=h1), net, shape, torch.float32, "cpu")
    assert k1 != cache.key(ocm.OCMDDIMSampler(steps=3, head=h2), net, shape, torch.float32, "cpu")


def test_sampler_key_cannot_go_stale():
    s = DDIMSampler(steps=4, eta=0.0)
    key = s.graph_key()
    with pytest.raises(AttributeError, match="cannot change after construction"):
        s.eta = 0.9  # a graph (and the table) were built from eta = 0: the sampler is immutable
    assert s.graph_key() == key == DDIMSampler(steps=4, eta=0.0).graph_key()
    assert DDIMSampler(steps=4, eta=0.9).graph_key() != key


# -- eager fallback on CPU ---------------------------------------------------------------------------

def test_cpu_fallback_warns_once_per_runner_and_matches_eager():
    s = DDPMSampler(steps=5)
    runner = GraphedSampler(s, pointwise_model)
    with pytest.warns(GraphFallbackWarning, match="CUDA graphs need a CUDA device") as rec:
        a = runner((3, 2, 5), seed=11)
        b = runner((3, 2, 5), seed=12)
        x_T = torch.randn(3, 2, 5)
        c = runner(x=x_T, seed=13)
    assert len(rec) == 1 and rec[0].filename == __file__  # points at the caller's line
    assert torch.equal(a, s.sample(pointwise_model, (3, 2, 5), seed=11))
    assert torch.equal(b, s.sample(pointwise_model, (3, 2, 5), seed=12))
    assert torch.equal(c, s.sample(pointwise_model, x=x_T, seed=13))
    assert not torch.equal(a, b)
    with pytest.warns(GraphFallbackWarning):  # a new runner warns again
        GraphedSampler(s, pointwise_model)((1, 2), seed=0)


def test_functional_cuda_graph_on_cpu_equals_eager_and_warns_once(monkeypatch):
    monkeypatch.setattr(graphs, "_DEFAULT", GraphCache())
    kw = dict(sampler="ddim", steps=5, eta=0.5, seed=4)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        a = fastdiff.sample(pointwise_model, (2, 3, 3), cuda_graph=True, **kw)
        b = fastdiff.sample(pointwise_model, (2, 3, 3), sampler=DDIMSampler(steps=5, eta=0.5), seed=4,
                            cuda_graph=True)
    assert [w.category for w in rec] == [GraphFallbackWarning]
    assert torch.equal(a, fastdiff.sample(pointwise_model, (2, 3, 3), **kw))
    assert torch.equal(a, b)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: GraphedSampler("ddim", pointwise_model, warmup=0), ValueError, "warmup must be an int >= 1"),
    (lambda: GraphCache(max_graphs=0), ValueError, "max_graphs must be an int >= 1"),
    (lambda: GraphedSampler(object(), pointwise_model), TypeError, "sampler must be a fastdiff Sampler"),
    (lambda: GraphedSampler(DDIMSampler(steps=3), pointwise_model, eta=0.5), TypeError, "need a sampler name"),
    (lambda: GraphedSampler("ddim", 3), TypeError, "model must be callable"),
    (lambda: GraphCache().run("ddim", pointwise_model, (1, 2)), TypeError, "sampler must be a fastdiff Sampler"),
    (lambda: fastdiff.sample(pointwise_model, (1, 2), steps=3, cuda_graph=True, progress=True), ValueError,
     "progress and callback need the eager loop"),
    (lambda: fastdiff.sample(pointwise_model, (1, 2), sampler=DDIMSampler(steps=3), cuda_graph=True,
                             callback=print), ValueError, "use cuda_graph=False"),
    (lambda: GraphedSampler("ddim", pointwise_model, steps=3)((1, 2), seed=-1), ValueError, "seed must be an int"),
    (lambda: GraphedSampler("ddim", pointwise_model, steps=3)(), ValueError, "give shape"),
])
def test_argument_errors(call, exc, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GraphFallbackWarning)
        with pytest.raises(exc, match=match):
            call()


# -- the runner's logic, with a stand-in for the CUDA graph ------------------------------------------

class RecordedBody:
    """Stands in for torch.cuda.CUDAGraph: replay re-runs what was recorded, reading the same static
    tensors (seed, x) that a real graph's kernels would read."""

    def __init__(self, body):
        self.body, self.replays, self.released = body, 0, False

    def replay(self):
        assert not self.released, "replay after release"
        self.replays += 1
        with torch.no_grad():
            self.body()

    def reset(self):
        self.released = True


@pytest.fixture
def fake_graphs(monkeypatch):
    recorded = []

    def record(body, device, pool):
        assert pool == "pool"
        recorded.append(RecordedBody(body))
        return recorded[-1]

    monkeypatch.setattr(graphs, "_graphs_available", lambda device: True)
    monkeypatch.setattr(graphs, "_warm_up", lambda body, device, n: [body() for _ in range(n)])
    monkeypatch.setattr(graphs, "_record", record)
    return recorded


def test_replay_reads_a_new_seed_without_recapture(fake_graphs):
    s = DDIMSampler(steps=6, eta=0.8)
    runner = GraphedSampler(s, pointwise_model, pool="pool")
    a, b, a2 = (runner((2, 3, 5), seed=seed) for seed in (1, 2, 1))
    assert runner.captures == 1 and len(runner) == 1 and fake_graphs[0].replays == 3
    assert torch.equal(a, a2) and not torch.equal(a, b)
    assert torch.equal(a, s.sample(pointwise_model, (2, 3, 5), seed=1))
    assert torch.equal(b, s.sample(pointwise_model, (2, 3, 5), seed=2))


@pytest.mark.parametrize("make", [
    lambda: DDPMSampler(steps=4, variance_type="fixed_large"),
    lambda: DDIMSampler(steps=4, eta=0.5, thresholding=True, sample_max_value=1.5),
    lambda: pytest.importorskip("fastdiff.samplers.ocm").OCMDDIMSampler(steps=4, head=lambda x, t: 0.2 * torch.tanh(x)),
    lambda: pytest.importorskip("fastdiff.samplers.consistency").ConsistencySampler(steps=3, prediction_type="sample"),
], ids=["ddpm-large", "ddim-threshold", "ocm-ddim", "consistency"])
def test_every_sampler_kind_replays_like_its_eager_loop(fake_graphs, make):
    s = make()
    runner = GraphedSampler(s, pointwise_model, pool="pool")
    for seed in (0, 1):
        assert torch.equal(runner((3, 2, 5), seed=seed), s.sample(pointwise_model, (3, 2, 5), seed=seed))
    assert runner.captures == 1


def test_deterministic_graph_matches_float64_chain(fake_graphs):
    s = DDIMSampler(steps=8, eta=0.0)
    shape = (2, 3, 7)
    out = GraphedSampler(s, pointwise_model, pool="pool")(shape, seed=5)
    x_T = philox.randn(shape, 5, stream=philox.STREAM_INIT, backend="torch")
    want = f64_ddim_eta0(x_T, s, pointwise_model)
    err = float((out.double() - want).abs().max() / want.abs().max())
    assert err < 1e-5, err


def test_given_x_is_copied_in_and_left_alone(fake_graphs):
    s = DDPMSampler(steps=4)
    runner = GraphedSampler(s, pointwise_model, pool="pool")
    x1, x2 = torch.randn(2, 6), torch.randn(2, 6)
    keep = x1.clone()
    y1 = runner(x=x1, seed=3)
    y2 = runner(x=x2, seed=3)
    drawn = runner((2, 6), seed=3)
    assert torch.equal(x1, keep)
    assert torch.equal(y1, s.sample(pointwise_model, x=x1, seed=3))
    assert torch.equal(y2, s.sample(pointwise_model, x=x2, seed=3))
    assert torch.equal(drawn, s.sample(pointwise_model, (2, 6), seed=3))
    assert runner.captures == 2  # given x and drawn x_T are different graphs, each captured once


def test_shape_dtype_and_offset_changes_recapture_and_split_batches_agree(fake_graphs):
    s = DDPMSampler(steps=5)
    runner = GraphedSampler(s, pointwise_model, pool="pool", max_graphs=8)
    full = runner((4, 3, 2), seed=9)
    halves = torch.cat([runner((2, 3, 2), seed=9, sample_offset=0), runner((2, 3, 2), seed=9, sample_offset=2)])
    assert runner.captures == 3
    assert torch.equal(full, halves)
    assert torch.equal(full, s.sample(pointwise_model, (4, 3, 2), seed=9))
    half = runner((4, 3, 2), seed=9, dtype=torch.bfloat16)
    assert runner.captures == 4 and half.dtype == torch.bfloat16
    assert torch.equal(half, s.sample(pointwise_model, (4, 3, 2), seed=9, dtype=torch.bfloat16))


def test_least_recently_used_graph_is_released(fake_graphs):
    runner = GraphedSampler("ddim", pointwise_model, steps=3, pool="pool", max_graphs=2)
    runner((1, 2), seed=0)
    runner((2, 2), seed=0)
    runner((1, 2), seed=1)  # touch: (2, 2) is now the oldest
    runner((3, 2), seed=0)
    assert len(runner) == 2 and [g.released for g in fake_graphs] == [False, True, False]
    runner((1, 2), seed=2)
    assert runner.captures == 3


def test_reset_and_context_manager_release_everything(fake_graphs):
    with GraphedSampler("ddim", pointwise_model, steps=3, pool="pool") as runner:
        runner((1, 2), seed=0)
        runner((2, 2), seed=0)
        assert len(runner) == 2
    assert len(runner) == 0 and all(g.released for g in fake_graphs)
    runner((1, 2), seed=0)  # usable again: captures afresh
    assert runner.captures == 3
    runner.reset()
    assert len(runner) == 0 and fake_graphs[-1].released


def test_copy_false_returns_the_static_buffer(fake_graphs):
    runner = GraphedSampler("ddim", pointwise_model, steps=3, pool="pool")
    a = runner((2, 2), seed=0, copy=False)
    b = runner((2, 2), seed=1, copy=False)
    assert a is b
    c = runner((2, 2), seed=1)
    assert c is not b and torch.equal(c, b)


def test_capture_failure_says_why_and_how_to_run_eagerly(fake_graphs, monkeypatch):
    def refuse(body, device, pool):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs, "_record", refuse)
    runner = GraphedSampler("ddpm", pointwise_model, steps=3, pool="pool")
    with pytest.raises(RuntimeError, match="could not be captured in a CUDA graph") as info:
        runner((1, 4), seed=0)
    msg = str(info.value)
    assert "pointwise_model" in msg and "cuda_graph=False" in msg and ".item()" in msg
    assert "operation not permitted when stream is capturing" in msg
    assert len(runner) == 0 and runner.captures == 0


def test_warm_up_errors_are_the_models_own(fake_graphs):
    def wrong_shape(x, t):
        return x[:, :1]

    runner = GraphedSampler("ddim", wrong_shape, steps=3, pool="pool")
    with pytest.raises(ValueError, match="must have the same shape"):
        runner((2, 4), seed=0)
    assert len(runner) == 0


def test_sampler_sample_cuda_graph_uses_the_process_cache(fake_graphs, monkeypatch):
    cache = GraphCache(pool="pool")
    monkeypatch.setattr(graphs, "_DEFAULT", cache)
    kw = dict(sampler="ddpm", steps=4, seed=1)
    a = fastdiff.sample(pointwise_model, (2, 3), cuda_graph=True, **kw)
    b = fastdiff.sample(pointwise_model, (2, 3), cuda_graph=True, **{**kw, "seed": 2})
    assert cache.captures == 1 and fake_graphs[0].replays == 2
    assert torch.equal(a, fastdiff.sample(pointwise_model, (2, 3), **kw))
    assert not torch.equal(a, b)
    graphs.reset()
    assert len(cache) == 0


# -- GPU ----------------------------------------------------------------------------------------------

class TinyUNetish(torch.nn.Module):
    """Two convolutions and a timestep embedding: real cuDNN/cuBLAS work inside the graph."""

    def __init__(self, channels=3, hidden=16):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(channels, hidden, 3, padding=1)
        self.emb = torch.nn.Linear(1, hidden)
        self.conv_out = torch.nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x, t):
        h = self.conv_in(x.float()) + self.emb(t.float().unsqueeze(1) / 1000)[:, :, None, None]
        return (0.5 * self.conv_out(torch.nn.functional.silu(h))).to(x.dtype)


def _gpu_samplers():
    cases = [("ddpm", lambda: DDPMSampler(steps=12)),
             ("ddim-eta0", lambda: DDIMSampler(steps=12, eta=0.0)),
             ("ddim-eta0.7", lambda: DDIMSampler(steps=12, eta=0.7)),
             ("ddim-threshold", lambda: DDIMSampler(steps=12, eta=0.3, thresholding=True, sample_max_value=2.0))]
    head = lambda x, t: 0.1 * torch.tanh(x)  # noqa: E731 - a covariance head h(x_t, t)

    def ocm(name):
        ocm_mod = pytest.importorskip("fastdiff.samplers.ocm")
        return getattr(ocm_mod, name)(steps=12, head=head)

    def consistency():
        return pytest.importorskip("fastdiff.samplers.consistency").ConsistencySampler(steps=4, prediction_type="v_prediction")

    cases += [("ocm-ddpm", lambda: ocm("OCMDDPMSampler")), ("ocm-ddim", lambda: ocm("OCMDDIMSampler")),
              ("consistency", consistency)]
    # multistep solvers: history buffers allocated in the captured loop, read and written in turn
    cases += [(name, lambda name=name: fastdiff.samplers.make_sampler(name, steps=10))
              for name in ("dpmpp-2m", "dpmpp-2m-sde", "euler-a", "unipc")]
    cases += [("unipc-order3", lambda: fastdiff.samplers.make_sampler("unipc", steps=10, solver_order=3)),
              ("flow-unipc", lambda: fastdiff.samplers.make_sampler("flow-unipc", dict(shift=5.0), steps=10))]
    return cases


@pytest.mark.gpu
@pytest.mark.parametrize("name,make", _gpu_samplers(), ids=[c[0] for c in _gpu_samplers()])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_graphed_equals_eager_bit_for_bit(name, make, dtype):
    torch.manual_seed(0)
    model = TinyUNetish().cuda().eval()
    s = make()
    shape = (3, 3, 16, 16)
    with GraphedSampler(s, model) as runner, torch.no_grad():
        for seed in (0, 1):
            eager = s.sample(model, shape, seed=seed, device="cuda", dtype=dtype)
            graphed = runner(shape, seed=seed, device="cuda", dtype=dtype)
            assert graphed.dtype == dtype and graphed.is_cuda
            assert torch.equal(graphed, eager), f"{name} seed {seed}: max diff {(graphed - eager).abs().max()}"
        x_T = torch.randn(shape, device="cuda", dtype=dtype)
        assert torch.equal(runner(x=x_T, seed=5), s.sample(model, x=x_T, seed=5))
        assert runner.captures == 2


@pytest.mark.gpu
def test_gpu_seeds_replay_and_shape_change_recaptures():
    torch.manual_seed(0)
    model = TinyUNetish().cuda().eval()
    s = DDPMSampler(steps=10)
    with GraphedSampler(s, model) as runner:
        a, b, a2 = (runner((2, 3, 8, 8), seed=k, device="cuda") for k in (10, 11, 10))
        assert runner.captures == 1
        assert torch.equal(a, a2) and not torch.equal(a, b)
        c = runner((4, 3, 8, 8), seed=10, device="cuda")
        assert runner.captures == 2
        assert torch.equal(c, s.sample(model, (4, 3, 8, 8), seed=10, device="cuda"))


@pytest.mark.gpu
def test_gpu_noise_same_eager_graphed_and_split():
    s = DDPMSampler(steps=10)  # noise on every step but the last
    shape = (6, 3, 5, 7)  # 105 elements per sample: the split at sample 3 falls inside a Philox group of 4
    eager = s.sample(pointwise_model, shape, seed=3, device="cuda")
    with GraphedSampler(s, pointwise_model) as runner:
        graphed = runner(shape, seed=3, device="cuda")
        split = torch.cat([runner((3,) + shape[1:], seed=3, device="cuda"),
                           runner((3,) + shape[1:], seed=3, sample_offset=3, device="cuda")])
    assert torch.equal(graphed, eager)
    assert torch.equal(split, eager)


@pytest.mark.gpu
def test_gpu_graphed_matches_float64_chain():
    s = DDIMSampler(steps=10, eta=0.0)
    shape = (2, 3, 9, 9)
    out = GraphedSampler(s, pointwise_model)(shape, seed=7, device="cuda")
    x_T = philox.randn(shape, 7, stream=philox.STREAM_INIT, backend="torch")
    want = f64_ddim_eta0(x_T, s, pointwise_model)
    err = float((out.cpu().double() - want).abs().max() / want.abs().max())
    assert err < 1e-5, err


@pytest.mark.gpu
def test_gpu_functional_cache_and_shared_pool():
    torch.manual_seed(0)
    model = TinyUNetish().cuda().eval()
    graphs.reset()
    before = graphs._DEFAULT.captures
    kw = dict(sampler="ddim", steps=8, eta=0.4, device="cuda")
    a = fastdiff.sample(model, (2, 3, 8, 8), seed=1, cuda_graph=True, **kw)
    b = fastdiff.sample(model, (2, 3, 8, 8), seed=2, cuda_graph=True, **kw)
    assert graphs._DEFAULT.captures == before + 1
    assert torch.equal(a, fastdiff.sample(model, (2, 3, 8, 8), seed=1, **kw))
    assert torch.equal(b, fastdiff.sample(model, (2, 3, 8, 8), seed=2, **kw))
    graphs.reset()
    # two runners on one memory pool, replayed interleaved
    pool = torch.cuda.graph_pool_handle()
    r1 = GraphedSampler(DDPMSampler(steps=6), model, pool=pool)
    r2 = GraphedSampler(DDIMSampler(steps=6, eta=0.5), model, pool=pool)
    outs = [(r(shape, seed=k, device="cuda"), r.sampler, shape, k)
            for k in (0, 1) for r, shape in ((r1, (2, 3, 8, 8)), (r2, (3, 3, 16, 16)))]
    for got, sampler, shape, k in outs:
        assert torch.equal(got, sampler.sample(model, shape, seed=k, device="cuda"))
    r1.reset()
    r2.reset()


@pytest.mark.gpu
def test_gpu_host_sync_in_model_fails_with_a_clear_error():
    # In a subprocess: a failed capture must not leave this test process's CUDA state in doubt.
    code = textwrap.dedent("""
        import torch, fastdiff
        from fastdiff.graphs import GraphedSampler
        def syncing(x, t):
            return x * float(x.abs().max().item() > 0)
        try:
            GraphedSampler("ddim", syncing, steps=4)((2, 8), device="cuda")
        except RuntimeError as exc:
            msg = str(exc)
            assert "could not be captured in a CUDA graph" in msg and "cuda_graph=False" in msg, msg
            print("CLEAR-ERROR")
        out = fastdiff.sample(syncing, (2, 8), steps=4, device="cuda")
        torch.cuda.synchronize()
        print("EAGER-OK", tuple(out.shape))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "CLEAR-ERROR" in res.stdout and "EAGER-OK (2, 8)" in res.stdout, res.stdout + res.stderr[-3000:]


def test_schedule_device_cache_does_not_change_the_key():
    sched = fastdiff.Schedule()
    a = fastdiff.DDIMSampler(sched, steps=5).graph_key()
    sched.alphas_cumprod_on("cpu")
    b = fastdiff.DDIMSampler(sched, steps=5).graph_key()
    assert a == b
