"""Drop-in replacements for diffusers' ``DDIMScheduler`` and ``DDPMScheduler``.

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
* The update is one launch of the fused kernel ``fastdiff.kernels.vp_step.vp_step`` (dynamic
  thresholding adds its per-sample quantile pass, ``dynamic_thresholds``). On CPU tensors the
  plain-torch reference of the same update runs.
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
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler as _DiffusersDDIMScheduler
    from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler as _DiffusersDDPMScheduler
    from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
    # A saved pipeline names this module as its scheduler's library; DiffusionPipeline.from_pretrained
    # finds the loading method by looking up the base class names (SchedulerMixin, ...) in it.
    from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401
    from diffusers.utils.torch_utils import randn_tensor
except ImportError as exc:  # pragma: no cover - exercised only without diffusers
    raise ImportError(
        "fastdiff.diffusers needs the diffusers package: pip install 'fastdiff[diffusers]' "
        f"({type(exc).__name__}: {exc})") from exc

from ._ext import C
from .backend import canonical_device, resolve
from .kernels.vp_step import dynamic_thresholds, vp_step, vp_step_reference

__all__ = ["DDIMScheduler", "DDPMScheduler", "DDIMSchedulerOutput", "DDPMSchedulerOutput", "swap_scheduler"]

_PREDICTIONS = ("epsilon", "v_prediction", "sample")


# Tables kept per scheduler (one per step count / eta / timestep list, device and dtype; 64 KB each).
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
        self.ts_obj: Optional[torch.Tensor] = None   # the tensor set_timesteps assigned to .timesteps
        self.ts_key: Optional[int] = None            # hash of host_ts: tables that depend on the list
        self.ts_version: Optional[int] = None        # ts_obj._version when host_ts was read
        self.ts_own = False                          # ts_obj is the dense tensor set_timesteps made
        self.tables: "OrderedDict" = OrderedDict()   # (key, device, dtype) -> device table, LRU
        self.aranges: dict = {}                      # device -> arange(N) int64 (row ids for host timesteps)
        self.seed: Optional[int] = None              # Philox seed when set_noise_seed was called
        self.seed_tensors: dict = {}                 # device -> one-element int64 seed tensor
        self.add_noise_factors: dict = {}            # (device, dtype) -> (sqrt(ab), sqrt(1 - ab))
        self.begin_index: Optional[int] = None
        self.backend: Optional[str] = None
        self.resolved: dict = {}                     # (backend, device) -> "torch" | "triton"


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

    def _alphas_cumprod64(self) -> np.ndarray:
        st = self._fd
        if st.ab64 is None:
            # diffusers' float32 alphas_cumprod, widened exactly: the tables are then built in
            # float64 from the very values diffusers steps with, so the two differ only by the
            # float32 rounding of each coefficient (not by a schedule computed another way,
            # which differs by up to ~1e-6 relative after a 1000-step float32 cumprod).
            st.ab64 = self.alphas_cumprod.detach().to("cpu", torch.float64).numpy().copy()
        return st.ab64

    # -- public extras ------------------------------------------------------------------------
    def set_noise_seed(self, seed: Optional[int]) -> None:
        """Draw step noise in-kernel from counter-based Philox keyed by (seed, element index,
        timestep) instead of ``randn_tensor``; ``None`` switches back to diffusers' noise.

        Saves writing and reading a noise tensor each step, keeps no generator state, and gives
        the same numbers eagerly, in a CUDA graph and when a batch is split; it does not give
        diffusers' numbers. ``variance_noise`` passed to ``step`` still wins."""
        if seed is not None and (not isinstance(seed, (int, np.integer)) or isinstance(seed, bool)
                                 or not 0 <= int(seed) < 2**63):
            raise ValueError(f"seed must be an int in [0, 2**63) or None, got {seed!r}")
        st = self._fd
        st.seed = None if seed is None else int(seed)
        st.seed_tensors = {}

    @property
    def noise_seed(self) -> Optional[int]:
        return self._fd.seed

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
        st = self._fd
        ts = st.ts_obj
        # Only our own dense tensor, unchanged since host_ts was read (an in-place edit bumps the
        # version counter its views share): otherwise a storage offset could name the wrong step.
        if (ts is not None and st.ts_own and self.__dict__.get("timesteps") is ts
                and _version_of(ts) == st.ts_version and ts.dim() == 1 and ts.stride(0) == 1
                and ts.device == timestep.device and ts.dtype == timestep.dtype
                and timestep.untyped_storage().data_ptr() == ts.untyped_storage().data_ptr()):
            i = timestep.storage_offset() - ts.storage_offset()
            if 0 <= i < len(st.host_ts):
                return int(st.host_ts[i])
        return None

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

    # -- tables ---------------------------------------------------------------------------------
    def _device_table(self, key, device: torch.device, dtype: torch.dtype, build) -> torch.Tensor:
        st = self._fd
        full_key = (key, device, dtype)
        table = st.tables.get(full_key)
        if table is not None:
            st.tables.move_to_end(full_key)
        else:
            host = torch.from_numpy(build())
            if dtype != torch.float64:
                host = host.to(dtype)
            if device.type == "cuda":
                # Pinned memory and non_blocking: uploading the table (lazily, at the first step
                # of a loop whose set_timesteps had no device) does not wait for the GPU.
                table = host.pin_memory().to(device, non_blocking=True)
            else:
                table = host.to(device)
            st.tables[full_key] = table
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

    def _resolved_backend(self, device: torch.device) -> str:
        # Resolved once per (backend setting, device): FASTDIFF_BACKEND is read at the first step,
        # not every step (the environment lookup was 6% of a small CPU step).
        st = self._fd
        key = (st.backend, device)
        choice = st.resolved.get(key)
        if choice is None:
            choice = st.resolved[key] = resolve(st.backend, device)
        return choice

    def _noise(self, model_output, sample, generator, variance_noise):
        """(noise tensor, seed tensor) for a step that draws: ``variance_noise`` if given, else the
        Philox seed after set_noise_seed, else diffusers' own draw (same call, same generator)."""
        if variance_noise is not None:
            return variance_noise, None
        if self._fd.seed is not None:
            return None, self._seed_tensor(sample.device)
        return randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                            dtype=model_output.dtype), None

    # -- the fused update -------------------------------------------------------------------------
    def _fused(self, model_output, sample, table_for, row, *, noise=None, seed=None, recompute_eps=False,
               var_mode="table", aux=None):
        cfg = self.config
        if not isinstance(sample, torch.Tensor) or not isinstance(model_output, torch.Tensor):
            raise TypeError("model_output and sample must be torch.Tensors, got "
                            f"{type(model_output).__name__} and {type(sample).__name__}")
        if tuple(model_output.shape) != tuple(sample.shape):
            raise ValueError(f"model_output and sample must have the same shape, got {tuple(model_output.shape)} "
                             f"and {tuple(sample.shape)}")
        if model_output.device != sample.device:
            raise ValueError(f"model_output and sample must be on the same device, got {model_output.device} "
                             f"and {sample.device}")
        if cfg.prediction_type not in _PREDICTIONS:
            raise ValueError(f"prediction_type given as {cfg.prediction_type} must be one of `epsilon`, "
                             "`sample`, or `v_prediction`")
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
        device = sample.device
        wide = out_dtype == torch.float64
        table = table_for(device, torch.float64 if wide else torch.float32)
        thresholds = None
        if cfg.thresholding:
            if sample.dim() < 2:
                raise ValueError(f"thresholding needs samples of shape (batch, channels, ...), got "
                                 f"{tuple(sample.shape)}")
            # The quantile of x0_hat in float32 (dynamic_thresholds rounds x0_hat to the inputs' dtype
            # first, which moves s by up to half a bfloat16 ulp, 0.2%).
            wide_in = out_dtype in (torch.float32, torch.float64)
            thresholds = dynamic_thresholds(sample if wide_in else sample.float(),
                                            model_output if wide_in else model_output.float(), table, row,
                                            cfg.prediction_type, cfg.dynamic_thresholding_ratio,
                                            cfg.sample_max_value)
        clip = float(cfg.clip_sample_range) if (cfg.clip_sample and not cfg.thresholding) else None
        kw = dict(prediction_type=cfg.prediction_type, clip_range=clip, thresholds=thresholds,
                  recompute_eps=recompute_eps, noise=noise, seed=seed, var_mode=var_mode, aux=aux)
        if wide or self._resolved_backend(device) == "torch":
            # The reference is the CPU path; calling it directly returns its two tensors
            # without vp_step's copies into preallocated outputs. float64 samples only run here.
            return vp_step_reference(sample, model_output, table, row, **kw)
        out = torch.empty_like(sample)
        x0 = torch.empty_like(sample)
        vp_step(sample, model_output, table, row, out=out, x0_out=x0, backend=self._fd.backend, **kw)
        return out, x0


class DDIMScheduler(_FastStepMixin, _DiffusersDDIMScheduler):
    """diffusers' ``DDIMScheduler`` (Song, Meng & Ermon, 2021) with fastdiff's fused step.

    Same constructor, config and methods as ``diffusers.DDIMScheduler``; see the module
    docstring for what differs. Extra: ``set_noise_seed``, ``backend``."""

    def set_timesteps(self, num_inference_steps: int, device: Union[str, torch.device, None] = None):
        """Timesteps for ``num_inference_steps`` steps by ``config.timestep_spacing`` (diffusers' rules,
        computed by fastdiff._C). With ``device``, the eta = 0 table is uploaded there now."""
        cfg = self.config
        if not isinstance(num_inference_steps, (int, np.integer)) or isinstance(num_inference_steps, bool):
            raise ValueError(f"num_inference_steps must be an int, got {num_inference_steps!r}")
        if num_inference_steps > cfg.num_train_timesteps:
            raise ValueError(
                f"`num_inference_steps`: {num_inference_steps} cannot be larger than `self.config.train_timesteps`:"
                f" {cfg.num_train_timesteps} as the unet model trained with this scheduler can only handle"
                f" maximal {cfg.num_train_timesteps} timesteps.")
        ts = C.make_timesteps(int(cfg.num_train_timesteps), int(num_inference_steps), str(cfg.timestep_spacing),
                              int(cfg.steps_offset))
        self.num_inference_steps = int(num_inference_steps)
        self._record_timesteps(ts, device)
        if device is not None:
            self._table(canonical_device(device), torch.float32, 0.0)

    def _table(self, device: torch.device, dtype: torch.dtype, eta: float) -> torch.Tensor:
        n, k = int(self.config.num_train_timesteps), int(self.num_inference_steps)

        def build():
            ab = self._alphas_cumprod64()
            t = np.arange(n, dtype=np.int64)
            # diffusers' DDIM steps from t to t - N // K whatever the spacing (trailing and linspace
            # timesteps are not N // K apart, and diffusers still steps that far).
            final = 1.0 if self.config.set_alpha_to_one else float(ab[0])
            return C.ddim_table(ab, t, t - n // k, eta, final)

        return self._device_table(("ddim", n, k, eta), device, dtype, build)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: Optional[torch.Generator] = None,
        variance_noise: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ) -> Union[DDIMSchedulerOutput, Tuple]:
        """One DDIM step t -> t - N // K (eq. 12 of the paper) in one fused launch:
        x_s = sqrt(ab_s) x0_hat + sqrt(1 - ab_s - std^2) eps_hat + std z, std = eta sqrt(beta_tilde).

        Arguments and result as diffusers' ``DDIMScheduler.step``. Noise is drawn when eta > 0, as
        diffusers does: ``variance_noise`` if given, else in-kernel Philox after ``set_noise_seed``,
        else ``randn_tensor(model_output.shape, generator=generator, ...)``."""
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
        if isinstance(eta, torch.Tensor):
            eta = float(eta)  # a tensor eta costs a read; pipelines pass a float
        if not isinstance(eta, (int, float, np.floating, np.integer)) or not np.isfinite(eta) or eta < 0:
            raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
        eta = float(eta)
        row, _ = self._row(timestep, sample.device)
        noise = seed = None
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError(
                    "Cannot pass both generator and variance_noise. Please make sure that either `generator` or"
                    " `variance_noise` stays `None`.")
            noise, seed = self._noise(model_output, sample, generator, variance_noise)
        prev_sample, pred_original_sample = self._fused(
            model_output, sample, lambda dev, dt: self._table(dev, dt, eta), row, noise=noise, seed=seed,
            recompute_eps=bool(use_clipped_model_output))
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)


class DDPMScheduler(_FastStepMixin, _DiffusersDDPMScheduler):
    """diffusers' ``DDPMScheduler`` (Ho, Jain & Abbeel, 2020) with fastdiff's fused step.

    Same constructor, config and methods as ``diffusers.DDPMScheduler``; see the module
    docstring for what differs. Extra: ``set_noise_seed``, ``backend``, and a keyword-only
    ``variance_noise`` on ``step``."""

    def set_timesteps(self, num_inference_steps: Optional[int] = None,
                      device: Union[str, torch.device, None] = None, timesteps: Optional[List[int]] = None):
        """Timesteps by ``config.timestep_spacing`` (diffusers' rules, from fastdiff._C), or the
        strictly descending custom ``timesteps``. With ``device``, the table is uploaded there now."""
        cfg = self.config
        n = int(cfg.num_train_timesteps)
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")
        if timesteps is not None:
            if isinstance(timesteps, torch.Tensor):
                timesteps = timesteps.detach().cpu().numpy()
            ts = C.validate_timesteps(np.asarray(timesteps, dtype=np.int64), n)
            self.custom_timesteps = True
        else:
            if num_inference_steps is None:
                raise ValueError("set_timesteps needs num_inference_steps or a list of timesteps")
            if not isinstance(num_inference_steps, (int, np.integer)) or isinstance(num_inference_steps, bool):
                raise ValueError(f"num_inference_steps must be an int, got {num_inference_steps!r}")
            if num_inference_steps > n:
                raise ValueError(
                    f"`num_inference_steps`: {num_inference_steps} cannot be larger than `self.config.train_timesteps`:"
                    f" {n} as the unet model trained with this scheduler can only handle maximal {n} timesteps.")
            self.num_inference_steps = int(num_inference_steps)
            self.custom_timesteps = False
            ts = C.make_timesteps(n, int(num_inference_steps), str(cfg.timestep_spacing), int(cfg.steps_offset))
        self._record_timesteps(ts, device)
        if device is not None:
            self._table(canonical_device(device), torch.float32)

    def _schedule_ts(self) -> np.ndarray:
        """The host timesteps the previous-timestep rule reads (all of them before set_timesteps)."""
        st = self._fd
        ts = self.__dict__.get("timesteps")
        if st.ts_obj is None or ts is not st.ts_obj or _version_of(ts) != st.ts_version:
            # Never set by set_timesteps (diffusers' initial arange), replaced by the caller, or
            # edited in place: read it once (a sync if it lives on a GPU; outside any loop in
            # normal use).
            host = np.asarray(ts.detach().cpu().numpy(), dtype=np.int64)
            st.ts_own = st.ts_own and ts is st.ts_obj  # a caller's tensor: no storage-offset reads
            st.host_ts, st.ts_key, st.ts_obj = host, hash(host.tobytes()), ts
            st.ts_version = _version_of(ts)
        return st.host_ts

    def _table(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        ts = self._schedule_ts()
        n = int(self.config.num_train_timesteps)
        variance_type = str(self.variance_type)
        # diffusers' previous_timestep follows the list only after set_timesteps (or custom ones)
        use_list = bool(getattr(self, "custom_timesteps", False) or getattr(self, "num_inference_steps", None))

        def build():
            # diffusers' previous_timestep: the next timestep of the list (-1 after the last); before
            # set_timesteps the list is every timestep, which makes it t - 1. Rows for timesteps
            # outside the list (diffusers fails on those) step to the next listed one below.
            t = np.arange(n, dtype=np.int64)
            if use_list:
                asc = np.sort(ts)
                j = np.searchsorted(asc, t, side="left") - 1
                prev = np.where(j >= 0, asc[np.maximum(j, 0)], -1).astype(np.int64)
            else:  # diffusers steps t -> t - 1 until set_timesteps (whatever .timesteps holds)
                prev = t - 1
            # fixed_large_log: diffusers takes sqrt(log(beta)) = NaN; the table gives what the name
            # means (GLIDE's max_log: log-variance log(beta), variance beta), i.e. fixed_large.
            return C.ddpm_table(self._alphas_cumprod64(), t, prev, variance_type, 1.0, "t_zero")

        return self._device_table(("ddpm", n, self._fd.ts_key if use_list else None, variance_type), device, dtype,
                                  build)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        return_dict: bool = True,
        *,
        variance_noise: Optional[torch.Tensor] = None,
    ) -> Union[DDPMSchedulerOutput, Tuple]:
        """One ancestral DDPM step t -> previous timestep in one fused launch (eq. 6-7 of the paper):
        x_s = sqrt(ab_s) beta_ts/(1 - ab_t) x0_hat + sqrt(ab_t/ab_s)(1 - ab_s)/(1 - ab_t) x_t + std z.

        Arguments and result as diffusers' ``DDPMScheduler.step``. Learned variances take the
        second half of a 2C-channel ``model_output``. Noise is drawn where t > 0, as diffusers
        does: ``variance_noise`` if given, else in-kernel Philox after ``set_noise_seed``, else
        ``randn_tensor``. A GPU timestep that is not an element of ``self.timesteps`` cannot be
        read without a sync, so then noise is drawn (and multiplied by 0 at t = 0)."""
        if not isinstance(sample, torch.Tensor) or sample.dim() < 2:
            raise ValueError("sample must be a tensor of shape (batch, channels, ...)")
        row, host_t = self._row(timestep, sample.device)
        predicted_variance = None
        learned = self.variance_type in ("learned", "learned_range")
        if learned and isinstance(model_output, torch.Tensor) and model_output.dim() >= 2 \
                and model_output.shape[1] == sample.shape[1] * 2:
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
        draws = host_t is None or host_t > 0
        var_mode, aux = "table", None
        if draws and learned:
            if predicted_variance is None:
                raise ValueError(
                    f"variance_type {self.variance_type!r} needs the model output to have twice the sample's "
                    f"channels (the second half is the variance), got model_output of shape "
                    f"{tuple(model_output.shape)} for a sample of shape {tuple(sample.shape)}")
            var_mode, aux = self.variance_type, predicted_variance
        noise = seed = None
        if draws:
            noise, seed = self._noise(model_output, sample, generator, variance_noise)
        if aux is not None and aux.dtype != torch.promote_types(sample.dtype, model_output.dtype):
            aux = aux.to(torch.promote_types(sample.dtype, model_output.dtype))
        pred_prev_sample, pred_original_sample = self._fused(
            model_output, sample, self._table, row, noise=noise, seed=seed, var_mode=var_mode, aux=aux)
        if not return_dict:
            return (pred_prev_sample, pred_original_sample)
        return DDPMSchedulerOutput(prev_sample=pred_prev_sample, pred_original_sample=pred_original_sample)

    def previous_timestep(self, timestep):
        """diffusers' rule (next listed timestep, -1 after the last; t - 1 before set_timesteps),
        from the host copy of the timesteps: no ``nonzero()`` sync."""
        t = self._known_timestep(timestep)
        if t is None:
            t = int(timestep)
        ts = self._schedule_ts()
        if not (self.custom_timesteps or self.num_inference_steps):
            return t - 1 if isinstance(timestep, (int, np.integer)) else torch.tensor(t - 1)
        where = np.nonzero(ts == t)[0]
        if len(where) == 0:
            raise ValueError(f"timestep {t} is not one of the scheduler's timesteps")
        i = int(where[0])
        return torch.tensor(-1) if i == len(ts) - 1 else torch.tensor(int(ts[i + 1]))


def swap_scheduler(pipe):
    """Replace a pipeline's diffusers DDIM/DDPM scheduler by fastdiff's, in place; returns ``pipe``.

    Needed for pipelines whose constructor rebuilds the scheduler (``DDIMPipeline.__init__`` does
    ``DDIMScheduler.from_config(scheduler.config)`` with diffusers' class): assign after
    construction, which is what this does."""
    current = getattr(pipe, "scheduler", None)
    if isinstance(current, (DDIMScheduler, DDPMScheduler)):
        return pipe
    if isinstance(current, _DiffusersDDIMScheduler):
        pipe.scheduler = DDIMScheduler.from_config(current.config)
    elif isinstance(current, _DiffusersDDPMScheduler):
        pipe.scheduler = DDPMScheduler.from_config(current.config)
    else:
        raise ValueError(f"swap_scheduler replaces DDIMScheduler or DDPMScheduler, got "
                         f"{type(current).__name__}; use DDIMScheduler.from_config(pipe.scheduler.config)")
    return pipe
