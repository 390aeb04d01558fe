"""``python -m stoichconv.info``: how stoichconv was built and what it can run here.

Prints the build of the compiled extension (:func:`stoichconv._extension.build_info`), the
running torch / CUDA / Triton versions, whether a GPU is visible, and the backends available
per device. ``--json`` prints the same as one JSON object.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any, Optional

import torch

from stoichconv import _extension


def _triton_version() -> Optional[str]:
    try:
        import triton
    except Exception:  # ImportError, or a broken install
        return None
    return getattr(triton, "__version__", "unknown")


def _backends(devices: list[str]) -> dict[str, Any]:
    """``{device: {op: [backends]}}`` from ``stoichconv.backends.available_backends`` when it
    exists, else the coarse switches."""
    try:
        backends = importlib.import_module("stoichconv.backends")
    except Exception:  # noqa: BLE001  (report what is known rather than fail)
        backends = None
    available = getattr(backends, "available_backends", None)
    if callable(available):
        return {d: {op: list(b) for op, b in available(torch.device(d)).items()} for d in devices}
    return {
        "compiled CPU kernels": _extension.has_compiled_kernels(),
        "compiled CUDA kernels": _extension.has_cuda_kernels(),
        "triton importable": _triton_version() is not None,
    }


def collect() -> dict[str, Any]:
    """Everything :func:`main` prints, as a dict."""
    gpu = torch.cuda.is_available()
    devices = ["cpu"] + (["cuda"] if gpu else [])
    return {
        "build": _extension.build_info(),
        "compiled_kernels_loaded": _extension.has_compiled_kernels(),
        "cuda_kernels_loaded": _extension.has_cuda_kernels(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _triton_version(),
        "gpu_visible": gpu,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if gpu else [],
        "backends": _backends(devices),
    }


def _format(info: dict[str, Any]) -> str:
    lines = ["stoichconv build"]
    build = info["build"]
    if build is None:
        lines.append("  (no build information: stoichconv._build_info is not built)")
    else:
        for key in ("torch_version", "torch_version_full", "torch_cuda_version", "with_cuda", "cuda_version", "cuda_archs",
                    "cpu_isas", "compiler"):
            value = build.get(key)
            if isinstance(value, list):
                value = ", ".join(value) or "-"
            lines.append(f"  {key:<20} {value}")
    lines.append(f"  {'_C loaded':<20} {info['compiled_kernels_loaded']} (CUDA kernels: {info['cuda_kernels_loaded']})")
    lines.append("running")
    lines.append(f"  {'python':<20} {info['python']}")
    lines.append(f"  {'torch':<20} {info['torch']}")
    lines.append(f"  {'torch CUDA':<20} {info['torch_cuda']}")
    lines.append(f"  {'triton':<20} {info['triton'] or 'not installed'}")
    gpus = ", ".join(info["gpus"])
    lines.append(f"  {'GPU visible':<20} {info['gpu_visible']}" + (f" ({gpus})" if gpus else ""))
    lines.append("backends")
    for key, value in info["backends"].items():
        if isinstance(value, dict):
            lines.append(f"  {key}:")
            for op, names in value.items():
                lines.append(f"    {op:<18} {', '.join(names) or '-'}")
        else:
            lines.append(f"  {key:<20} {value}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stoichconv.info", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2) if args.json else _format(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
