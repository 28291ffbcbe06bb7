"""What fastdiff's drop-ins for diffusers' ``DDIMScheduler`` and ``DDPMScheduler`` share.

    from fastdiff.diffusers import DDIMScheduler
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)

The classes subclass diffusers' own, so the constructor, the config keys, ``from_config`` /
``from_pretrained`` / ``save_pretrained``, ``_compatibles``, ``betas`` / ``alphas_cumprod``
(float32, computed by diffusers' code: that is what makes the outputs match) and
``isinstance`` checks are diffusers'. What changes is ``set_timesteps`` (timesteps from
fastdiff._C) and ``step``:

* The per-step coefficients come from a float64 table built once per (step count, eta) by
  fastdiff._C from diffusers' float32 ``alphas_cumprod``, uploaded as float32. The table has one
  row per *training* timestep, so the row of a step is the timestep itself: a timestep tensor on
  the GPU indexes the table on the GPU, with no host sync and no host-side tensor math.
* The update is the one step, ``fastdiff.engine.step.step``: one launch of the fused kernel
  (dynamic thresholding adds its per-sample quantile pass). On CPU tensors the plain-torch
  reference of the same update runs.
* Noise: given a ``generator`` (or none), the noise is drawn exactly as diffusers draws it
  (``randn_tensor`` with the same shape, dtype, device and generator, on exactly the steps where
  diffusers draws), so results reproduce diffusers' bit for bit in the noise and to float32
  rounding in the arithmetic. ``variance_noise`` passes through. ``set_noise_seed(seed)``
  switches to counter-based Philox noise drawn inside the kernel: no noise tensor is written
  or read (one pass over memory fewer), no generator state, the same numbers eagerly, in a
  CUDA graph and across batch splits; but it is not diffusers' stream of numbers.

Deliberate differences from diffusers 0.42.1 (see notes/diffusers.md): ``fixed_large_log``
variance gives the fixed_large variance instead of NaN (diffusers takes the square root of a
log); eta < 0 and malformed timesteps raise ValueError; half-precision samples are computed in
float32 and rounded once, where diffusers rounds after every operation.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import List, Optional, Tuple, Union

import numpy as np
import torch

try:
    from diffusers.utils.torch_utils import randn_tensor
except ImportError as exc:  # pragma: no cover - exercised only without diffusers
    raise ImportError(
        "fastdiff.diffusers needs the diffusers package: pip install diffusers (or pip install '.[diffusers]' "
        "in the fastdiff source tree; the PyPI project named fastdiff is an unrelated one) "
        f"({type(exc).__name__}: {exc})") from exc

from ..engine.checks import check_int
from ..engine.predictions import VP_PREDICTIONS
from ..engine.shard import Shard
from ..engine.step import StepOptions, step
from ..engine.tables import Table


# Tables kept per scheduler (one per step count / eta / timestep list; each keeps up to 4 device
# copies of 76 KB in float32).
_MAX_TABLES = 32


def _version_of(t: torch.Tensor) -> Optional[int]:
    """The tensor's in-place version counter (shared by its views); None for inference tensors."""
    try:
        return t._version
    except RuntimeError:
        return None


class _State:
    """fastdiff's per-scheduler state, kept out of diffusers' attribute namespace."""

    def __init__(self):
        self.ab64: Optional[np.ndarray] = None       # alphas_cumprod as float64 (diffusers' fp32 values)
        self.host_ts: Optional[np.ndarray] = None    # host copy of the timesteps set_timesteps made
        self.host_sigmas: Optional[np.ndarray] = None  # flow, DPM: host copy of the sigmas (float32 values)
        self.history: dict = {}                      # multistep: (device, shape, dtype) -> history buffers
        self.history_counts: dict = {}               # UniPC: table key -> history tensors each row reads
        self.taken = 0                               # UniPC: steps taken since set_timesteps
        self.exposed = None                          # UniPC: (key, last_sample, model_outputs, items) set
        self.handed_over = False                     # UniPC: diffusers' step runs until set_timesteps
        self.next_input = None                       # Euler: (step output, its scaled model input, step index)
        self.ts_obj: Optional[torch.Tensor] = None   # the tensor set_timesteps assigned to .timesteps
        self.ts_key: Optional[int] = None            # hash of host_ts: tables that depend on the list
        self.ts_version: Optional[int] = None        # ts_obj._version when host_ts was read
        self.ts_own = False                          # ts_obj is the dense tensor set_timesteps made
        self.tables: "OrderedDict" = OrderedDict()   # key -> Table (rows per timestep), LRU
        self.aranges: dict = {}                      # device -> arange(N) int64 (row ids for host timesteps)
        self.seed: Optional[int] = None              # Philox seed when set_noise_seed was called
        self.seed_tensors: dict = {}                 # device -> one-element int64 seed tensor
        self.shard = None                            # the Shard of the full latent that step gets
        self.add_noise_factors: dict = {}            # (device, dtype) -> (sqrt(ab), sqrt(1 - ab))
        self.begin_index: Optional[int] = None
        self.backend: Optional[str] = None
        self.options: dict = {}                      # (config values, recompute, var mode) -> StepOptions


class _FastStepMixin:
    """What the two schedulers share: tables on the device, timestep -> row, the fused call."""

    # -- state ------------------------------------------------------------------------------
    @property
    def _fd(self) -> _State:
        st = self.__dict__.get("_fastdiff_state")
        if st is None:
            st = _State()
            self.__dict__["_fastdiff_state"] = st
        return st

    @property
    def backend(self) -> Optional[str]:
        """``"triton"``, ``"torch"`` or None (Triton for CUDA tensors, torch otherwise)."""
        return self._fd.backend

    @backend.setter
    def backend(self, value: Optional[str]) -> None:
        if value is not None and value not in ("torch", "triton"):
            raise ValueError(f"backend must be 'torch', 'triton' or None, got {value!r}")
        self._fd.backend = value
        self._fd.tables.clear()  # each Table resolves its backend once

    # -- public extras ------------------------------------------------------------------------
    def set_noise_seed(self, seed: Optional[int], *, shard: Optional[Shard] = None) -> None:
        """Draw step noise in-kernel from counter-based Philox keyed by (seed, element index,
        timestep) instead of ``randn_tensor``; ``None`` switches back to diffusers' noise.

        Saves writing and reading a noise tensor each step, keeps no generator state, and gives
        the same numbers eagerly, in a CUDA graph and when a batch is split; it does not give
        diffusers' numbers. ``variance_noise`` passed to ``step`` still wins.

        ``shard`` (a ``fastdiff.engine.shard.Shard``): ``step`` receives that part of a larger
        latent (context parallelism with sharded latents) and draws exactly its part of the full
        latent's noise."""
        if seed is not None:
            seed = check_int("seed (or None)", seed, 0, 2**63, hi_open=True)
        if shard is not None and not isinstance(shard, Shard):
            raise TypeError(f"shard must be a fastdiff.engine.shard.Shard or None, got {type(shard).__name__}")
        if shard is not None and seed is None:
            raise ValueError("a shard places the in-kernel noise: give it with a seed")
        st = self._fd
        st.seed = seed
        st.seed_tensors = {}
        st.shard = shard

    @property
    def noise_seed(self) -> Optional[int]:
        return self._fd.seed

    # -- tables ---------------------------------------------------------------------------------
    def _cached_table(self, key, build) -> Table:
        """The Table for ``key``, built by ``build()`` (float64 rows per training timestep) once."""
        st = self._fd
        table = st.tables.get(key)
        if table is not None:
            st.tables.move_to_end(key)
        else:
            table = st.tables[key] = Table(build(), rows="timestep", backend=st.backend)
            while len(st.tables) > _MAX_TABLES:  # e.g. an eta that changes every call
                st.tables.popitem(last=False)
        return table

    def _seed_tensor(self, device: torch.device) -> torch.Tensor:
        st = self._fd
        t = st.seed_tensors.get(device)
        if t is None:
            t = torch.full((1,), st.seed, dtype=torch.int64, device=device)  # a fill, no host copy
            st.seed_tensors[device] = t
        return t

    def _noise_index(self, sample: torch.Tensor, thresholding: bool = False) -> dict:
        """The step's index_offset / index_run for the shard set_noise_seed was given ({} without one)."""
        shard = self._fd.shard
        if shard is None:
            return {}
        shard.check_local("sample", sample)
        if thresholding and not shard.whole_samples:
            raise ValueError("dynamic thresholding takes a quantile over each whole sample, which this shard "
                             "does not hold: run the scheduler on the whole latent, or turn thresholding off")
        return shard.noise_index

    def _noise(self, model_output, sample, generator, variance_noise):
        """(noise tensor, seed tensor) for a step that draws: ``variance_noise`` if given, else the
        Philox seed after set_noise_seed, else diffusers' own draw (same call, same generator)."""
        if variance_noise is not None:
            return variance_noise, None
        if self._fd.seed is not None:
            return None, self._seed_tensor(sample.device)
        return randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                            dtype=model_output.dtype), None

    @staticmethod
    def _check_inputs(model_output, sample, variance_noise=None) -> None:
        """The tensors of a ``step``, checked before anything is drawn or read, so that every
        backend refuses the same inputs with the same message (diffusers' own failures here are
        an AttributeError or torch's "normal_kernel_cpu not implemented for 'Long'")."""
        for name, t in (("model_output", model_output), ("sample", sample), ("variance_noise", variance_noise)):
            if t is None and name == "variance_noise":
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor (float32, float16, bfloat16 or float64), "
                                f"got {t.dtype}")

    @staticmethod
    def _step_input(sample: torch.Tensor, wide: bool) -> torch.Tensor:
        """The sample as the step reads it: float64 when the step computes in float64, else as it is
        (the step reads float16 / bfloat16 and computes in float32: no conversion pass)."""
        if wide:
            return sample.to(torch.float64)
        return sample if sample.dtype in (torch.float32, torch.float16, torch.bfloat16) else sample.float()

    # -- what every drop-in's step checks and looks up ---------------------------------------------
    @classmethod
    def _check_pair(cls, model_output, sample) -> None:
        cls._check_inputs(model_output, sample)
        if tuple(model_output.shape) != tuple(sample.shape):
            raise ValueError(f"model_output and sample must have the same shape, got {tuple(model_output.shape)} "
                             f"and {tuple(sample.shape)}")
        if model_output.device != sample.device:
            raise ValueError(f"model_output and sample must be on the same device, got {model_output.device} "
                             f"and {sample.device}")

    def _position_in_own_timesteps(self, timestep) -> Optional[int]:
        """Where ``timestep`` sits in the timesteps tensor set_timesteps made, read from its storage
        offset (host metadata, no sync), when it is an element of that tensor (what ``for t in
        scheduler.timesteps`` yields) and the tensor is unedited; else None."""
        st = self._fd
        ts = st.ts_obj
        if (isinstance(timestep, torch.Tensor) and timestep.numel() == 1 and ts is not None
                and self.__dict__.get("timesteps") is ts and _version_of(ts) == st.ts_version
                and ts.dim() == 1 and ts.stride(0) == 1 and ts.device == timestep.device
                and ts.dtype == timestep.dtype
                and timestep.untyped_storage().data_ptr() == ts.untyped_storage().data_ptr()):
            i = timestep.storage_offset() - ts.storage_offset()
            if 0 <= i < len(st.host_ts):
                return i
        return None

    def _host_value(self, timestep, cast):
        """The timestep as a host value (``cast``: int or float32) when that costs no device sync."""
        if isinstance(timestep, (int, float, np.integer, np.floating)) and not isinstance(timestep, bool):
            return cast(timestep)
        i = self._position_in_own_timesteps(timestep)
        if i is not None:
            return cast(self._fd.host_ts[i])
        if isinstance(timestep, torch.Tensor) and timestep.numel() == 1 and timestep.device.type == "cpu":
            return cast(timestep.item())  # a host read, no device to wait for
        return None

    def _step_row(self, device: torch.device, row: int, n_rows: int) -> torch.Tensor:
        """A one-element int64 view on ``device`` holding ``row`` (a cached arange: no launch, no copy)."""
        ids = self._fd.aranges.get(device)
        if ids is None or ids.numel() != n_rows:
            ids = self._fd.aranges[device] = torch.arange(n_rows, dtype=torch.int64, device=device)
        return ids[row:row + 1]

    def _begin_step(self, model_output, timestep, sample) -> int:
        """The checks a step starts with; the step index (found without a sync on the first step)."""
        self._check_pair(model_output, sample)
        if self.step_index is None:
            self._init_step_index(timestep)
        return self._check_step_index()

    def _check_step_index(self) -> int:
        i, k = self._step_index, len(self._fd.host_ts)
        if not 0 <= i < k:
            raise ValueError(f"step index {i} is outside the {k} steps set_timesteps made: step was called more "
                             "often than there are timesteps (call set_timesteps again for a new loop)")
        return i


class _VPStepMixin(_FastStepMixin):
    """The VP drop-ins (DDIM, DDPM): diffusers' float32 alphas_cumprod, rows per training timestep
    (the row of a step is its timestep), add_noise, the timestep reads without a sync."""

    def _alphas_cumprod64(self) -> np.ndarray:
        st = self._fd
        if st.ab64 is None:
            # diffusers' float32 alphas_cumprod, widened exactly: the tables are then built in
            # float64 from the very values diffusers steps with, so the two differ only by the
            # float32 rounding of each coefficient (not by a schedule computed another way,
            # which differs by up to ~1e-6 relative after a 1000-step float32 cumprod).
            st.ab64 = self.alphas_cumprod.detach().to("cpu", torch.float64).numpy().copy()
        return st.ab64

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Kept for pipelines that call it (img2img). The step's row is the timestep itself, so
        where the loop begins does not change what a step computes."""
        self._fd.begin_index = int(begin_index)

    @property
    def begin_index(self) -> Optional[int]:
        return self._fd.begin_index

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.IntTensor) -> torch.Tensor:
        """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise, bit-identical to diffusers' (the factors are
        computed the way diffusers computes them, in the samples' dtype, once per device/dtype)."""
        key = (original_samples.device, original_samples.dtype)
        factors = self._fd.add_noise_factors.get(key)
        if factors is None:
            ab = self.alphas_cumprod.to(device=original_samples.device, dtype=original_samples.dtype)
            factors = (ab ** 0.5, (1 - ab) ** 0.5)
            self._fd.add_noise_factors[key] = factors
        timesteps = timesteps.to(original_samples.device)
        shape = (-1,) + (1,) * (original_samples.dim() - 1)
        sqrt_alpha_prod = factors[0][timesteps].flatten().reshape(shape)
        sqrt_one_minus_alpha_prod = factors[1][timesteps].flatten().reshape(shape)
        return sqrt_alpha_prod * original_samples + sqrt_one_minus_alpha_prod * noise

    # -- timesteps ------------------------------------------------------------------------------
    def _record_timesteps(self, host_ts: np.ndarray, device) -> None:
        st = self._fd
        st.host_ts = np.asarray(host_ts, dtype=np.int64)
        st.ts_key = hash(st.host_ts.tobytes())
        self.timesteps = torch.from_numpy(st.host_ts.copy()).to(device)
        st.ts_obj = self.timesteps
        st.ts_version = _version_of(self.timesteps)
        st.ts_own = True

    def _known_timestep(self, timestep) -> Optional[int]:
        """The timestep as a Python int when that costs no device sync, else None.

        A Python int or a CPU tensor is read directly. A GPU tensor that is an element of the
        ``timesteps`` tensor set_timesteps made (what ``for t in scheduler.timesteps`` yields) is
        read from the host copy through its storage offset, which is host metadata."""
        if isinstance(timestep, (int, np.integer)) and not isinstance(timestep, bool):
            return int(timestep)
        if not isinstance(timestep, torch.Tensor):
            raise TypeError(f"timestep must be an int or an integer tensor, got {type(timestep).__name__}")
        if timestep.numel() != 1:
            raise ValueError(f"timestep must hold one value (one timestep for the whole batch), got shape "
                             f"{tuple(timestep.shape)}")
        if timestep.dtype.is_floating_point or timestep.dtype.is_complex or timestep.dtype == torch.bool:
            raise TypeError(f"timestep must be an integer tensor, got {timestep.dtype}")
        if timestep.device.type == "cpu":
            return int(timestep)  # a CPU read: nothing to wait for on a device
        # Only our own dense tensor, unchanged since host_ts was read (an in-place edit bumps the
        # version counter its views share): otherwise a storage offset could name the wrong step.
        i = self._position_in_own_timesteps(timestep) if self._fd.ts_own else None
        return None if i is None else int(self._fd.host_ts[i])

    def _row(self, timestep, device: torch.device) -> Tuple[torch.Tensor, Optional[int]]:
        """(one-element int64 row index on ``device``, host timestep or None)."""
        n = self.config.num_train_timesteps
        host_t = self._known_timestep(timestep)
        if host_t is not None:
            if not 0 <= host_t < n:
                raise ValueError(f"timestep must lie in [0, num_train_timesteps={n}), got {host_t}")
            ids = self._fd.aranges.get(device)
            if ids is None:
                ids = torch.arange(n, dtype=torch.int64, device=device)  # a fill kernel, no copy
                self._fd.aranges[device] = ids
            return ids[host_t:host_t + 1], host_t  # a view: no launch, no copy
        # A device tensor we cannot read without a sync: it indexes the table on the device.
        # (Out-of-range values cannot be checked here without a sync; diffusers fails on them too.)
        return timestep.reshape(1).to(device=device, dtype=torch.int64), None

    def _options(self, recompute_eps: bool, var_mode: str) -> StepOptions:
        cfg = self.config
        if cfg.prediction_type not in VP_PREDICTIONS:
            raise ValueError(f"prediction_type given as {cfg.prediction_type} must be one of `epsilon`, "
                             "`sample`, or `v_prediction`")
        key = (cfg.prediction_type, cfg.clip_sample, cfg.clip_sample_range, cfg.thresholding,
               cfg.dynamic_thresholding_ratio, cfg.sample_max_value, recompute_eps, var_mode)
        opts = self._fd.options.get(key)
        if opts is None:
            clip = float(cfg.clip_sample_range) if (cfg.clip_sample and not cfg.thresholding) else None
            opts = self._fd.options[key] = StepOptions(
                prediction_type=cfg.prediction_type, clip_range=clip, thresholding=bool(cfg.thresholding),
                dynamic_thresholding_ratio=float(cfg.dynamic_thresholding_ratio),
                sample_max_value=float(cfg.sample_max_value), recompute_eps=recompute_eps, var_mode=var_mode)
        return opts

    def _fused(self, model_output, sample, table: Table, row, *, noise=None, seed=None, recompute_eps=False,
               var_mode="table", aux=None):
        """(prev_sample, pred_original_sample) by the one step, with diffusers' checks and messages."""
        self._check_pair(model_output, sample)
        options = self._options(recompute_eps, var_mode)
        out_dtype = torch.promote_types(sample.dtype, model_output.dtype)
        if not out_dtype.is_floating_point:
            raise TypeError(f"sample and model_output must be floating point, got {sample.dtype} and "
                            f"{model_output.dtype}")
        # Mixed dtypes compute in the promoted one, as diffusers' arithmetic does (exact upcasts).
        sample, model_output = sample.to(out_dtype), model_output.to(out_dtype)
        if noise is not None and (not isinstance(noise, torch.Tensor) or tuple(noise.shape) != tuple(sample.shape)
                                  or noise.device != sample.device):
            raise ValueError("variance_noise must be a tensor of the sample's shape "
                             f"{tuple(sample.shape)} on {sample.device}, got "
                             f"{tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__}")
        if options.thresholding and sample.dim() < 2:
            raise ValueError(f"thresholding needs samples of shape (batch, channels, ...), got {tuple(sample.shape)}")
        if noise is not None and noise.dtype != out_dtype and (out_dtype == torch.float64 or
                                                              noise.dtype == torch.float64):
            # float64 samples compute in float64 (noise widened exactly); float64 noise for a float32
            # step is rounded to the precision the step computes in
            noise = noise.to(out_dtype)
        noise_index = self._noise_index(sample, options.thresholding) if seed is not None else {}
        return step(sample, model_output, table, row, options, noise=noise, seed=seed, aux=aux, return_x0=True,
                    **noise_index)


class _MultistepMixin(_FastStepMixin):
    """What the multistep drop-ins (DPM-Solver++, UniPC) share: host copies of the sigmas and
    timesteps diffusers' set_timesteps made, and diffusers' step-index rule without its sync."""

    def _record_sigma_steps(self) -> None:
        """After diffusers' own set_timesteps: the host copies the tables are built from (one read
        here, outside the loop, instead of a sync at the first step); the history starts empty."""
        st = self._fd
        st.host_sigmas = self.sigmas.detach().cpu().to(torch.float64).numpy()  # diffusers keeps them on the CPU
        ts = self.timesteps
        st.host_ts = ts.detach().cpu().numpy().astype(np.int64)
        st.ts_obj, st.ts_version = ts, _version_of(ts)
        st.ts_key = hash((st.host_sigmas.tobytes(), st.host_ts.tobytes()))
        st.history = {}

    def _init_step_index(self, timestep) -> None:
        if self.begin_index is not None:
            self._step_index = self._begin_index
            return
        t = self._host_value(timestep, float)  # 999.5 matches no timestep, as in diffusers
        if t is None:  # a device value we cannot read for free: diffusers' lookup (one sync)
            super()._init_step_index(timestep)
            return
        where = np.nonzero(self._fd.host_ts == t)[0]  # diffusers' rule: the second match, else the last step
        self._step_index = int(where[1] if len(where) > 1 else (where[0] if len(where) else len(self._fd.host_ts) - 1))
