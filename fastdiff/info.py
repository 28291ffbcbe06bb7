"""What fastdiff can use on this machine, and why (`fastdiff info`, `python -m fastdiff.info`)."""
from __future__ import annotations

import os
import platform


def report() -> str:
    import torch

    from . import __version__
    from .engine.backend import interpreting, triton_status

    lines = [f"fastdiff {__version__}", f"python {platform.python_version()} on {platform.system()} {platform.machine()}",
             f"torch {torch.__version__}"]
    try:
        from ._ext import C
        lines.append(f"compiled schedules (fastdiff._C): loaded, {C.NCOL} coefficient columns")
    except ImportError as exc:
        lines.append(f"compiled schedules (fastdiff._C): MISSING - {exc}")
    ok, why = triton_status()
    lines.append(f"triton: {'available' if ok else 'unavailable'} ({why})")
    if torch.cuda.is_available():
        lines.append(f"cuda: {torch.cuda.get_device_name(0)} (torch CUDA {torch.version.cuda})")
    else:
        lines.append("cuda: no device visible to torch")
    forced = os.environ.get("FASTDIFF_BACKEND")
    if forced:
        lines.append(f"backend: forced to {forced!r} by FASTDIFF_BACKEND")
    elif torch.cuda.is_available() and ok:
        lines.append("backend: triton kernels for CUDA tensors, the C++ step for CPU tensors")
    elif interpreting() and ok:
        lines.append("backend: the C++ step for CPU tensors by default; backend='triton' runs the kernels "
                     "through Triton's interpreter (TRITON_INTERPRET=1)")
    else:
        lines.append("backend: the C++ step for CPU tensors (no CUDA device" + ("" if ok else ", no triton") + ")")
    try:
        from ._ext import C as _C
        cpp = hasattr(_C, "cpu_step")
    except ImportError:
        cpp = False
    lines.append("fused C++ CPU step: " + (f"available, the default for CPU tensors (loops: {_C.cpu_isa()}; "
                                           "FASTDIFF_BACKEND=torch runs the plain-torch reference)"
                                           if cpp else "unavailable (fastdiff._C has no cpu_step)"))
    lines.append("cuda graphs: " + ("available" if torch.cuda.is_available() else "unavailable (no CUDA device)"))
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
