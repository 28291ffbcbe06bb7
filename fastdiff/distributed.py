"""Sampling across processes with torch.distributed, with exactly the samples of one process.

fastdiff's noise is a function of (seed, global element index, step) (invariant 3 of
docs/design.md), so any split of a latent across processes draws, on each process, exactly its
part of the single-process noise, without moving noise between processes. Two splits:

* **Data parallel** (``dim=0``, the default): each rank samples its part of the batch, with the
  global index of its first sample as the noise offset. ::

      # torchrun --nproc-per-node 4 gen.py
      torch.distributed.init_process_group()          # or fastdiff.distributed.init_from_env()
      x = fastdiff.distributed.sample(unet, (1000, 4, 64, 64), sampler="ddpm", steps=50, seed=0,
                                      device="cuda", cuda_graph=True)   # all 1000 on every rank
      mine = fastdiff.distributed.sample(..., gather=False)             # this rank's part only

  The batch is cut into near-equal parts, the longer ones first (5 samples over 3 ranks: 2, 2,
  1; over 6 ranks the last gets none and still takes part in the gather). ``gather=True``
  all-gathers the parts, padded to the longest, and cuts the padding off.

* **Sharded latents** (``dim=d``): each rank holds a slice of every sample along dimension d
  (the token dimension under sequence / context parallelism, image rows under patch
  parallelism) and the model is called on that slice (a sequence-parallel model exchanges what
  it needs inside, e.g. with all-to-all attention). The step draws exactly that slice of the
  full latent's noise: it is told the slice's global indices (``fastdiff.engine.shard.Shard``:
  an element offset and runs of consecutive indices, one per index of the dimensions before d).
  ``shard_step`` is the one step on a shard, for loops written by hand.

Bit-identical to one process, given a model whose output for a sample does not depend on the
other samples of its batch. fastdiff's part (initial noise, step noise, the step) is exact for
any split; a network may not be: PyTorch's convolutions pick kernels by batch size, and on a
CPU the demo UNet's output for a sample moved by ~1e-6 between a batch of 64 and one of 12,
while per-rank batches of 16, 24, 32, ... gave the same bits (notes/distributed.md).

**diffusers pipelines with context parallelism** (diffusers >= 0.35:
``pipe.transformer.enable_parallelism(config=ContextParallelConfig(ring_degree=2))`` or
``ulysses_degree=2``, under torchrun). The transformer splits its input along the sequence and
gathers its output, so the pipeline, and so the scheduler, see the whole latent on every rank:
every rank runs the scheduler on the whole latent, and the ranks must agree on every random
number. fastdiff's drop-ins plug in unchanged: ::

    from fastdiff.diffusers import FlowMatchEulerDiscreteScheduler
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler.set_noise_seed(1234)       # step noise drawn in-kernel, the same on every rank
    image = pipe(prompt, generator=torch.Generator("cuda").manual_seed(0)).images[0]

The initial latents come from the pipeline's ``generator``: seed it alike on every rank. The
step noise (DDPM, DDIM with eta > 0, ``stochastic_sampling=True``; flow Euler draws none) comes
from ``set_noise_seed`` with no generator state to keep in step, or from the same generator.
Where the latents stay sharded between steps (xDiT's layout, or a hand-written loop that keeps
rank r's slice of the tokens), tell the scheduler which slice it steps, and it draws exactly
that slice of the full latent's noise, so no two shards repeat one noise patch: ::

    shard = fastdiff.distributed.Shard.split(latents_shape, 1, world_size, rank)  # tensor_split's rule
    scheduler.set_noise_seed(1234, shard=shard)    # step() now receives shard.take(latents)
    latents = fastdiff.randn(shard.local_shape, 1234, device="cuda", **shard.noise_index)

Collectives run under the process group's timeout (``init_process_group(timeout=...)``;
``init_from_env`` sets one), so a rank that fails mid-run makes the others raise instead of
waiting for ever.
"""
from __future__ import annotations

import datetime
import os
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from .api import sample as _sample_one
from .engine.shard import Shard
from .engine.step import step as _step
from .samplers.registry import make_sampler

__all__ = ["Shard", "gather_parts", "init_from_env", "sample", "shard_step", "world"]


def world(group=None) -> tuple:
    """(rank, world size) in ``group``; an error naming the missing set-up when there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("fastdiff.distributed needs an initialised torch.distributed process group: call "
                           "torch.distributed.init_process_group(...) (or fastdiff.distributed.init_from_env() "
                           "under torchrun) first")
    return dist.get_rank(group), dist.get_world_size(group)


def init_from_env(device: str = "cpu", *, timeout: float = 600.0) -> torch.device:
    """Initialise the default process group from torchrun's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT), gloo for ``device="cpu"`` and nccl for ``"cuda"``, with
    ``timeout`` seconds on every collective; returns this rank's device (``cuda:LOCAL_RANK``).
    Does nothing but return the device when a group exists already."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing and not dist.is_initialized():
        raise RuntimeError(f"init_from_env reads torchrun's environment, but {', '.join(missing)} "
                           "is not set: launch with torchrun --nproc-per-node N ...")
    dev = torch.device("cpu")
    if device == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout),
                                **({"device_id": dev} if device == "cuda" else {}))
    return dev


def _default_device(group) -> torch.device:
    # NCCL moves CUDA tensors only; gloo and the others sample where the user says (CPU by default).
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sample(model, shape: Optional[Sequence[int]] = None, *, dim: int = 0, gather: bool = True, group=None,
           sampler="ddim", steps: Optional[int] = 50, seed: int = 0, schedule=None,
           x: Optional[torch.Tensor] = None, sample_offset: int = 0, device=None, dtype: torch.dtype = torch.float32,
           progress: bool = False, callback: Optional[Callable] = None, cuda_graph: bool = False,
           **sampler_kwargs) -> torch.Tensor:
    """``fastdiff.sample`` of ``shape`` (the whole batch) split across the ranks of ``group``,
    every rank calling it with the same arguments; the result equals one process's bit for bit
    (module docstring: given a batch-independent model).

    ``dim``: 0 splits the batch (data parallel; ``model`` sees this rank's samples); d > 0 gives
    each rank a slice along d of every sample (``model`` sees the slice: it must be written for
    that, e.g. sequence parallel; every rank needs at least one entry, since such a model calls
    collectives on every rank). ``gather``: every rank returns the whole result (all-gather),
    else its own part (``fastdiff.distributed.Shard.split(shape, dim, world, rank)`` says which).
    ``x``: the whole x_T, the same on every rank (each takes its part). ``sample_offset``: the
    global index of the batch's first sample. ``progress`` shows a bar on rank 0 only.
    ``cuda_graph=True`` captures one graph per rank (its own part's shape and offsets). The other
    keywords are ``fastdiff.sample``'s and the sampler's."""
    rank, size = world(group)
    if cuda_graph and (progress or callback is not None):
        # checked on every rank: rank 0 alone failing (its progress bar) would leave the others in the gather
        raise ValueError("progress and callback need the eager loop: a CUDA graph replays the recorded kernels "
                         "without running Python between steps; use cuda_graph=False")
    if x is not None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a tensor (the whole x_T), got {type(x).__name__}")
        if shape is not None and tuple(shape) != tuple(x.shape):
            raise ValueError(f"shape {tuple(shape)} does not match x's shape {tuple(x.shape)}")
        shape = tuple(x.shape)
    if shape is None:
        raise ValueError("give shape (the whole batch, drawn from the seed) or x (the whole x_T)")
    shard = Shard.split(tuple(shape), dim, size, rank, sample_offset)
    if shard.dim is None:
        raise ValueError("dim must be a dimension of shape (0 for data parallel), not None: the model is "
                         "called on each rank's part, which needs a batch dimension")
    if shard.dim > 0 and shard.full_shape[shard.dim] < size:
        raise ValueError(f"dim {shard.dim} of shape {shard.full_shape} has {shard.full_shape[shard.dim]} entries "
                         f"for {size} ranks: with dim > 0 every rank needs at least one (the model is "
                         "called on every rank)")
    if isinstance(sampler, str):
        s = make_sampler(sampler, schedule, steps, **sampler_kwargs)
    else:
        s = make_sampler(sampler, schedule, **sampler_kwargs)
    if s.options.thresholding and not shard.whole_samples:
        raise ValueError(f"dynamic thresholding takes a quantile over each whole sample, which a slice along "
                         f"dim {shard.dim} does not hold; split along dim 0 or turn thresholding off")
    if device is None:
        device = x.device if x is not None else _default_device(group)
    if shard.length == 0:  # more ranks than samples: nothing to draw, but the gather needs us
        local = torch.empty(shard.local_shape, device=device, dtype=x.dtype if x is not None else dtype)
    else:
        local = _sample_one(model, sampler=s, seed=seed, x=shard.take(x) if x is not None else None, shard=shard,
                            device=device, dtype=dtype, progress=progress and rank == 0, callback=callback,
                            cuda_graph=cuda_graph)
    return gather_parts(local, shard, group) if gather else local


def gather_parts(local: torch.Tensor, shard: Shard, group=None) -> torch.Tensor:
    """The whole tensor from every rank's ``Shard.split`` part along ``shard.dim``, on every rank:
    one all-gather of the parts padded to the longest, then the padding cut off."""
    rank, size = world(group)
    parts = [Shard.split(shard.full_shape, shard.dim, size, r, shard.sample_offset) for r in range(size)]
    if parts[rank] != shard:
        raise ValueError(f"gather concatenates the parts Shard.split gives in rank order; rank {rank} holds "
                         f"{shard}, not {parts[rank]}")
    shard.check_local("this rank's part", local)
    dim = 0 if shard.dim is None else shard.dim
    local = local.reshape(shard.local_shape)
    longest = parts[0]  # the longer parts come first
    if longest.length == shard.length:
        buf = local.contiguous()
    else:
        buf = local.new_zeros(longest.local_shape)
        buf.narrow(dim, 0, shard.length).copy_(local)
    bufs = [torch.empty_like(buf) for _ in range(size)]
    dist.all_gather(bufs, buf, group=group)
    whole = torch.cat([b.narrow(dim, 0, p.length) for b, p in zip(bufs, parts)], dim=dim)
    return whole.reshape(shard.full_shape)



def shard_step(x, model_output, table, index, options=None, *, shard: Shard, **step_kwargs):
    """``fastdiff.step`` on ``shard`` of a larger latent: ``x``, ``model_output`` and every other
    tensor hold that part, and the in-kernel noise (``seed=``) is exactly that part of the
    full latent's noise. Thresholding needs whole samples (it takes a per-sample quantile)."""
    if not isinstance(shard, Shard):
        raise TypeError(f"shard must be a fastdiff.distributed.Shard, got {type(shard).__name__}")
    for name in ("sample_offset", "index_offset", "index_run"):
        if name in step_kwargs:
            raise TypeError(f"shard_step takes the noise placement from the shard; do not pass {name}")
    shard.check_local("x", x)
    thresholding = options.thresholding if options is not None else step_kwargs.get("thresholding", False)
    if thresholding and step_kwargs.get("thresholds") is None and not shard.whole_samples:
        raise ValueError("dynamic thresholding takes a quantile over each whole sample, which this shard does not "
                         "hold: pass thresholds computed over the whole samples, or turn thresholding off")
    return _step(x, model_output, table, index, options, **shard.noise_index, **step_kwargs)
