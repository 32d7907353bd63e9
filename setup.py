"""Builds dsel._C, the pybind11 extension in csrc/ (the token loader). Needs no torch."""
from glob import glob

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import setup

ParallelCompile("DSEL_BUILD_JOBS", default=0).install()  # compile the csrc/*.cpp files in parallel

ext = Pybind11Extension(
    "dsel._C",
    sorted(glob("csrc/*.cpp")),
    depends=sorted(glob("csrc/*.h")),
    include_dirs=["csrc"],
    cxx_std=17,
    extra_compile_args=["-O3", "-pthread"],
    extra_link_args=["-pthread"],
)

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
