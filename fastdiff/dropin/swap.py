"""``swap_scheduler``: put fastdiff's drop-in in place of a pipeline's diffusers scheduler;
``unswap_scheduler``: put diffusers' class back (before ``save_pretrained``, for a pipeline that
plain diffusers loads)."""
from __future__ import annotations

from .ddim import DDIMScheduler, _DiffusersDDIMScheduler
from .ddpm import DDPMScheduler, _DiffusersDDPMScheduler
from .dpm import DPMSolverMultistepScheduler, _DiffusersDPMSolverMultistep
from .euler import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, _DiffusersEuler, _DiffusersEulerAncestral
from .flow import FlowMatchEulerDiscreteScheduler, _DiffusersFlowMatchEuler
from .unipc import UniPCMultistepScheduler, _DiffusersUniPC

# diffusers' class -> fastdiff's drop-in for it; one row per drop-in.
DROPINS = (
    (_DiffusersDDIMScheduler, DDIMScheduler),
    (_DiffusersDDPMScheduler, DDPMScheduler),
    (_DiffusersFlowMatchEuler, FlowMatchEulerDiscreteScheduler),
    (_DiffusersDPMSolverMultistep, DPMSolverMultistepScheduler),
    (_DiffusersEuler, EulerDiscreteScheduler),
    (_DiffusersEulerAncestral, EulerAncestralDiscreteScheduler),
    (_DiffusersUniPC, UniPCMultistepScheduler),
)


def swap_scheduler(pipe):
    """Replace a pipeline's diffusers scheduler by fastdiff's drop-in for its class, in place (the
    config carries over); returns ``pipe``.

    Needed for pipelines whose constructor rebuilds the scheduler (``DDIMPipeline.__init__`` does
    ``DDIMScheduler.from_config(scheduler.config)`` with diffusers' class): assign after
    construction, which is what this does."""
    current = getattr(pipe, "scheduler", None)
    if any(isinstance(current, fast) for _, fast in DROPINS):
        return pipe
    for theirs, fast in DROPINS:
        if isinstance(current, theirs):
            pipe.scheduler = fast.from_config(current.config)
            return pipe
    names = ", ".join(theirs.__name__ for theirs, _ in DROPINS)
    raise ValueError(f"swap_scheduler replaces {names}; got {type(current).__name__}, which has no fastdiff "
                     "drop-in yet")


def unswap_scheduler(pipe):
    """Replace a pipeline's fastdiff drop-in by diffusers' own class for it, in place (the config
    carries over); returns ``pipe``. A pipeline saved with the drop-in names
    ``fastdiff.diffusers`` in its model_index.json, and diffusers loads that only in a process that
    has imported fastdiff.diffusers; saved after ``unswap_scheduler`` it names diffusers' class and
    loads anywhere (``swap_scheduler`` after loading gives the fast step back)."""
    current = getattr(pipe, "scheduler", None)
    for theirs, fast in DROPINS:
        if isinstance(current, fast):
            pipe.scheduler = theirs.from_config(current.config)
            return pipe
    return pipe
