"""The sampler base: a configuration becomes a float64 coefficient table; the loop calls the
model and the one step (fastdiff.engine.step), nothing else.

Model convention: ``model(x_t, t) -> output`` where ``t`` is a tensor of shape [batch] holding
the timestep (int64 discrete timesteps on the VP path, float32 sigma * num_train_timesteps on
the flow path, as diffusers' schedulers hand them) and ``output`` has x_t's shape and is read as
``prediction_type``. With classifier-free guidance (a sampler made with ``guidance_scale``) the
model is called on the doubled batch [x_t; x_t] with [2 batch] timesteps and returns [2 batch, ...],
the unconditional outputs first (diffusers' ``noise_pred.chunk(2)`` order); a model taking (x, t)
that knows its own conditioning is enough. The step combines the halves (fastdiff.engine.step).

Between the first and the last model call the loop does no host sync: timesteps, the step index
and the seed are device tensors, the step reads its coefficients from the device table, and the
noise is drawn inside the kernel.

Samplers are immutable: the table is built from the configuration, so changing ``eta`` or
``timesteps`` afterwards would silently sample with the old table. Make a new sampler instead.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch

from ..engine.checks import check_device, check_int, check_real
from ..engine.predictions import check_prediction
from ..engine.shard import Shard
from ..engine.step import StepOptions, step
from ..engine.tables import Table
from ..engine.kernels import philox


def _freezing(init):
    """Wrap an ``__init__`` so that public attributes can be set only while some ``__init__`` of
    the object runs (a subclass's init calls its parent's: the object freezes when the outermost
    returns)."""

    @functools.wraps(init)
    def wrapped(self, *args, **kwargs):
        depth = self.__dict__.get("_init_depth", 0)
        object.__setattr__(self, "_init_depth", depth + 1)
        try:
            init(self, *args, **kwargs)
        finally:
            object.__setattr__(self, "_init_depth", depth)

    return wrapped


class Sampler:
    """Base class of every sampler: the step options, the timesteps the model sees, the table,
    the loop. Subclasses (one per path: fastdiff.samplers.vp, fastdiff.samplers.flow) set the
    timesteps in their constructor, define ``name`` and ``_host_table()`` (float64 numpy
    [K, NCOL] from fastdiff._C) and may override ``_call_model`` for extra inputs (e.g. a
    covariance head). ``timestep_dtype`` is what the model gets: int64 discrete timesteps on the
    VP path (diffusers' convention), float32 sigma * N on the flow path.
    """

    name = "base"
    var_mode = "table"
    timestep_dtype = torch.int64
    history_slots = 0  # multistep solvers: how many previous x0_hat (columns c_h0, c_h1, ...) a step reads
    history_output = "x0"  # what a step writes for the next ones: "x0" (x0_hat) or "eps" (eps_hat)
    init_noise_sigma = 1.0  # the scale of x_T
    scaled_input = False  # sigma space: the model sees c_in x, which each step writes for the next

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "__init__" in cls.__dict__:
            cls.__init__ = _freezing(cls.__dict__["__init__"])

    def __setattr__(self, name, value):
        if not name.startswith("_") and self.__dict__.get("_init_depth", 0) == 0:
            raise AttributeError(
                f"{type(self).__name__}.{name} cannot change after construction: the sampler's coefficient "
                f"table is built from its configuration. Make a new sampler, e.g. "
                f"{type(self).__name__}(..., {name}=...)")
        object.__setattr__(self, name, value)

    @_freezing
    def __init__(
        self,
        *,
        prediction_type: str = "epsilon",
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        use_clipped_model_output: bool = False,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        guidance_scale: Optional[float] = None,
        guidance_rescale: float = 0.0,
        backend: Optional[str] = None,
    ):
        check_prediction(prediction_type)
        if clip_sample:
            clip_sample_range = check_real("clip_sample_range", clip_sample_range, 0, lo_open=True)
        if guidance_scale is not None:
            guidance_scale = check_real("guidance_scale (None for no guidance)", guidance_scale)
        elif guidance_rescale:
            raise ValueError("guidance_rescale needs guidance_scale (classifier-free guidance on the doubled batch)")
        self.options = StepOptions(
            prediction_type=prediction_type, clip_range=clip_sample_range if clip_sample else None,
            thresholding=bool(thresholding), dynamic_thresholding_ratio=dynamic_thresholding_ratio,
            sample_max_value=sample_max_value, recompute_eps=bool(use_clipped_model_output),
            var_mode=self.var_mode, guidance=guidance_scale is not None, guidance_rescale=guidance_rescale)
        # The default w of a call; not in the graph key: a replay reads w from a device tensor.
        self.guidance_scale = guidance_scale
        self.backend = backend
        self.uses_noise = True  # whether steps draw noise (DDIM with eta = 0 does not)

    def _set_timesteps(self, timesteps: np.ndarray) -> None:
        """For subclass constructors: the timesteps the model is called with, one per step."""
        timesteps.setflags(write=False)
        self.timesteps = timesteps
        self.steps = len(timesteps)

    def _replace_options(self, **changes) -> None:
        """For subclass constructors: the base's options with some fields changed."""
        self.options = dataclasses.replace(self.options, **changes)

    # -- configuration read back ------------------------------------------------------------
    @property
    def prediction_type(self) -> str:
        return self.options.prediction_type

    @property
    def clip_range(self) -> Optional[float]:
        return self.options.clip_range

    @property
    def thresholding(self) -> bool:
        return self.options.thresholding

    @property
    def guidance_rescale(self) -> float:
        return self.options.guidance_rescale

    def guidance_value(self, scale=None) -> Optional[float]:
        """The w a call uses: ``scale`` if given (a guided sampler only), else the sampler's own;
        None for a sampler made without guidance."""
        if scale is None:
            return self.guidance_scale
        if not self.options.guidance:
            raise ValueError(f"guidance_scale={scale!r} was given for a sampler made without guidance; make it with "
                             f"guidance_scale=... (the model is then called on the doubled batch)")
        return check_real("guidance_scale", scale)

    # -- tables ---------------------------------------------------------------------------
    def _host_table(self) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def table(self) -> Table:
        """The coefficient table [steps, NCOL] (columns: ``fastdiff.COLUMNS``), built once."""
        t = self.__dict__.get("_table")
        if t is None:
            t = Table(self._host_table(), rows="step", backend=self.backend)
            self._table = t
        return t

    def device_state(self, device: torch.device):
        """(table fp32 [K, NCOL], timesteps int64 [K], step ids int32 [K]) on ``device``, cached."""
        device = torch.device(device)
        cache: Dict[torch.device, tuple] = self.__dict__.setdefault("_device_cache", {})
        if device not in cache:
            ts = torch.from_numpy(np.array(self.timesteps)).to(device=device, dtype=self.timestep_dtype)
            ids = torch.arange(self.steps, dtype=torch.int32, device=device)
            cache[device] = (self.table.on(device), ts, ids)
        return cache[device]

    def graph_key(self) -> tuple:
        """What a captured loop of this sampler depends on: its class, its step options and
        table (by value), whether it draws noise, its backend preference, and the identity of
        any callable it holds."""
        return (type(self).__module__, type(self).__qualname__, self.options, self.table.key, self.uses_noise,
                self.steps, self.backend) + self._extra_key()

    def _extra_key(self) -> tuple:
        return ()

    # -- the loop ---------------------------------------------------------------------------
    def _call_model(self, model, x, t):
        """Returns (model_output, aux) where aux feeds var_mode (None for the table std)."""
        return model(x, t), None

    def loop(self, model, x: torch.Tensor, seed: torch.Tensor, *, sample_offset: int = 0,
             shard: Optional[Shard] = None, progress: bool = False,
             callback: Optional[Callable] = None, guidance_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run every step in place on ``x`` (the graph runner captures exactly this); ``x`` is
        ``shard`` of the full latent when one is given. With guidance the model gets the doubled
        batch and ``guidance_scale`` is w, a one-element float32 tensor on x's device (None: the
        sampler's w), which the graph runner rewrites between replays."""
        table, ts, ids = self.device_state(x.device)
        noise_index = shard.noise_index if shard is not None else {}
        batch, guided = x.shape[0], self.options.guidance
        if guidance_scale is not None and not guided:
            raise ValueError("guidance_scale was given for a sampler made without guidance")
        # The model gets its own copy of the timesteps (one [K, B] tensor per run): a model that
        # edits t in place cannot change the sampler's timesteps.
        t_rows = ts.unsqueeze(1).repeat(1, 2 * batch if guided else batch)
        steps: Sequence[int] = range(self.steps)
        if progress:
            from tqdm.auto import tqdm
            steps = tqdm(steps, desc=f"fastdiff {self.name}", total=self.steps)
        noise_seed = seed if self.uses_noise else None
        # A multistep solver reads the previous steps' x0_hat (or eps_hat: history_output) and writes
        # this step's: history_slots + 1 float32 buffers used in turn, slot i % n written at step i
        # (zeros first: the first rows' history coefficients are 0, and 0 * NaN from uninitialised
        # memory would not be).
        n_buf = self.history_slots + 1
        hist = [torch.zeros(x.shape, dtype=torch.float32, device=x.device) for _ in range(n_buf)] \
            if self.history_slots else None
        hist_out = self.history_output + "_out"
        # Sigma space: one pass makes the first scaled input; every step writes the next one.
        model_in = x * self.first_input_scale if self.scaled_input else None
        state, pair = x, None
        if guided:
            # The doubled model input [x; x] is one buffer: the step writes its first half (the state,
            # or in sigma space the scaled input) and one copy per step fills the second, half the
            # traffic of a torch.cat and no allocation per step (16x4x64x64 float32, one CPU thread:
            # 18 us against torch.cat's 45 us).
            pair = x.new_empty((2 * batch,) + tuple(x.shape[1:]))
            first, second = pair[:batch], pair[batch:]
            if model_in is None:
                state = first.copy_(x)
            else:
                model_in = first.copy_(model_in)
            if guidance_scale is None:
                guidance_scale = torch.full((1,), self.guidance_scale, dtype=torch.float32, device=x.device)
        for i in steps:
            t = t_rows[i]
            if guided:
                second.copy_(first)
            model_output, aux = self._call_model(model, pair if guided else x if model_in is None else model_in, t)
            extra = {}
            if guided:
                model_output, extra["guidance_cond"], aux = guided_halves(model_output, aux, batch)
                extra["guidance_scale"] = guidance_scale
            if hist is not None:
                extra["history"] = tuple(hist[(i - 1 - k) % n_buf] for k in range(self.history_slots))
                extra[hist_out] = hist[i % n_buf]
            if model_in is not None:
                extra["model_in_out"] = model_in
            step(state, model_output, self.table, ids[i], self.options, seed=noise_seed, sample_offset=sample_offset,
                 aux=aux, out=state, **extra, **noise_index)
            if callback is not None:
                callback(i, t[:batch], state)
        if state is not x:
            x.copy_(state)
        return x

    def sample(self, model, shape: Optional[Sequence[int]] = None, *, x: Optional[torch.Tensor] = None,
               seed: int = 0, sample_offset: int = 0, shard: Optional[Shard] = None, device=None,
               dtype: torch.dtype = torch.float32, progress: bool = False,
               callback: Optional[Callable] = None, guidance_scale: Optional[float] = None) -> torch.Tensor:
        """Draw samples eagerly. Either ``shape`` (initial noise drawn from ``seed``) or ``x``
        (x_T given). For a CUDA graph use ``fastdiff.sample(..., cuda_graph=True)`` or
        ``fastdiff.GraphedSampler``. ``guidance_scale``: w for this call (a sampler made with
        guidance; default its own).

        ``sample_offset`` is the global index of the first sample of this batch: a batch split
        into calls with matching offsets gives exactly the samples of one call.
        ``shard`` (a ``fastdiff.engine.shard.Shard`` along a dimension; then ``shape`` may be
        omitted): x is that part of a larger latent and draws exactly its part of the latent's
        noise; the model is called on the shard (a sequence-parallel model gathers what it needs).
        ``callback(i, t, x)`` runs after each step (it must not sync the host to stay fast; an edit
        of x in place is the next step's x_t, which for "unipc" is also its corrector's base: see
        fastdiff/samplers/unipc.py).
        """
        if shard is not None:
            shape = check_shard(self, shard, shape, x, sample_offset)
        shape, device, dtype = check_sample_args(shape, x, seed, sample_offset, device, dtype)
        seed, sample_offset = check_int("seed", seed), check_int("sample_offset", sample_offset)
        seed_t = torch.tensor([seed], dtype=torch.int64, device=device)
        w = self.guidance_value(guidance_scale)
        scale_t = None if w is None else torch.tensor([w], dtype=torch.float32, device=device)
        if x is None:
            per_sample = math.prod(shape[1:])
            noise_index = shard.noise_index if shard is not None else {"index_offset": sample_offset * per_sample}
            x = self.initial_noise(shape, seed_t, device=device, dtype=dtype, **noise_index)
        else:
            x = x.clone(memory_format=torch.contiguous_format)
        return self.loop(model, x, seed_t, sample_offset=sample_offset, shard=shard, progress=progress,
                         callback=callback, guidance_scale=scale_t)

    __call__ = sample

    def initial_noise(self, shape, seed: torch.Tensor, *, device=None, dtype=torch.float32,
                      out: Optional[torch.Tensor] = None, **noise_index) -> torch.Tensor:
        """x_T for this sampler: Philox normals keyed by seed and global index (stream STREAM_INIT;
        ``noise_index``: philox.randn's index_offset / index_run), times ``init_noise_sigma`` (1 on
        the VP and flow paths, sigma_max in sigma space)."""
        x = philox.randn(shape, seed, stream=philox.STREAM_INIT, device=device, dtype=dtype, out=out,
                         backend=self.backend, **noise_index)
        if self.init_noise_sigma != 1.0:
            x.mul_(self.init_noise_sigma)  # a host float: no sync, capturable
        return x

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(steps={self.steps}, prediction_type={self.prediction_type!r}, "
                f"{getattr(self, 'schedule', None)})")


def guided_halves(output, aux, batch: int) -> tuple:
    """(u, c, aux) of a guided model call on the doubled batch: the unconditional and conditional
    halves of ``output`` (views, no copy) and the conditional half of ``aux`` (a covariance head
    or variance output, read from the conditional half as diffusers' pipelines read a learned
    variance from the text half)."""
    for name, t in (("output", output), ("covariance head / variance output", aux)):
        if t is not None and (not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != 2 * batch):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"with guidance the model is called on the doubled batch ({2 * batch} samples: x twice) "
                             f"and its {name} must have {2 * batch} samples, the unconditional half first; got {got}")
    return output[:batch], output[batch:], None if aux is None else aux[batch:]


def check_shard(sampler: Sampler, shard, shape, x, sample_offset) -> tuple:
    """Validate a shard given to ``Sampler.sample``; returns the local shape."""
    if not isinstance(shard, Shard):
        raise TypeError(f"shard must be a fastdiff.engine.shard.Shard, got {type(shard).__name__}")
    if shard.dim is None:
        raise ValueError("a sampler calls the model on x_t with a batch dimension: give a shard along a "
                         "dimension (Shard(..., dim=d, ...)), not a flattened range (dim=None, for fastdiff.step)")
    if sample_offset:
        raise ValueError(f"with a shard, its sample_offset places the batch (Shard(..., sample_offset=...)); "
                         f"got sample_offset={sample_offset} as well")
    local = shard.local_shape
    given = tuple(x.shape) if isinstance(x, torch.Tensor) else (tuple(shape) if shape is not None else local)
    if given != local:
        raise ValueError(f"x_T must have the shard's shape {local} (of {shard.full_shape}), got {given}")
    if sampler.options.thresholding and not shard.whole_samples:
        raise ValueError("dynamic thresholding takes a quantile over each whole sample, which a shard along "
                         f"dim {shard.dim} does not hold; shard along dim 0 or turn thresholding off")
    return local


def check_sample_args(shape, x, seed, sample_offset, device, dtype):
    """Validate the arguments of ``Sampler.sample``; returns (shape, device, dtype) of x_T."""
    if x is None:
        if shape is None:
            raise ValueError("give shape (to draw x_T from the seed) or x (x_T itself)")
        if isinstance(shape, (str, bytes, int, float, torch.Tensor)) or not hasattr(shape, "__iter__"):
            raise ValueError(f"shape must be a tuple of ints with the batch first, such as (4, 3, 32, 32), got "
                             f"{shape!r}")
        shape = tuple(shape)
        try:
            sizes = tuple(check_int("shape entries", s, 1) for s in shape)
        except ValueError:
            sizes = ()
        if not sizes:
            raise ValueError(f"shape must be a non-empty tuple of positive sizes (ints), such as (4, 3, 32, 32), "
                             f"got {shape}")
        shape = sizes
        device = check_device(device)
    else:
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            raise ValueError("x must be a tensor with a batch dimension")
        if shape is not None and tuple(shape) != tuple(x.shape):
            raise ValueError(f"shape {tuple(shape)} does not match x's shape {tuple(x.shape)}")
        device, dtype = x.device, x.dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    check_int("seed", seed, 0, 2**63, hi_open=True)
    check_int("sample_offset", sample_offset, 0, 2**62, hi_open=True)
    return (tuple(x.shape) if x is not None else shape), device, dtype
