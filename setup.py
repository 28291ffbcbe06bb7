"""Builds the pybind11 extension fastdiff._C from csrc/.

Plain C++17, no PyTorch headers and no hardware detection: the same build works with any
torch version and on machines with or without a GPU.
"""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ext_modules = [
    Pybind11Extension(
        "fastdiff._C",
        ["csrc/module.cpp", "csrc/schedules.cpp", "csrc/tables.cpp", "csrc/sigmas.cpp", "csrc/cpu_step.cpp"],
        depends=["csrc/columns.h", "csrc/common.h", "csrc/philox.h", "csrc/cpu_step_kernel.h", "csrc/cpu_step_types.h"],
        cxx_std=17,
        # -O3 vectorises the CPU step's loops; -ffp-contract=off keeps every product and sum rounded
        # (no FMA), so the baseline, AVX2 and AVX-512 copies of those loops give the same bits;
        # -fno-math-errno lets sqrt vectorise. None of them changes a float64 table's values.
        extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"],
    )
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
