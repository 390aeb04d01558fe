"""Build of the ``stoichconv._C`` extension (C++ CPU kernels, plus CUDA kernels
when available); see ``stoichconv/_build_config.py`` for the switches."""

import glob
import importlib.util
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_build_config():
    spec = importlib.util.spec_from_file_location(
        "_stoichconv_build_config", os.path.join(ROOT, "stoichconv", "_build_config.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _extensions():
    import torch

    config = _load_build_config()
    decision = config.decide_cuda_build(os.environ, torch.version.cuda)
    print(f"stoichconv: CUDA kernels {'ON' if decision.with_cuda else 'OFF'} ({decision.reason})")
    if decision.with_cuda:
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = decision.cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", config.DEFAULT_CUDA_ARCH_LIST)
    os.environ.setdefault("MAX_JOBS", "2")
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = [os.path.join("csrc", "stoichconv.cpp")]
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    # The C++ standard is torch's choice. -fno-trapping-math lets GCC turn
    # float selects (leaky ReLU and its derivative) into vector blends; no
    # reassociation, results stay IEEE-exact (the kernels install no FP traps).
    cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math"]
    extra_link_args = ["-fopenmp"]
    if decision.with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        extension = CUDAExtension(
            "stoichconv._C",
            sources,
            include_dirs=include_dirs,
            define_macros=[("STOICHCONV_WITH_CUDA", None)],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
            },
            extra_link_args=extra_link_args,
        )
    else:
        extension = CppExtension(
            "stoichconv._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=extra_link_args,
        )
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


if "egg_info" in sys.argv or "--version" in sys.argv:
    ext_modules, cmdclass = [], {}
else:
    ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["stoichconv", "stoichconv.*"]),
    package_data={"stoichconv.data": ["yeast_gem/*.txt", "yeast_gem/*.md"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
