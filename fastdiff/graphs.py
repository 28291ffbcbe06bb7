"""CUDA-graph sampling loops: the whole loop (every model call and every fused step) captured once
and replayed.

``Sampler.loop`` already runs with no host value that changes from step to step: the timesteps,
the step ids and the seed are device tensors and the step reads its coefficients from a device
table. So the loop can be recorded as one CUDA graph and replayed for a new seed by writing that
seed into the graph's static seed tensor. ::

    runner = fastdiff.graphs.GraphedSampler(fastdiff.DDIMSampler(steps=50), unet)
    a = runner((16, 3, 32, 32), seed=0, device="cuda")   # warm-up, capture, replay
    b = runner((16, 3, 32, 32), seed=1, device="cuda")   # replay only
    # or: fastdiff.sample(unet, (16, 3, 32, 32), cuda_graph=True, device="cuda")

Design (after stable-fast's graph runner, without host scalars in the key):

* **Static buffers.** Each graph owns a seed tensor (int64 [1]) and the sample buffer x; the loop
  runs in place on x. A call writes the seed with ``fill_`` (a device write, no re-capture) and
  replays. A guided sampler's graph also owns its guidance scale w (float32 [1]), written the same
  way from the call's ``guidance_scale`` (or the sampler's): a new w needs no re-capture.
* **Initial noise inside the graph.** When ``shape`` is given, x_T is drawn by
  ``fastdiff.engine.kernels.philox.randn`` from the static seed tensor as the graph's first node, so one
  call is one ``fill_`` and one replay. When ``x`` is given, it is copied into the static buffer
  before the replay (a graph of its own kind: the key says which).
* **The key** holds everything the recorded kernels depend on and nothing that changes per call:
  shape, dtype, device, sample_offset and the shard (the kernels take the global index of x[0]
  and a shard's runs as launch arguments), how x_T is made, the model's identity,
  ``sampler.graph_key()`` (its class, step options, coefficient table by value and held
  callables by identity), the resolved backend and the autocast state. The seed, the guidance
  scale and the values of x are not in it (whether guidance is on, and its rescale, are: they are
  step options).
* **Warm-up on a side stream** before capture (Triton compiles its kernels, libraries create
  their handles), then capture into a memory pool (``torch.cuda.graph_pool_handle``) shared by
  every graph of one cache. Graphs of one cache must be replayed on one stream at a time, which
  is what the calls here do; the buffers that outlive a replay are allocated outside the pool.
* **Release**: ``reset()`` (or leaving a ``with`` block) drops every graph, its buffers and the
  pool; a cache holds at most ``max_graphs`` graphs and drops the least recently used one.

The graph holds strong references to the model and the sampler it was recorded with (their
tensors are baked into the graph) until it is released. Samplers are immutable, so a graph can
never replay a configuration its sampler no longer has. The loop runs without autograd. Nothing here is thread-safe.

On a device other than CUDA the same calls run the eager loop and warn once (per runner; once
per process for ``cuda_graph=True``), with the same samples.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings
import weakref
from collections import OrderedDict
from typing import Optional, Sequence

import torch

from .engine import backend as _backend
from .samplers.base import Sampler, check_sample_args, check_shard
from .samplers.registry import make_sampler

__all__ = ["GraphCache", "GraphFallbackWarning", "GraphedSampler", "reset", "sample_graphed"]


class GraphFallbackWarning(UserWarning):
    """cuda_graph=True was asked for on a device without CUDA graphs; the loop ran eagerly."""


# -- keys -----------------------------------------------------------------------------------------

# Each distinct sampler key gets a small int, so that a call hashes a short key rather than the
# whole configuration (tuples do not cache their hash).
_SAMPLER_KEY_IDS: dict = {}
_SAMPLER_IDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _sampler_key(sampler: Sampler) -> int:
    """A small int per distinct ``sampler.graph_key()`` (class, step options, table by value,
    held callables by identity); samplers are immutable, so it is computed once per object."""
    try:
        return _SAMPLER_IDS[sampler]
    except (KeyError, TypeError):
        pass
    key = _SAMPLER_KEY_IDS.setdefault(sampler.graph_key(), len(_SAMPLER_KEY_IDS))
    try:
        _SAMPLER_IDS[sampler] = key
    except TypeError:
        pass
    return key


def _model_key(model):
    # A (network, head) pair passed as a tuple is a new tuple on each call: key by its members.
    if isinstance(model, (tuple, list)):
        return tuple(id(m) for m in model)
    return id(model)


def _model_name(model) -> str:
    if isinstance(model, (tuple, list)):
        return "(" + ", ".join(_model_name(m) for m in model) + ")"
    name = getattr(model, "__qualname__", None) or getattr(model, "__name__", None)
    return name if isinstance(name, str) else type(model).__name__


def _caller_stacklevel() -> int:
    """The stacklevel of the first frame outside this package, so a warning names the user's line
    whichever entry point (GraphedSampler, Sampler.sample, fastdiff.sample) led here."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


# -- capture (module functions so that tests without a GPU can stand in for them) -----------------

def _graphs_available(device: torch.device) -> bool:
    return device.type == "cuda"


def _on_device(device: torch.device):
    """Make ``device`` current where it is not already (capture and replay use the current one)."""
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _warm_up(body, device: torch.device, iterations: int) -> None:
    """Run ``body`` eagerly on a side stream: Triton compiles, cuBLAS/cuDNN create handles and
    workspaces, the caching allocator sees the loop's allocations, all outside the capture."""
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        for _ in range(iterations):
            body()
    current.wait_stream(side)


def _record(body, device: torch.device, pool):
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        body()
    return graph


def capture_failure_message(model, exc: BaseException) -> str:
    return (
        f"the sampling loop with model {_model_name(model)} could not be captured in a CUDA graph "
        f"({type(exc).__name__}: {exc}). A graphed model must not synchronise with the host (.item(), "
        ".cpu(), .tolist(), .nonzero(), boolean-mask indexing, printing tensors, Python branches on "
        "tensor values) and must keep its shapes fixed from call to call. Run the loop eagerly "
        "instead: cuda_graph=False (fastdiff.sample / Sampler.sample), or call the sampler directly "
        "rather than through GraphedSampler.")


class _Graph:
    """One captured loop and its static buffers."""

    __slots__ = ("graph", "x", "seed", "model", "sampler", "scale")

    def __init__(self, graph, x, seed, model, sampler, scale=None):
        self.graph, self.x, self.seed, self.model, self.sampler = graph, x, seed, model, sampler
        self.scale = scale

    def release(self) -> None:
        reset = getattr(self.graph, "reset", None)
        if reset is not None:
            reset()
        self.graph = self.x = self.seed = self.model = self.sampler = self.scale = None


class GraphCache:
    """Captured loops keyed by everything that changes the graph (see the module docstring).

    ``warmup``: eager loops on a side stream before capture (>= 1: kernels must be compiled
    before recording). ``max_graphs``: graphs kept, least recently used dropped first.
    ``pool``: a ``torch.cuda.graph_pool_handle()`` to share with other caches (by default each
    cache makes its own, per device)."""

    def __init__(self, *, warmup: int = 1, max_graphs: int = 8, pool=None):
        if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1 (kernels must be compiled before capture), got {warmup!r}")
        if not isinstance(max_graphs, int) or isinstance(max_graphs, bool) or max_graphs < 1:
            raise ValueError(f"max_graphs must be an int >= 1, got {max_graphs!r}")
        self.warmup = warmup
        self.max_graphs = max_graphs
        self._shared_pool = pool
        self._pools = {}
        self._graphs: "OrderedDict[tuple, _Graph]" = OrderedDict()
        self._warned = False
        self.captures = 0  # how many graphs this cache has recorded (a re-capture counts again)

    def __len__(self) -> int:
        return len(self._graphs)

    def key(self, sampler: Sampler, model, shape: Sequence[int], dtype: torch.dtype, device,
            sample_offset: int = 0, given_x: bool = False, shard=None) -> tuple:
        """The cache key of a call: no seed, no tensor values, nothing that changes per step."""
        device = _backend.canonical_device(device)
        autocast = (torch.is_autocast_enabled(device.type),
                    torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None)
        return (tuple(int(s) for s in shape), dtype, device, int(sample_offset), bool(given_x),
                _model_key(model), _sampler_key(sampler), _backend.resolve(sampler.backend, device),
                autocast, shard)

    def _pool(self, device: torch.device):
        if self._shared_pool is not None:
            return self._shared_pool
        if device not in self._pools:
            self._pools[device] = torch.cuda.graph_pool_handle()
        return self._pools[device]

    def _capture(self, sampler: Sampler, model, shape, dtype, device, sample_offset, x, shard=None,
                 guidance_scale=None) -> _Graph:
        static_x = torch.empty(shape, device=device, dtype=dtype)
        seed = torch.zeros(1, dtype=torch.int64, device=device)
        scale = None if guidance_scale is None else torch.full((1,), guidance_scale, dtype=torch.float32,
                                                               device=device)
        if x is not None:
            static_x.copy_(x)  # warm up on real data, not on uninitialised memory
        # Tables are made on the current stream before the side stream or the capture touches them.
        sampler.device_state(device)
        noise_index = shard.noise_index if shard is not None else {
            "index_offset": sample_offset * math.prod(shape[1:])}

        def body():
            if x is None:
                sampler.initial_noise(shape, seed, out=static_x, **noise_index)
            sampler.loop(model, static_x, seed, sample_offset=sample_offset, shard=shard, guidance_scale=scale)

        with torch.no_grad(), _on_device(device):
            _warm_up(body, device, self.warmup)  # errors here are the model's own: let them through
            try:
                graph = _record(body, device, self._pool(device))
            except Exception as exc:
                raise RuntimeError(capture_failure_message(model, exc)) from exc
        self.captures += 1
        return _Graph(graph, static_x, seed, model, sampler, scale)

    def run(self, sampler: Sampler, model, shape=None, *, x: Optional[torch.Tensor] = None, seed: int = 0,
            sample_offset: int = 0, shard=None, device=None, dtype: torch.dtype = torch.float32, copy: bool = True,
            progress: bool = False, callback=None, guidance_scale: Optional[float] = None) -> torch.Tensor:
        """Samples as ``sampler.sample(model, shape, x=x, seed=seed, ...)`` would give them, by graph
        replay on CUDA. ``copy=False`` returns the graph's own output buffer, which the next call
        with the same key overwrites. ``guidance_scale``: w of a guided sampler for this call
        (default the sampler's), written into the graph's scale tensor: no re-capture."""
        if not isinstance(sampler, Sampler):
            raise TypeError(f"sampler must be a fastdiff Sampler, got {type(sampler).__name__}")
        w = sampler.guidance_value(guidance_scale)
        if progress or callback is not None:
            raise ValueError("progress and callback need the eager loop: a CUDA graph replays the recorded "
                             "kernels without running Python between steps; use cuda_graph=False")
        if shard is not None:
            shape = check_shard(sampler, shard, shape, x, sample_offset)
        shape, device, dtype = check_sample_args(shape, x, seed, sample_offset, device, dtype)
        device = _backend.canonical_device(device)
        if not _graphs_available(device):
            if not self._warned:
                self._warned = True
                warnings.warn(f"fastdiff: CUDA graphs need a CUDA device, got {device}; the sampling loop runs "
                              "eagerly (same samples, no graph). This warning is shown once.",
                              GraphFallbackWarning, stacklevel=_caller_stacklevel())
            return sampler.sample(model, shape, x=x, seed=seed, sample_offset=sample_offset, shard=shard,
                                  device=device, dtype=dtype, guidance_scale=w)
        key = self.key(sampler, model, shape, dtype, device, sample_offset, x is not None, shard)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(sampler, model, shape, dtype, device, sample_offset, x, shard, w)
            self._graphs[key] = entry
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)[1].release()
        else:
            self._graphs.move_to_end(key)
        with torch.no_grad(), _on_device(device):
            entry.seed.fill_(int(seed))  # a device write on the current stream: no capture, no sync
            if entry.scale is not None:
                entry.scale.fill_(w)
            if x is not None:
                entry.x.copy_(x)
            entry.graph.replay()
            return entry.x.clone() if copy else entry.x

    def reset(self) -> None:
        """Release every graph, its static buffers and this cache's memory pools."""
        while self._graphs:
            self._graphs.popitem(last=False)[1].release()
        self._pools.clear()


class GraphedSampler:
    """A sampler and a model bound into a reusable graphed sampling function.

    ``GraphedSampler(sampler, model)(shape, seed=..., device="cuda")`` returns what
    ``sampler.sample(model, shape, seed=...)`` returns, bit for bit, by replaying one CUDA graph
    per (shape, dtype, device, sample_offset, x_T given or drawn). ``sampler`` is a Sampler or a
    name for ``fastdiff.make_sampler`` (then ``sampler_kwargs`` configure it). Use it as a context
    manager, or call ``reset()``, to free the graphs. On a non-CUDA device it runs eagerly and
    warns once.

    A guided sampler's scale w is read from a device tensor of the graph: set
    ``runner.guidance_scale = 5.0`` (or pass ``guidance_scale=`` to one call) and the next replay
    uses it without re-capture; ``None`` goes back to the sampler's own."""

    def __init__(self, sampler, model, *, warmup: int = 1, max_graphs: int = 8, pool=None, **sampler_kwargs):
        if isinstance(sampler, str):
            sampler = make_sampler(sampler, **sampler_kwargs)
        elif sampler_kwargs:
            raise TypeError(f"sampler options {sorted(sampler_kwargs)} need a sampler name, not a Sampler object")
        if not isinstance(sampler, Sampler):
            raise TypeError(f"sampler must be a fastdiff Sampler or a sampler name, got {type(sampler).__name__}")
        if model is None or not callable(model) and not isinstance(model, (tuple, list)):
            raise TypeError(f"model must be callable as model(x_t, t), got {type(model).__name__}")
        self.sampler = sampler
        self.model = model
        self.cache = GraphCache(warmup=warmup, max_graphs=max_graphs, pool=pool)
        self._guidance_scale = None

    @property
    def guidance_scale(self) -> Optional[float]:
        """w of the next replays (a guided sampler): the value set here, else the sampler's."""
        return self.sampler.guidance_value(self._guidance_scale)

    @guidance_scale.setter
    def guidance_scale(self, value: Optional[float]) -> None:
        self._guidance_scale = None if value is None else self.sampler.guidance_value(value)

    def __call__(self, shape: Optional[Sequence[int]] = None, *, x: Optional[torch.Tensor] = None, seed: int = 0,
                 sample_offset: int = 0, shard=None, device=None, dtype: torch.dtype = torch.float32,
                 copy: bool = True, guidance_scale: Optional[float] = None) -> torch.Tensor:
        return self.cache.run(self.sampler, self.model, shape, x=x, seed=seed, sample_offset=sample_offset,
                              shard=shard, device=device, dtype=dtype, copy=copy,
                              guidance_scale=self._guidance_scale if guidance_scale is None else guidance_scale)

    sample = __call__

    @property
    def captures(self) -> int:
        return self.cache.captures

    def __len__(self) -> int:
        return len(self.cache)

    def reset(self) -> None:
        self.cache.reset()

    def __enter__(self) -> "GraphedSampler":
        return self

    def __exit__(self, *exc) -> None:
        self.reset()

    def __repr__(self) -> str:
        return f"GraphedSampler({self.sampler!r}, model={_model_name(self.model)}, graphs={len(self)})"


_DEFAULT = GraphCache()


def sample_graphed(sampler: Sampler, model, shape=None, **kw) -> torch.Tensor:
    """``fastdiff.sample(..., cuda_graph=True)``: replays from the process-wide cache, so repeated
    calls with equal settings capture once. ``fastdiff.graphs.reset()`` releases it."""
    return _DEFAULT.run(sampler, model, shape, **kw)


def reset() -> None:
    """Release the graphs of the process-wide cache used by ``cuda_graph=True``."""
    _DEFAULT.reset()
