"""The drop-in for diffusers' UniPCMultistepScheduler (UniPC, Zhao et al. 2023: the default of Wan
and many video pipelines, with prediction_type "flow_prediction" and use_flow_sigmas).

``set_timesteps`` is diffusers' own (every sigma option); the drop-in then builds float64 UniPC
rows from diffusers' float32 sigmas (``fastdiff._C.unipc_table``) and each ``step`` is one fused
pass that does what diffusers does in three (convert the model output, UniC-correct the sample,
UniP-predict the next one): it reads x_t, the model output, the previous data (or noise)
predictions and the previous corrected sample, and writes the next sample, this step's
prediction and this step's corrected sample. The corrector reads the corrected sample it wrote
(diffusers' ``last_sample``), not the sample passed in, so a pipeline that edits the latents
between steps (inpainting) gets diffusers' result. The step index is found without diffusers'
``.nonzero().item()`` sync and counted on the host.

Served by the fused step: solver_order 1-3, solver_type "bh1" / "bh2", predict_x0 true or false,
disable_corrector, lower_order_final, every sigma option, epsilon / sample / v_prediction /
flow_prediction, thresholding, loops that begin mid-schedule (img2img: the orders warm up from
the first step taken, as diffusers' lower_order_nums do). ``solver_p``, solver_order > 3 and
flow_prediction without use_flow_sigmas run diffusers' own step, unchanged; so does every step
after a pipeline replaced ``model_outputs`` / ``last_sample`` or changed the latents' shape or
dtype mid-loop (the drop-in keeps those attributes as diffusers' are, views of its buffers).

Differences: arithmetic in float32 with coefficients rounded once from float64 (diffusers
rounds after every float32 operation and solves its small rho systems in float32): outputs agree
to float32 rounding, not bit for bit. Where diffusers' float32 formulas break down on the step
onto sigma = 0 (solver_type "bh1" or predict_x0=False with final_sigmas_type "zero": 0 * inf =
NaN; lower_order_final=False: a division by r = 0 or a singular solve), the drop-in takes the
first-order limit there, x0_hat, and returns finite samples.
"""
from __future__ import annotations

from typing import Tuple, Union

import numpy as np
import torch
from diffusers.schedulers.scheduling_unipc_multistep import UniPCMultistepScheduler as _DiffusersUniPC
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from .._ext import C
from ..engine.step import StepOptions, step
from ..engine.tables import Table
from .common import _MultistepMixin

_HIST_COLS = [C.COLUMNS.index(f"{p}_h{k}") for k in range(4) for p in ("c", "xc")]


class UniPCMultistepScheduler(_MultistepMixin, _DiffusersUniPC):
    """diffusers' ``UniPCMultistepScheduler`` with fastdiff's fused predictor-corrector step (see
    the module docstring for what it serves). Extra: ``backend``."""

    __module__ = "fastdiff.diffusers"  # the public module, which saved pipelines name

    def _fused_config(self) -> bool:
        cfg = self.config
        if self.solver_p is not None or cfg.solver_order not in (1, 2, 3) or cfg.solver_type not in ("bh1", "bh2"):
            return False
        # flow_prediction on VP sigmas: diffusers reads x0 = x - sigma u with the raw sigma
        # sqrt((1 - ab) / ab), not the path's; its own step serves that mix
        flow_ok = self.predict_x0 and cfg.use_flow_sigmas
        return cfg.prediction_type in ("epsilon", "sample", "v_prediction") + (("flow_prediction",) if flow_ok else ())

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None):
        """diffusers' own set_timesteps; then the host copy of its sigmas and timesteps."""
        super().set_timesteps(num_inference_steps=num_inference_steps, device=device, sigmas=sigmas, mu=mu)
        self._record_sigma_steps()
        st = self._fd
        st.taken = 0
        st.exposed = None
        st.handed_over = False

    def _table(self, begin: int) -> Tuple[Table, list]:
        """The Table of a loop whose first step is ``begin``, and per row how many history tensors it reads."""
        cfg, st = self.config, self._fd
        disable = tuple(int(j) for j in self.disable_corrector)  # read each step: code may edit the list

        def build():
            return C.unipc_table(st.host_sigmas, st.host_ts.astype(np.float64), bool(cfg.use_flow_sigmas),
                                 int(cfg.solver_order), cfg.solver_type, bool(cfg.lower_order_final),
                                 list(disable), bool(self.predict_x0), int(begin), True)

        key = ("unipc", st.ts_key, cfg.solver_order, cfg.solver_type, cfg.lower_order_final, disable,
               bool(self.predict_x0), cfg.use_flow_sigmas, int(begin))
        table = self._cached_table(key, build)
        counts = st.history_counts.get(key)
        if counts is None:
            used = table.host[:, _HIST_COLS] != 0.0  # [K, 8]: c_h0, xc_h0, c_h1, xc_h1, ...
            counts = [max([j + 1 for j in range(4) if used[r, 2 * j] or used[r, 2 * j + 1]], default=0)
                      for r in range(table.host.shape[0])]
            if len(st.history_counts) >= 32:
                st.history_counts.clear()
            st.history_counts[key] = counts
        return table, counts

    def _options(self) -> StepOptions:
        cfg = self.config
        thresholding = bool(cfg.thresholding) and bool(self.predict_x0)  # diffusers thresholds x0_pred only
        key = ("unipc", cfg.prediction_type, thresholding, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
        opts = self._fd.options.get(key)
        if opts is None:
            opts = self._fd.options[key] = StepOptions(
                prediction_type=cfg.prediction_type, thresholding=thresholding,
                dynamic_thresholding_ratio=float(cfg.dynamic_thresholding_ratio),
                sample_max_value=float(cfg.sample_max_value))
        return opts

    # -- diffusers' state, kept as views of the fused step's buffers ----------------------------------
    def _state_intact(self, key) -> bool:
        """Whether diffusers' state attributes are still the views the last fused step set and the
        samples keep their device, shape and dtype: a pipeline that edits model_outputs or
        last_sample between steps (ChronoEdit slices them to two frames) or changes the latents'
        shape has diffusers' step run from then on, with that state."""
        st = self._fd
        seen = st.exposed
        return (seen is not None and seen[0] == key and self.last_sample is seen[1] and self.model_outputs is seen[2]
                and all(a is b for a, b in zip(self.model_outputs, seen[3])))

    def _expose_state(self, key, preds, corrected, n: int, timestep) -> None:
        """model_outputs = [M_{n-p+1} .. M_n] (None before the first), last_sample = this step's
        corrected sample: views of the ring buffers, which the next step does not overwrite."""
        p, r = self.config.solver_order, len(preds)
        outs = [preds[j % r] if j >= 0 else None for j in range(n - p + 1, n + 1)]
        self.model_outputs = outs
        self.last_sample = corrected[n % 2]
        self.timestep_list = list(self.timestep_list[1:]) + [timestep]
        self._fd.exposed = (key, self.last_sample, outs, list(outs))

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             return_dict: bool = True) -> Union[SchedulerOutput, Tuple]:
        """One UniPC step (UniC correction of ``sample``, UniP prediction of the next one, orders as
        diffusers chooses), one fused pass. Arguments and result as diffusers'."""
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
        st = self._fd
        if not self._fused_config() or getattr(st, "host_sigmas", None) is None or st.handed_over:
            return super().step(model_output, timestep, sample, return_dict=return_dict)
        wide = model_output.dtype == torch.float64 or sample.dtype == torch.float64
        dt = torch.float64 if wide else torch.float32
        key = (sample.device, tuple(sample.shape), dt)
        if st.taken and not self._state_intact(key):
            st.handed_over = True  # diffusers' step from here on, from the state it reads
            return super().step(model_output, timestep, sample, return_dict=return_dict)
        i = self._begin_step(model_output, timestep, sample)
        k, n = len(st.host_ts), st.taken
        table, counts = self._table(i - n)
        device = sample.device
        x = self._step_input(sample, wide)
        m = model_output.to(torch.float64) if wide else model_output
        bufs = st.history.get(key)
        p = self.config.solver_order
        if bufs is None:
            # predictions M_j in solver_order + 1 slots (slot j % R), corrected samples in 2
            bufs = st.history[key] = ([torch.zeros(sample.shape, dtype=dt, device=device) for _ in range(p + 1)],
                                      [torch.zeros(sample.shape, dtype=dt, device=device) for _ in range(2)])
        preds, corrected = bufs
        r = len(preds)
        # H0 .. H_{p-1}: the previous predictions, H_p: the previous corrected sample (unipc_table)
        hist = [preds[(n - 1 - j) % r] for j in range(p)] + [corrected[(n - 1) % 2]]
        out = torch.empty(sample.shape, dtype=dt if wide else sample.dtype, device=device)
        step(x, m, table, self._step_row(device, i, k), self._options(), history=tuple(hist[:counts[i]]), out=out,
             xc_out=corrected[n % 2], **{("x0_out" if self.predict_x0 else "eps_out"): preds[n % r]})
        out = out.to(sample.dtype)
        st.taken = n + 1
        # diffusers' bookkeeping, for code that reads it (and for its own step after a hand-over)
        order = min(p, k - i) if self.config.lower_order_final else p
        self.this_order = min(order, self.lower_order_nums + 1)
        if self.lower_order_nums < p:
            self.lower_order_nums += 1
        self._expose_state(key, preds, corrected, n, timestep)
        self._step_index += 1
        if not return_dict:
            return (out,)
        return SchedulerOutput(prev_sample=out)
