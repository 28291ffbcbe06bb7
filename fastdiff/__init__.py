"""fastdiff: fast, trustworthy diffusion sampling.

Fused Triton step kernels (DDPM, DDIM, OCM, ...), float64 schedule tables from a C++ extension,
samplers with no host sync per step. See README.md.
"""
from ._ext import C as _C
from .kernels.philox import randn
from .kernels.vp_step import COLUMNS, vp_step, vp_step_reference
from .samplers import (SAMPLERS, DDIMSampler, DDPMSampler, Sampler, make_sampler, register_sampler,
                       sample)
from .schedule import Schedule
from .ocm import OCMDDIMSampler, OCMDDPMSampler, ProbeHead, ocm_loss, ocm_target, train_head
from .graphs import GraphedSampler
from .consistency import ConsistencyDistillation, ConsistencySampler

__version__ = "0.1.0"

__all__ = [
    "COLUMNS", "DDIMSampler", "DDPMSampler", "OCMDDIMSampler", "OCMDDPMSampler", "ProbeHead", "ocm_loss", "ocm_target",
    "train_head", "GraphedSampler", "SAMPLERS", "Sampler", "Schedule", "make_sampler", "randn",
    "register_sampler", "sample", "vp_step", "vp_step_reference", "__version__",
    "ConsistencyDistillation", "ConsistencySampler",
]
