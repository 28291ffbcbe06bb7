"""Drop-in replacements for diffusers' schedulers with fastdiff's fused step::

    from fastdiff.diffusers import DDIMScheduler
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)

The adapters live in fastdiff/dropin/ (what they share and where they differ from diffusers:
fastdiff/dropin/common.py).
"""
# A saved pipeline names this module as its scheduler's library; DiffusionPipeline.from_pretrained
# finds the loading method by looking up the base class names (SchedulerMixin, ...) in it.
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401

from .dropin.ddim import DDIMScheduler, DDIMSchedulerOutput
from .dropin.ddpm import DDPMScheduler, DDPMSchedulerOutput
from .dropin.dpm import DPMSolverMultistepScheduler
from .dropin.euler import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from .dropin.flow import FlowMatchEulerDiscreteScheduler, FlowMatchEulerDiscreteSchedulerOutput
from .dropin.swap import swap_scheduler, unswap_scheduler
from .dropin.unipc import UniPCMultistepScheduler

__all__ = ["DDIMScheduler", "DDPMScheduler", "DDIMSchedulerOutput", "DDPMSchedulerOutput", "DPMSolverMultistepScheduler",
           "EulerAncestralDiscreteScheduler", "EulerDiscreteScheduler",
           "FlowMatchEulerDiscreteScheduler", "FlowMatchEulerDiscreteSchedulerOutput", "swap_scheduler",
           "unswap_scheduler", "UniPCMultistepScheduler"]
