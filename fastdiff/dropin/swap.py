"""``swap_scheduler``: put fastdiff's drop-in in place of a pipeline's diffusers scheduler."""
from __future__ import annotations

from .ddim import DDIMScheduler, _DiffusersDDIMScheduler
from .ddpm import DDPMScheduler, _DiffusersDDPMScheduler


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
