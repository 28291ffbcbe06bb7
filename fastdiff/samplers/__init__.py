"""Samplers: each is a table builder over the one step; ``SAMPLERS`` names the built-in ones.
A new solver goes in a file here (or the file of its family) with ``@register_sampler``."""
from .base import Sampler, check_sample_args
from .consistency import ConsistencySampler
from .dpm import DPMSolverSampler, DPMSolverSDESampler, FlowDPMSolverSampler, FlowDPMSolverSDESampler
from .euler import EulerAncestralSampler, EulerSampler
from .flow import FlowDDIMSampler, FlowEulerSampler, FlowSampler, FlowStochasticSampler, OCMFlowSampler
from .ocm import OCMDDIMSampler, OCMDDPMSampler
from .registry import SAMPLERS, make_sampler, register_sampler
from .unipc import FlowUniPCSampler, UniPCSampler
from .vp import DDIMSampler, DDPMSampler

__all__ = ["SAMPLERS", "ConsistencySampler", "DDIMSampler", "DDPMSampler", "DPMSolverSDESampler", "DPMSolverSampler",
           "EulerAncestralSampler", "EulerSampler", "FlowDPMSolverSampler", "FlowDDIMSampler", "FlowEulerSampler",
           "FlowSampler", "FlowStochasticSampler", "OCMDDIMSampler", "OCMDDPMSampler", "OCMFlowSampler", "Sampler",
           "check_sample_args", "make_sampler", "register_sampler", "FlowDPMSolverSDESampler", "FlowUniPCSampler", "UniPCSampler"]
