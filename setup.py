"""Builds the pybind11 extension fastdiff._C from csrc/.

Plain C++17, no PyTorch headers and no hardware detection: the same build works with any
torch version and on machines with or without a GPU.
"""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ext_modules = [
    Pybind11Extension(
        "fastdiff._C",
        ["csrc/module.cpp", "csrc/schedules.cpp", "csrc/tables.cpp", "csrc/sigmas.cpp"],
        depends=["csrc/columns.h", "csrc/common.h"],
        cxx_std=17,
        extra_compile_args=["-O2"],
    )
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
