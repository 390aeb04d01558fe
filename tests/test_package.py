"""Package-level behaviour: import without the compiled part, backend choice."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import stoichconv
from stoichconv.backends import BackendUnavailableError, resolve


def test_import_without_extension_warns_once_and_uses_reference():
    script = textwrap.dedent(
        """
        import sys, warnings
        class BlockCompiled:
            def find_spec(self, name, path=None, target=None):
                if name == "stoichconv._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, BlockCompiled())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import stoichconv, torch
            from stoichconv.nn import StoichHypergraphConv
        messages = [str(w.message) for w in caught if "stoichconv._C" in str(w.message)]
        assert len(messages) == 1, messages
        assert "make build" in messages[0] and "reference" in messages[0]
        assert not stoichconv.has_compiled_kernels()
        layer = StoichHypergraphConv(3, 2)
        out = layer(torch.randn(4, 3), torch.tensor([[0, 1, 2], [0, 0, 1]]), torch.tensor([-1.0, 2.0, 1.0]))
        assert out.shape == (4, 2)
        try:
            StoichHypergraphConv(3, 2, backend="cpu")(torch.randn(4, 3), torch.tensor([[0], [0]]), torch.tensor([1.0]))
        except stoichconv.BackendUnavailableError as error:
            assert "make build" in str(error)
        else:
            raise AssertionError("backend='cpu' without _C must raise")
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_auto_backend_on_cpu_is_the_compiled_kernel(monkeypatch):
    monkeypatch.delenv("STOICHCONV_BACKEND", raising=False)
    assert resolve("stoich_conv", "auto", torch.device("cpu")) == "cpu"
    assert resolve("stoich_conv", "reference", torch.device("cpu")) == "reference"


def test_environment_variable_overrides_auto(monkeypatch):
    monkeypatch.setenv("STOICHCONV_BACKEND", "reference")
    assert resolve("stoich_conv", "auto", torch.device("cpu")) == "reference"
    if stoichconv.has_compiled_kernels():
        assert resolve("stoich_conv", "cpu", torch.device("cpu")) == "cpu"  # explicit choice wins
    monkeypatch.setenv("STOICHCONV_BACKEND", "bogus")
    with pytest.raises(ValueError, match="`backend` must be one of"):
        resolve("stoich_conv", "auto", torch.device("cpu"))


def test_forcing_an_unavailable_backend_raises(monkeypatch):
    with pytest.raises(BackendUnavailableError, match="backend='cuda' runs CUDA tensors"):
        resolve("stoich_conv", "cuda", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="backend='triton' runs CUDA tensors"):
        resolve("stoich_conv", "triton", torch.device("cpu"))
    with pytest.raises(ValueError, match="`backend` must be one of"):
        resolve("stoich_conv", "gpu", torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU default of the suite")
def test_suite_runs_triton_through_the_interpreter_without_gpu():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert resolve("stoich_conv", "triton", torch.device("cpu")) == "triton"
