"""The CUDA part of the build, checked without a GPU: the switches of
``stoichconv._build_config.decide_cuda_build``, and, when this environment
can compile CUDA (CUDA build of torch, nvcc found, STOICHCONV_NO_CUDA unset),
that ``stoichconv._C`` carries a CUDA kernel for every declared operator and
device code for sm_80 and sm_90."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from stoichconv import _build_config as bc

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------ decide_cuda_build


@pytest.fixture
def fake_toolkit(tmp_path):
    """A folder that looks like a CUDA toolkit root (bin/nvcc, lib64)."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "lib64").mkdir()
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\nexit 0\n")
    nvcc.chmod(0o755)
    return tmp_path


@pytest.fixture
def no_default_toolkit(monkeypatch):
    """Pretend /usr/local/cuda does not exist, so only the environment counts."""
    monkeypatch.setattr(bc, "DEFAULT_CUDA_HOME", "/nonexistent/stoichconv-test-cuda")


def test_no_cuda_switch_wins_even_with_a_toolkit(fake_toolkit):
    decision = bc.decide_cuda_build({"STOICHCONV_NO_CUDA": "1", "CUDA_HOME": str(fake_toolkit)}, "13.0")
    assert not decision.with_cuda and "STOICHCONV_NO_CUDA" in decision.reason


def test_no_cuda_and_force_cuda_contradict():
    with pytest.raises(bc.CudaBuildError, match="contradict"):
        bc.decide_cuda_build({"STOICHCONV_NO_CUDA": "1", "FORCE_CUDA": "1"}, "13.0")


def test_force_cuda_with_cpu_torch_raises(fake_toolkit):
    with pytest.raises(bc.CudaBuildError, match="CPU-only build"):
        bc.decide_cuda_build({"FORCE_CUDA": "1", "CUDA_HOME": str(fake_toolkit)}, None)


def test_force_cuda_without_toolkit_raises(no_default_toolkit, tmp_path):
    env = {"FORCE_CUDA": "1", "PATH": str(tmp_path)}  # no nvcc on this PATH
    with pytest.raises(bc.CudaBuildError, match="no CUDA toolkit"):
        bc.decide_cuda_build(env, "13.0")
    # a CUDA_HOME without bin/nvcc is no toolkit either
    with pytest.raises(bc.CudaBuildError, match="no CUDA toolkit"):
        bc.decide_cuda_build({**env, "CUDA_HOME": str(tmp_path)}, "13.0")


def test_force_cuda_with_toolkit_builds(fake_toolkit):
    decision = bc.decide_cuda_build({"FORCE_CUDA": "1", "CUDA_HOME": str(fake_toolkit)}, "13.0")
    assert decision.with_cuda and decision.cuda_home == str(fake_toolkit)


def test_auto_cpu_torch_skips_cuda(fake_toolkit):
    decision = bc.decide_cuda_build({"CUDA_HOME": str(fake_toolkit)}, None)
    assert not decision.with_cuda and "CPU-only" in decision.reason


def test_auto_without_nvcc_skips_cuda(no_default_toolkit, tmp_path):
    decision = bc.decide_cuda_build({"PATH": str(tmp_path)}, "13.0")
    assert not decision.with_cuda and decision.reason == "nvcc not found"


def test_auto_with_toolkit_builds_cuda(fake_toolkit):
    decision = bc.decide_cuda_build({"CUDA_PATH": str(fake_toolkit)}, "13.0")
    assert decision.with_cuda and decision.cuda_home == str(fake_toolkit)


def test_auto_finds_toolkit_from_nvcc_on_path(no_default_toolkit, fake_toolkit):
    decision = bc.decide_cuda_build({"PATH": str(fake_toolkit / "bin")}, "13.0")
    assert decision.with_cuda and Path(decision.cuda_home).resolve() == fake_toolkit.resolve()


@pytest.mark.parametrize("value,expected", [("1", True), ("true", True), ("ON", True), ("0", False), ("", False), ("no", False)])
def test_flag_spellings(value, expected, fake_toolkit):
    env = {"STOICHCONV_NO_CUDA": value, "CUDA_HOME": str(fake_toolkit)}
    assert bc.decide_cuda_build(env, "13.0").with_cuda is not expected


# ------------------------------------------------------------ the built extension


def _cuda_build_expected() -> bool:
    if torch.version.cuda is None or os.environ.get("STOICHCONV_NO_CUDA", "").strip().lower() in {"1", "true", "yes", "on"}:
        return False
    try:
        return bc.decide_cuda_build(os.environ, torch.version.cuda).with_cuda
    except bc.CudaBuildError:
        return False


needs_cuda_build = pytest.mark.skipif(
    not _cuda_build_expected(), reason="no CUDA build here (CPU torch, no nvcc, or STOICHCONV_NO_CUDA=1)"
)


def declared_ops() -> list[str]:
    source = (ROOT / "csrc" / "stoichconv.cpp").read_text()
    return re.findall(r'm\.def\(\s*"(\w+)\(', source)


# Ops with a CPU kernel only (documented in their module and the README): on a
# GPU their callers run a pure-PyTorch path.
CPU_ONLY_OPS = {"gatv2_forward", "gatv2_backward", "group_softmax", "group_softmax_backward"}


def test_declared_ops_are_parsed():
    ops = declared_ops()
    assert "stoich_conv_forward" in ops and "stoich_conv_backward" in ops
    assert CPU_ONLY_OPS <= set(ops)


@needs_cuda_build
def test_extension_built_with_cuda():
    import stoichconv
    from stoichconv._extension import _C

    assert _C is not None, "stoichconv._C failed to import"
    assert _C.with_cuda == 1, "stoichconv._C was built without CUDA although this environment can build it"
    assert stoichconv.has_cuda_kernels()


@needs_cuda_build
@pytest.mark.parametrize("op", [op for op in declared_ops() if op not in CPU_ONLY_OPS])
def test_every_declared_op_has_a_cuda_kernel(op):
    import stoichconv  # noqa: F401  (loads the kernels)

    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"stoichconv::{op}", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"stoichconv::{op}", "CUDA"), f"no CUDA kernel for {op}"


def find_cuobjdump():
    candidates = []
    cuda_home = bc.find_cuda_home(os.environ)
    if cuda_home:
        candidates.append(Path(cuda_home) / "bin" / "cuobjdump")
    on_path = shutil.which("cuobjdump")
    if on_path:
        candidates.append(Path(on_path))
    try:  # triton ships one with its NVIDIA backend
        import triton

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except ImportError:
        pass
    for c in candidates:
        if c.exists() and os.access(c, os.X_OK):
            return str(c)
    return None


@needs_cuda_build
def test_extension_holds_sm80_and_sm90_code():
    from stoichconv._extension import _C

    tool = find_cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (toolkit bin/, PATH, or triton's bundled copy)")
    listing = subprocess.run([tool, "--list-elf", _C.__file__], capture_output=True, text=True, check=True).stdout
    archs = set(re.findall(r"\.(sm_\d+)\.cubin", listing))
    assert {"sm_80", "sm_90"} <= archs, listing
    assert "stoich_conv_kernels" in listing
