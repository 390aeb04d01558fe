"""The CUDA part of the build, checked without a GPU: the switches of
``stoichconv._build_config.decide_cuda_build``, and, when this environment
can compile CUDA (CUDA build of torch, nvcc found, STOICHCONV_NO_CUDA unset),
that ``stoichconv._C`` carries a CUDA kernel for every declared operator and
device code for sm_80 and sm_90 (and that stoichconv._build_info says so)."""

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


def compiled_ops_of(spec) -> list[str]:
    """The compiled operators an OpSpec of the backend table names (forward, and backward)."""
    return [name for name in (spec.compiled, spec.compiled_backward, spec.compiled_out) if name is not None]


def table_compiled_ops() -> dict[str, object]:
    from stoichconv.backends import OPS

    return {name: spec for spec in OPS.values() for name in compiled_ops_of(spec)}


def test_declared_ops_are_parsed_and_all_in_the_backend_table():
    ops = declared_ops()
    assert "stoich_conv_forward" in ops and "stoich_conv_backward" in ops
    assert set(ops) == set(table_compiled_ops()), "csrc/stoichconv.cpp and the backend table disagree"


@needs_cuda_build
def test_extension_built_with_cuda():
    import stoichconv
    from stoichconv._extension import _C, build_info

    assert _C is not None, "stoichconv._C failed to import"
    info = build_info()
    assert info is not None, "stoichconv._build_info was not built"
    assert info["with_cuda"], "stoichconv._C was built without CUDA although this environment can build it"
    assert info["cuda_version"] is not None and info["cuda_archs"]
    assert stoichconv.has_cuda_kernels()


@needs_cuda_build
@pytest.mark.parametrize("op", sorted(table_compiled_ops()))
def test_every_compiled_op_has_cpu_and_cuda_kernels_as_the_table_declares(op):
    spec = table_compiled_ops()[op]
    assert "cpu" in spec.backends and "cuda" in spec.backends, f"the backend table lists {spec.backends} for {spec.name}"
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
    from stoichconv._extension import build_info

    reported = {"sm_" + arch.split("+")[0].replace(".", "") for arch in build_info()["cuda_archs"]}
    assert reported <= archs, (reported, listing)  # the reported arch list is what was compiled
    assert "stoich_conv_kernels" in listing
