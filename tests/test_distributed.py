"""Sampling across processes (fastdiff.distributed) on the CPU: gloo process groups of 2 and 3
ranks give bit for bit the samples of one process, data parallel and sharded along an inner
dimension, for DDPM, DDIM eta > 0, OCM-DDPM with a head and flow-stochastic; a rank that fails
or hangs mid-run is reported, not waited on for ever.

Ranks are forked from the test process (on Linux, with one torch thread as tests/conftest.py
sets it, so that no OpenMP pool is inherited half-initialised; spawned otherwise): a spawned
process re-imports torch and fastdiff, ~6 s each on the 2-core CI machine, where a fork costs
milliseconds. Each group is one process start that runs every case; the file takes about 35 s,
15 of them the torchrun run of the command line.

The models are batch- and split-independent by construction (elementwise, or gathering the
whole sequence like an attention layer would), so any difference is fastdiff's.
"""
import datetime
import os
import queue
import subprocess
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastdiff
import fastdiff.distributed as fdd
from fastdiff import cli, graphs
from fastdiff.distributed import Shard

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


# -- models -------------------------------------------------------------------------------------

def pointwise(x, t):
    scale = 0.4 + t.to(torch.float32).view(-1, *([1] * (x.dim() - 1))) / 4000
    return torch.tanh(x) * scale + 0.03


def head(x, t):
    """A simple OCM head: h in (-0.3, 0.3), elementwise."""
    return 0.3 * torch.tanh(2.0 * x)


def mixing(x, t):
    """Elementwise plus the mean over dim 1 (the tokens): one sample's output depends on all of
    its tokens, as with attention."""
    return pointwise(x, t) + 0.2 * x.mean(dim=1, keepdim=True)


class SequenceParallel:
    """``mixing`` on a rank's slice of dim 1: gathers the whole sequence, computes, keeps the slice
    (what a sequence-parallel network does inside with all-to-all attention)."""

    def __init__(self, full_shape):
        self.full_shape = tuple(full_shape)

    def __call__(self, x, t):
        rank, size = fdd.world()
        shard = Shard.split(self.full_shape, 1, size, rank)
        return shard.take(mixing(fdd.gather_parts(x, shard), t))


SAMPLERS = {
    "ddpm": {"sampler": "ddpm"},
    "ddim-eta": {"sampler": "ddim", "eta": 0.7},
    "ocm-ddpm": {"sampler": "ocm-ddpm", "head": head},
    "flow-stochastic": {"sampler": "flow-stochastic"},
    # multistep: history buffers per rank; the SDE draws its noise in the step
    "dpmpp-2m-sde": {"sampler": "dpmpp-2m-sde"},
    "unipc": {"sampler": "unipc", "solver_order": 3},
}
BATCH = (5, 3, 4)      # 5 samples: 3 + 2 over 2 ranks, 2 + 2 + 1 over 3
SEQ = (2, 7, 3)        # 7 tokens: 4 + 3 over 2 ranks, 3 + 2 + 2 over 3
STEPS = 4


def cases():
    """name -> (full shape, dim, model for one process, model for a rank, fastdiff.sample keywords)."""
    out = {}
    for name, kw in SAMPLERS.items():
        out[f"dp/{name}"] = (BATCH, 0, pointwise, pointwise, kw)
        out[f"sp/{name}"] = (SEQ, 1, mixing, SequenceParallel(SEQ), kw)
    out["dp/ddim-eta/graph"] = (BATCH, 0, pointwise, pointwise, dict(SAMPLERS["ddim-eta"], cuda_graph=True))
    out["sp/ocm-ddpm/graph"] = (SEQ, 1, mixing, SequenceParallel(SEQ), dict(SAMPLERS["ocm-ddpm"], cuda_graph=True))
    out["sp/ddim-eta/triton"] = (SEQ, 1, mixing, SequenceParallel(SEQ), dict(SAMPLERS["ddim-eta"], backend="triton"))
    out["dp/ddpm/empty-rank"] = ((2, 3, 4), 0, pointwise, pointwise, SAMPLERS["ddpm"])
    out["dp/ddpm/offset"] = (BATCH, 0, pointwise, pointwise, dict(SAMPLERS["ddpm"], sample_offset=3))
    return out


# -- the process harness ----------------------------------------------------------------------------

def _worker(rank, world, store, fn, args, results, timeout_s):
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        results.put((rank, "ok", fn(rank, world, *args)))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(tmp_path, world, fn, *args, timeout_s=30.0, deadline_s=90.0):
    """Run ``fn(rank, world, *args)`` on ``world`` processes in one gloo group (collectives time out
    after ``timeout_s``). Returns {rank: ("ok", result) | ("error", traceback) | ("hung", None)}: a
    process that has not reported ``deadline_s`` after the start, or a collective timeout after
    another rank failed, is killed and reported as hung."""
    forkable = sys.platform.startswith("linux") and torch.get_num_threads() == 1
    ctx = mp.get_context("fork" if forkable else "spawn")
    results = ctx.Queue()
    store = tmp_path / f"store-{world}-{time.monotonic_ns()}"
    procs = [ctx.Process(target=_worker, args=(r, world, store, fn, args, results, timeout_s), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    out, end = {}, time.monotonic() + deadline_s
    while len(out) < world and time.monotonic() < end:
        try:
            rank, status, payload = results.get(timeout=0.2)
        except queue.Empty:
            if not any(p.is_alive() for p in procs) and results.empty():
                break
            continue
        out[rank] = (status, payload)
        if status != "ok":  # the others get one collective timeout (and a margin) to report
            end = min(end, time.monotonic() + timeout_s + 1.0)
    for r, p in enumerate(procs):
        p.join(timeout=max(0.0, end - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()
        out.setdefault(r, ("hung", None))
    return out


def _ok(out):
    bad = {r: v for r, v in out.items() if v[0] != "ok"}
    assert not bad, "\n".join(f"rank {r}: {s}\n{tb}" for r, (s, tb) in bad.items())
    return {r: v[1] for r, v in out.items()}


# -- what each rank runs ------------------------------------------------------------------------------

def _stand_in_graphs():
    """CUDA graphs without CUDA: the recorded body re-runs on replay, reading the static buffers as
    a graph would (tests/test_graphs.py uses the same stand-in)."""
    class Replay:
        def __init__(self, body):
            self.replay = body

    graphs._graphs_available = lambda device: True
    graphs._warm_up = lambda body, device, n: [body() for _ in range(n)]
    graphs._record = lambda body, device, pool: Replay(body)
    graphs._DEFAULT = graphs.GraphCache(pool="pool")


def sample_every_case(rank, world):
    _stand_in_graphs()  # this process only: it was forked
    out = {}
    for name, (shape, dim, _, rank_model, kw) in cases().items():
        with torch.no_grad():
            whole = fdd.sample(rank_model, shape, dim=dim, steps=STEPS, seed=11, **kw)
            mine = fdd.sample(rank_model, shape, dim=dim, steps=STEPS, seed=11, gather=False, **kw)
        out[name] = (whole.numpy(), mine.numpy())
    try:  # 2 tokens over 3 ranks: refused on every rank alike, before any collective
        fdd.sample(pointwise, (2, 2, 3), dim=1, steps=STEPS)
    except ValueError as exc:
        out["too-few"] = str(exc)
    return out


@pytest.fixture(scope="module")
def references():
    out = {}
    for name, (shape, _, model, _, kw) in cases().items():
        kw = {k: v for k, v in kw.items() if k != "cuda_graph"}
        with torch.no_grad():
            out[name] = fastdiff.sample(model, shape, steps=STEPS, seed=11, **kw)
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_every_split_gives_the_samples_of_one_process(tmp_path, references, world):
    per_rank = _ok(run_ranks(tmp_path, world, sample_every_case))
    for name, (shape, dim, *_rest) in cases().items():
        ref = references[name]
        offset = _rest[-1].get("sample_offset", 0)
        for rank, res in per_rank.items():
            whole, mine = (torch.from_numpy(a) for a in res[name])
            assert torch.equal(whole, ref), (name, rank)
            part = Shard.split(shape, dim, world, rank, offset).take(ref)
            assert torch.equal(mine, part), (name, rank)
    # a rank with no samples (2 over 3 ranks) returns an empty part and still gathers everything
    if world == 3:
        assert per_rank[2]["dp/ddpm/empty-rank"][1].shape == (0, 3, 4)
        assert all("every rank needs at least one" in res["too-few"] for res in per_rank.values())


# -- failures -------------------------------------------------------------------------------------------

def fail_on_rank_1(rank, world, mode):
    def model(x, t):
        if rank == 1 and int(t[0]) < 700:  # the second step
            if mode == "raise":
                raise RuntimeError("rank 1 model failed")
            time.sleep(60)  # a rank that hangs
        return pointwise(x, t)

    return fdd.sample(model, BATCH, sampler="ddpm", steps=STEPS, seed=1).numpy()


@pytest.mark.parametrize("mode", ["raise", "hang"])
def test_a_failing_rank_is_reported_not_waited_on(tmp_path, mode):
    t0 = time.monotonic()
    out = run_ranks(tmp_path, 2, fail_on_rank_1, mode, timeout_s=3.0, deadline_s=40.0)
    elapsed = time.monotonic() - t0
    # rank 0 waits in the all-gather for a peer that never comes: the closed connection of a rank
    # that died, or the collective's timeout for one that hangs, ends it with an error, well
    # before the 60 s the hung rank sleeps
    assert out[0][0] == "error", out[0]
    if mode == "raise":
        assert out[1][0] == "error" and "rank 1 model failed" in out[1][1]
    else:
        assert out[1][0] == "hung"
        assert "timed out" in out[0][1].lower(), out[0][1]
    assert elapsed < 30, elapsed


# -- errors that need no second process -------------------------------------------------------------------

def test_errors_name_the_constraint(tmp_path):
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        fdd.sample(pointwise, BATCH)
    store = tmp_path / "store-1"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=10))
    try:
        with pytest.raises(ValueError, match="not None"):
            fdd.sample(pointwise, SEQ, dim=None, steps=2)
        with pytest.raises(ValueError, match="progress and callback need the eager loop"):
            fdd.sample(pointwise, BATCH, steps=2, cuda_graph=True, progress=True)
        # one rank: the whole batch, the same bits as fastdiff.sample
        assert torch.equal(fdd.sample(pointwise, BATCH, sampler="ddpm", steps=2, seed=4),
                           fastdiff.sample(pointwise, BATCH, sampler="ddpm", steps=2, seed=4))
    finally:
        dist.destroy_process_group()


# -- the command line under torchrun -------------------------------------------------------------------------

def test_fastdiff_sample_under_torchrun(tmp_path):
    """Two ranks write their shards, rank 0 merges them into the PNG one process writes (32 samples
    each: per-rank batches at which the demo UNet's convolutions give the batch's bits)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    args = ["sample", "--sampler", "ddpm", "--steps", "2", "--num-samples", "64", "--seed", "5"]
    assert cli.main([*args, "--out", str(tmp_path / "one.png")]) == 0  # one process: this one
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--standalone", "-m", "fastdiff.cli", *args, "--out", str(tmp_path / "two.png")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert two.returncode == 0, two.stderr
    assert (tmp_path / "two.png").read_bytes() == (tmp_path / "one.png").read_bytes()
    assert "2 ranks" in two.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.png", "two.png"]  # shards merged and removed
