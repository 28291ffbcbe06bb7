"""fastdiff: fast, trustworthy diffusion sampling.

One fused step for every solver (a Triton kernel on CUDA, its torch reference elsewhere),
float64 coefficient tables from a C++ extension, samplers with no host sync per step, CUDA-graph
loops, drop-ins for diffusers' schedulers. See README.md and docs/design.md.
"""
from .api import sample
from .engine.schedule import FlowSchedule, Schedule
from .engine.step import StepOptions, step
from .engine.tables import COLUMNS, Table
from .graphs import GraphedSampler
from .engine.kernels.philox import randn
from .samplers import (SAMPLERS, ConsistencySampler, DDIMSampler, DDPMSampler, DPMSolverSampler,
                       DPMSolverSDESampler, EulerAncestralSampler, EulerSampler, FlowDDIMSampler, FlowDPMSolverSampler, FlowEulerSampler, FlowStochasticSampler, OCMDDIMSampler, OCMDDPMSampler, OCMFlowSampler, Sampler, make_sampler,
                       register_sampler)
from .training.consistency import ConsistencyDistillation
from .training.ocm import ProbeHead, ocm_loss, ocm_target, train_head

__version__ = "0.1.0"

__all__ = [
    "COLUMNS", "ConsistencyDistillation", "ConsistencySampler", "DDIMSampler", "DDPMSampler", "DPMSolverSDESampler",
    "DPMSolverSampler", "EulerAncestralSampler", "EulerSampler", "FlowDDIMSampler", "FlowDPMSolverSampler",
    "FlowEulerSampler", "FlowSchedule", "FlowStochasticSampler", "GraphedSampler", "OCMDDIMSampler", "OCMDDPMSampler",
    "OCMFlowSampler", "ProbeHead", "SAMPLERS", "Sampler", "Schedule", "StepOptions", "Table",
    "make_sampler", "ocm_loss", "ocm_target", "randn", "register_sampler", "sample", "step", "train_head",
    "__version__",
]
