"""How the extension was built (stoichconv._build_info, csrc/build_info.cpp) and the check of
that build against the running torch (stoichconv._extension.check_build_matches), plus
``python -m stoichconv.info``."""

import json
import platform
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from stoichconv import _extension
from stoichconv._extension import BuildMismatchError, check_build_matches

needs_build = pytest.mark.skipif(_extension.build_info() is None, reason="stoichconv._build_info not built")


def _release(version):
    return re.match(r"(\d+\.\d+\.\d+)", version).group(1)


def _build(torch_full="2.13.0+cu130", cuda="13.0", with_cuda=True):
    return {
        "torch_version": _release(torch_full),
        "torch_version_full": torch_full,
        "with_cuda": with_cuda,
        "cuda_version": cuda if with_cuda else None,
        "torch_cuda_version": cuda,
        "cuda_archs": ["8.0", "9.0"] if with_cuda else [],
        "cpu_isas": ["default", "avx2"],
        "compiler": "gcc 12.2.0",
    }


# ------------------------------------------------------------ the real build


def test_compiled_kernels_come_with_build_info():
    if _extension.has_compiled_kernels():
        assert _extension.build_info() is not None, "stoichconv._C is loaded but stoichconv._build_info is missing"


@needs_build
def test_build_info_matches_the_running_torch():
    info = _extension.build_info()
    assert info["torch_version"] == _release(torch.__version__)
    assert info["torch_version_full"].split("+")[0] == torch.__version__.split("+")[0]
    assert info["torch_cuda_version"] == torch.version.cuda
    check_build_matches(info, torch.__version__, torch.version.cuda)  # no error
    if _extension.has_compiled_kernels():
        assert info["with_cuda"] == _extension.has_cuda_kernels()
    if info["with_cuda"]:
        assert re.fullmatch(r"\d+\.\d+", info["cuda_version"])
        assert info["cuda_version"].split(".")[0] == torch.version.cuda.split(".")[0]
        assert info["cuda_archs"] and all(re.fullmatch(r"\d+\.\d+(\+PTX)?", a) for a in info["cuda_archs"])
    else:
        assert info["cuda_version"] is None and info["cuda_archs"] == []
    assert info["cpu_isas"][0] == "default"
    if platform.machine() in ("x86_64", "AMD64") and info["compiler"].startswith(("gcc", "clang")):
        assert info["cpu_isas"] == ["default", "avx2"]
    assert info["compiler"] and info["compiler"] != "unknown"


@needs_build
def test_build_info_is_a_copy():
    _extension.build_info()["cpu_isas"].append("bogus")
    assert "bogus" not in _extension.build_info()["cpu_isas"]


# ------------------------------------------------------------ check_build_matches


def test_torch_version_mismatch_raises_a_clear_error():
    with pytest.raises(BuildMismatchError) as caught:
        check_build_matches(_build("2.11.0+cu128", "12.8"), "2.13.0+cu130", "13.0")
    message = str(caught.value)
    assert "built against torch 2.11.0 (CUDA 12.8) but torch 2.13.0+cu130 (CUDA 13.0) is running" in message
    assert "torch versions differ" in message and "rebuild" in message and "make clean build" in message
    assert isinstance(caught.value, ImportError)


def test_patch_and_nightly_differences_are_mismatches():
    with pytest.raises(BuildMismatchError, match="torch versions differ"):
        check_build_matches(_build("2.13.1+cu130"), "2.13.0+cu130", "13.0")
    with pytest.raises(BuildMismatchError, match="torch versions differ"):
        check_build_matches(_build("2.13.0.dev20250101+cu130"), "2.13.0.dev20250202+cu130", "13.0")


def test_cuda_major_mismatch_raises():
    with pytest.raises(BuildMismatchError) as caught:
        check_build_matches(_build("2.13.0+cu128", "12.8"), "2.13.0+cu130", "13.0")
    message = str(caught.value)
    assert "built against torch 2.13.0 (CUDA 12.8) but torch 2.13.0+cu130 (CUDA 13.0) is running" in message
    assert "CUDA major versions differ" in message and "torch versions differ" not in message


def test_cuda_build_with_cpu_only_torch_raises():
    with pytest.raises(BuildMismatchError, match=r"\(CPU only\) is running .*need a CUDA build of torch"):
        check_build_matches(_build("2.13.0+cu130", "13.0"), "2.13.0+cpu", None)


def test_compatible_builds_pass():
    # local labels aside, the CPU and CUDA wheels of one release share the ABI
    check_build_matches(_build("2.13.0+cpu", None, with_cuda=False), "2.13.0+cu130", "13.0")
    check_build_matches(_build("2.13.0+cu130", None, with_cuda=False), "2.13.0+cpu", None)
    # CUDA minor versions are compatible
    check_build_matches(_build("2.13.0+cu130", "13.1"), "2.13.0+cu130", "13.0")


# ------------------------------------------------------------ at import time

_FAKE_BUILD_INFO = """
import importlib.abc, importlib.machinery, sys, types
class FakeBuildInfo(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name == "stoichconv._build_info":
            return importlib.machinery.ModuleSpec(name, self)
        return None
    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.build_info = lambda: BUILD
        return module
    def exec_module(self, module):
        pass
sys.meta_path.insert(0, FakeBuildInfo())
"""


def _run(script):
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)


def test_import_with_a_mismatched_build_raises_before_loading_the_kernels():
    build = _build("2.11.0+cu128", "12.8")
    script = f"BUILD = {build!r}\n" + _FAKE_BUILD_INFO + textwrap.dedent(
        """
        import sys
        try:
            import stoichconv
        except ImportError as error:
            assert "stoichconv._C" not in sys.modules, "the kernels were loaded anyway"
            print("ERROR:", error)
        else:
            raise AssertionError("import stoichconv did not raise")
        """
    )
    result = _run(script)
    assert result.returncode == 0, result.stderr
    assert "built against torch 2.11.0 (CUDA 12.8)" in result.stdout
    assert f"torch {torch.__version__}" in result.stdout and "rebuild" in result.stdout


def test_undefined_symbol_at_load_says_torch_version_mismatch():
    script = textwrap.dedent(
        """
        import sys
        class UndefinedSymbol:
            def find_spec(self, name, path=None, target=None):
                if name == "stoichconv._C":
                    raise ImportError("/x/stoichconv/_C.so: undefined symbol: _ZN3c104cuda9SetDeviceEab")
        sys.meta_path.insert(0, UndefinedSymbol())
        try:
            import stoichconv
        except ImportError as error:
            print("ERROR:", error)
        else:
            raise AssertionError("import stoichconv did not raise")
        """
    )
    result = _run(script)
    assert result.returncode == 0, result.stderr
    assert "almost certainly" in result.stdout and "torch version" in result.stdout
    assert "rebuild" in result.stdout and "undefined symbol" in result.stdout


# ------------------------------------------------------------ python -m stoichconv.info


def test_info_command_prints_the_versions():
    result = subprocess.run([sys.executable, "-m", "stoichconv.info"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert torch.__version__ in out and "GPU visible" in out and "backends" in out
    assert re.search(rf"torch CUDA\s+{re.escape(str(torch.version.cuda))}\n", out)
    info = _extension.build_info()
    if info is not None:
        assert info["torch_version_full"] in out and info["compiler"] in out


def test_info_command_json():
    result = subprocess.run(
        [sys.executable, "-m", "stoichconv.info", "--json"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["torch"] == torch.__version__ and info["torch_cuda"] == torch.version.cuda
    assert info["build"] == _extension.build_info()
    assert info["gpu_visible"] == torch.cuda.is_available()
    assert "cpu" in info["backends"] or "compiled CPU kernels" in info["backends"]
