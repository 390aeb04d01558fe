#!/usr/bin/env python3
"""The GPU check on one lent GPU machine: ``make gpu-check`` (tier 1), ``make gpu-sanitize``
(tier 2), and their dry run on a machine without a GPU (``DRY_RUN=1``, run by CI).

Started by ``tools/gpu_check.sh``, which picks the Python that has torch. Expected there (the
lent H200 machines): Python 3.12 at ``/opt/torch/.venv``, torch 2.11.0+cu130, triton 3.6,
torch-geometric 2.8, pytest (+ pytest-xdist), nvcc 13.0, compute-sanitizer, 16 cores, no
package registry. The extension is built *there*: ``stoichconv._C`` built on the development
machines (Python 3.11, torch 2.13) does not load on that Python/torch, and none is carried.
Nothing is downloaded (``PIP_NO_INDEX=1``, ``--no-build-isolation --no-deps``).

Tier 1 (budget 6 minutes from a bare machine, build included; hard deadline 560 s, under the
10-minute limit of one command):

1. ``env``: Python, torch, triton, GPU, nvcc, compute-sanitizer, versions (fails without a GPU);
2. ``build``: ``pip install --no-build-isolation --no-deps -e .`` with ``FORCE_CUDA=1``,
   ``TORCH_CUDA_ARCH_LIST`` = the device's capability (9.0 on an H200) and ``MAX_JOBS`` = cores;
   if pip fails (e.g. a setuptools too old for pyproject's SPDX license) ``setup.py build_ext
   --inplace`` from a scratch folder without ``pyproject.toml``; skipped when
   ``build/gpu-check-build.json`` records a build of the same sources for this torch and the
   extension imports with its CUDA kernels (a rerun on a warm machine);
3. ``gpu_tests`` (``pytest tests/gpu``: real-size CUDA/Triton checks) and ``kernel_tests``
   (``pytest tests -m cuda --ignore=tests/gpu``, with ``-n 6`` where pytest-xdist is installed),
   run concurrently;
4. ``bench``: ``benchmarks/gpu_bench.py --quick``; its table is printed last.

Tier 2 (budget 4 minutes, on the machine tier 1 built; hard deadline 330 s): ``env``, ``probe``
(compute-sanitizer present and accepting the device: where it refuses, every sanitizer step
is reported as skipped with the sanitizer's message and the tier passes), ``build`` (normally
skipped: up to date), then ``memcheck``, ``racecheck``, ``initcheck`` and ``synccheck`` over
``tests/gpu/test_sanitizer_subset.py`` (extra sanitizer options: ``GPU_SANITIZE_ARGS``).

Results, under ``GPU_CHECK_OUT`` (default ``bench-results/gpu-check``), at most 8 files, no
sub-folder: ``tier<N>.log`` (every step's output, each step's log capped at 4 MiB: its head and
tail), ``tier<N>-summary.json`` (per step: name, status, seconds, estimate, command, test counts,
failures, skip reasons, slowest tests, junit properties such as measured errors and host-sync
counts, sanitizer error counts; for the bench its rows), rewritten after every step so that a
killed run still leaves one. While a step runs, its log, junit XML and bench JSON sit in the
same folder as ``.tmp-*`` files (at most 5 at once, removed when merged). The dry run writes
``dry-run.json``.

Dry run (``DRY_RUN=1`` or ``--dry-run``; no GPU needed, < 30 s): checks that the scripts parse
(``bash -n``, byte-compiling), that every path a step names exists, collects every pytest step
(in this process, ``--collect-only``) and fails a step that selects no test, builds and calls
every benchmark case on the CPU (``gpu_bench.py --dry-run``, in a second process while the
collections run), and prints the plan with an estimate per
step and per tier; it fails when a tier's estimate exceeds its budget.

Estimates: seconds on the lent machine from the counts collected here (constants below). They
are guesses until a GPU run: its summary records each step's measured seconds next to the
estimate for the same counts.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = {1: 360, 2: 240}
DEADLINE_S = {1: 560, 2: 330}
TIER_NAMES = {1: "make gpu-check", 2: "make gpu-sanitize"}
MAX_FILES, MAX_FILE_BYTES = 8, 16 * 2**20
STEP_LOG_HEAD, STEP_LOG_TAIL = 1 * 2**20, 3 * 2**20
XDIST_WORKERS = 6
XDIST_EFFICIENCY = 0.7  # 6 workers on one GPU sharing 8 of the 16 cores with gpu_tests do not give 6x
BUILD_ESTIMATE_S = 170  # the CUDA extension for sm_90 only at MAX_JOBS=16: ~2-3 min (recorded)
SANITIZER_REFUSED = re.compile(r"device not supported|not supported on this|unsupported (device|gpu)|"
                               r"no supported device|is not supported", re.IGNORECASE)
SANITIZER_SUBSET = "tests/gpu/test_sanitizer_subset.py"
EXPECTED = "Python 3.12 (/opt/torch/.venv), torch 2.11.0+cu130, triton 3.6, one H200 (sm_90)"
CLEAR_ENV = ("TRITON_INTERPRET", "STOICHCONV_NO_CUDA", "STOICHCONV_BACKEND", "STOICHCONV_CPU_ISA")


@dataclass
class Step:
    name: str
    tier: int
    kind: str  # env | build | pytest | bench | probe | sanitizer
    what: str
    pytest_args: tuple = ()
    tool: Optional[str] = None  # compute-sanitizer --tool
    group: Optional[str] = None  # steps of one group run concurrently
    base_s: float = 0.0  # estimate = base_s + tests * per_test_s (/ xdist speed-up)
    per_test_s: float = 0.0
    cap_s: float = 60.0  # hard timeout of the step
    threads: Optional[int] = None  # OMP_NUM_THREADS for the step's processes
    xdist: bool = False
    env: dict = field(default_factory=dict)

    def estimate(self, tests: Optional[int], xdist: bool = True) -> float:
        if self.kind not in ("pytest", "sanitizer") or tests is None:
            return self.base_s
        speed = XDIST_WORKERS * XDIST_EFFICIENCY if (self.xdist and xdist) else 1.0
        return self.base_s + tests * self.per_test_s / speed


NO_CACHING = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}  # out-of-bounds accesses not hidden in torch's pool
NOT_MODEL = ("-k", "not hetero_cell")  # racecheck/initcheck/synccheck: our kernels, not a model's cuBLAS calls

STEPS = [
    Step("env", 1, "env", "report Python/torch/triton/GPU/nvcc/compute-sanitizer; fail without a GPU",
         base_s=10, cap_s=60),
    Step("build", 1, "build", "pip install --no-build-isolation --no-deps -e . (FORCE_CUDA=1, the device's "
         "arch, MAX_JOBS=cores)", base_s=BUILD_ESTIMATE_S, cap_s=330),
    # per test: real-size cases (B = 256 comparisons with the CPU kernel, float64 references,
    # HeteroCell pairs, a training step) ~1.5 s on average, Triton compiles included
    Step("gpu_tests", 1, "pytest", "real-size CUDA/Triton checks (tests/gpu)", pytest_args=("tests/gpu",),
         group="tests", base_s=10, per_test_s=1.5, cap_s=240, threads=8),
    # small unit tests: ~0.25 s each on a GPU (gradcheck/opcheck the slowest), plus ~30 s of
    # Triton compiles and start-up
    Step("kernel_tests", 1, "pytest", "the CUDA/Triton unit tests (-m cuda) outside tests/gpu",
         pytest_args=("tests", "-m", "cuda", "--ignore=tests/gpu"), group="tests", base_s=40, per_test_s=0.25,
         cap_s=240, threads=1, xdist=True),
    Step("bench", 1, "bench", "benchmarks/gpu_bench.py --quick (table printed last)", cap_s=120),
    Step("env", 2, "env", "report Python/torch/GPU/compute-sanitizer; fail without a GPU", base_s=10, cap_s=60),
    Step("probe", 2, "probe", "compute-sanitizer present and accepting the device (else: skipped, reported)",
         base_s=15, cap_s=60),
    Step("build", 2, "build", "normally up to date from tier 1 on this machine (else +%d s)" % BUILD_ESTIMATE_S,
         base_s=0, cap_s=330),
    Step("memcheck", 2, "sanitizer", "compute-sanitizer memcheck, caching allocator off",
         pytest_args=(SANITIZER_SUBSET,), tool="memcheck", base_s=25, per_test_s=3.0, cap_s=90, threads=4,
         env=NO_CACHING),
    Step("racecheck", 2, "sanitizer", "compute-sanitizer racecheck (shared-memory races)",
         pytest_args=(SANITIZER_SUBSET, *NOT_MODEL), tool="racecheck", base_s=25, per_test_s=4.0, cap_s=90,
         threads=4),
    Step("initcheck", 2, "sanitizer", "compute-sanitizer initcheck, caching allocator off",
         pytest_args=(SANITIZER_SUBSET, *NOT_MODEL), tool="initcheck", base_s=25, per_test_s=3.0, cap_s=80,
         threads=4, env=NO_CACHING),
    Step("synccheck", 2, "sanitizer", "compute-sanitizer synccheck (barrier misuse)",
         pytest_args=(SANITIZER_SUBSET, *NOT_MODEL), tool="synccheck", base_s=20, per_test_s=2.5, cap_s=70,
         threads=4),
]


def tier_steps(tier: int) -> list:
    return [s for s in STEPS if s.tier == tier]


def log(msg: str) -> None:
    print(f"[gpu-check] {msg}", flush=True)


def _truthy(value: Optional[str]) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def _paths_named(args) -> list:
    """The test paths of a pytest argument list (not option values, not ``--ignore``)."""
    paths, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a in ("-m", "-k", "-n", "-p", "-o"):
            skip = True
        elif not a.startswith("-"):
            paths.append(a)
    return paths


def tier_total(tier: int, estimates: dict) -> float:
    """Sequential steps add up; a concurrent group counts as its longest step."""
    total, groups = 0.0, collections.defaultdict(float)
    for s in tier_steps(tier):
        if s.group:
            groups[s.group] = max(groups[s.group], estimates[s.name])
        else:
            total += estimates[s.name]
    return total + sum(groups.values())


# ====================================================================== output folder


class Out:
    """The results folder: the tier log, the summary JSON and the transient ``.tmp-*`` files."""

    def __init__(self, path: Path, tier: int):
        self.path = path
        self.tier = tier
        self.path.mkdir(parents=True, exist_ok=True)
        self.log_path = path / f"tier{tier}.log"
        self.summary_path = path / f"tier{tier}-summary.json"
        for stale in list(path.glob(".tmp-*")) + [self.log_path, self.summary_path]:
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()

    def tmp(self, name: str) -> Path:
        return self.path / f".tmp-{name}"

    def append_step_log(self, step_name: str, header: str, tmp_log: Path, footer: str) -> None:
        with open(self.log_path, "ab") as out:
            out.write(f"\n===== {step_name}: {header}\n".encode())
            if tmp_log.exists():
                size = tmp_log.stat().st_size
                with open(tmp_log, "rb") as f:
                    if size <= STEP_LOG_HEAD + STEP_LOG_TAIL:
                        shutil.copyfileobj(f, out)
                    else:
                        out.write(f.read(STEP_LOG_HEAD))
                        out.write(f"\n[... {size - STEP_LOG_HEAD - STEP_LOG_TAIL} bytes left out ...]\n".encode())
                        f.seek(size - STEP_LOG_TAIL)
                        out.write(f.read())
                tmp_log.unlink()
            out.write(f"\n===== {step_name}: {footer}\n".encode())

    def write_summary(self, summary: dict) -> None:
        tmp = self.tmp("summary.json")
        tmp.write_text(json.dumps(summary, indent=2, default=str))
        os.replace(tmp, self.summary_path)

    def audit(self) -> dict:
        """Files under the folder against the limits of what comes back (8 files, 16 MiB each,
        two folders deep counted from the folder's parent)."""
        files = [p for p in self.path.rglob("*") if p.is_file()]
        problems = []
        if len(files) > MAX_FILES:
            problems.append(f"{len(files)} files (limit {MAX_FILES})")
        for p in files:
            if p.stat().st_size > MAX_FILE_BYTES:
                problems.append(f"{p.name}: {p.stat().st_size} bytes (limit {MAX_FILE_BYTES})")
            if len(p.relative_to(self.path).parts) > 1:
                problems.append(f"{p.relative_to(self.path)}: in a sub-folder")
        return {"files": sorted(str(p.relative_to(self.path)) for p in files), "problems": problems}


# ====================================================================== processes


class Proc:
    """One child process in its own session, output to a log file, killed with its group on timeout."""

    def __init__(self, cmd, log_path: Path, env: dict, cap_s: float):
        self.cmd = [str(c) for c in cmd]
        self.log_path = log_path
        self.cap_s = cap_s
        self.start = time.monotonic()
        self.timed_out = False
        self.file = open(log_path, "ab")
        shown = [c if len(c) <= 160 else c[:60].replace("\n", " ") + " ..." for c in self.cmd]
        self.file.write(("$ " + " ".join(shown) + "\n").encode())
        self.file.flush()
        self.popen = subprocess.Popen(self.cmd, cwd=ROOT, env=env, stdout=self.file, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)

    def poll(self) -> Optional[int]:
        rc = self.popen.poll()
        if rc is None and time.monotonic() - self.start > self.cap_s:
            self.timed_out = True
            self.kill()
            rc = self.popen.wait()
        if rc is not None:
            self.file.close()
        return rc

    def wait(self) -> int:
        while True:
            rc = self.poll()
            if rc is not None:
                return rc
            time.sleep(0.5)

    def kill(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, sig)
            try:
                self.popen.wait(timeout=10)
                return
            except subprocess.TimeoutExpired:
                continue

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.start


RUNNING: list = []


def _on_signal(signum, _frame):
    raise SystemExit(128 + signum)


def run_cmd(cmd, log_path: Path, env: dict, cap_s: float) -> tuple:
    """Run ``cmd`` to completion (or its cap); returns ``(rc, timed_out)``."""
    proc = Proc(cmd, log_path, env, max(cap_s, 1.0))
    RUNNING.append(proc)
    try:
        rc = proc.wait()
    finally:
        RUNNING.remove(proc)
    return rc, proc.timed_out


def _tail(path: Path, lines: int = 8) -> str:
    if not path.exists():
        return ""
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 8192))
        text = f.read().decode(errors="replace")
    return "\n".join(text.rstrip().splitlines()[-lines:])


# ====================================================================== environment


ENV_PROBE = r"""
import json, sys
info = {"python": sys.version.split()[0], "executable": sys.executable}
try:
    import torch
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, capability="%d.%d" % (p.major, p.minor), memory_gb=round(p.total_memory / 2**30, 1),
                    devices=torch.cuda.device_count())
except Exception as error:
    info["torch_error"] = "%s: %s" % (type(error).__name__, error)
import importlib, importlib.metadata
for dist, mod in (("triton", "triton"), ("torch_geometric", "torch_geometric"), ("pytest", "pytest"),
                  ("pytest-xdist", "xdist"), ("setuptools", "setuptools"), ("numpy", "numpy"),
                  ("hypothesis", "hypothesis"), ("ninja", "ninja"), ("pybind11", "pybind11")):
    try:
        info[dist] = importlib.metadata.version(dist)
    except Exception:
        info[dist] = None
print("GPU_CHECK_ENV " + json.dumps(info))
"""


def _build_config():
    spec = importlib.util.spec_from_file_location("_gpu_check_build_config", ROOT / "stoichconv" / "_build_config.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def find_tools(env: dict) -> dict:
    cuda_home = env.get("CUDA_HOME") or _build_config().find_cuda_home(env)
    tools = {"cuda_home": cuda_home, "nvcc": None, "compute_sanitizer": None}
    candidates = []
    if cuda_home:
        tools["nvcc"] = str(Path(cuda_home, "bin", "nvcc")) if Path(cuda_home, "bin", "nvcc").exists() else None
        candidates += [Path(cuda_home, "bin", "compute-sanitizer"),
                       Path(cuda_home, "compute-sanitizer", "compute-sanitizer")]
    which = shutil.which("compute-sanitizer", path=env.get("PATH"))
    if which:
        candidates.append(Path(which))
    for c in candidates:
        if c.exists() and os.access(c, os.X_OK):
            tools["compute_sanitizer"] = str(c)
            break
    tools["nvcc"] = tools["nvcc"] or shutil.which("nvcc", path=env.get("PATH"))
    return tools


def child_env(extra: Optional[dict] = None) -> dict:
    env = dict(os.environ)
    for key in CLEAR_ENV:
        env.pop(key, None)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", FORCE_CUDA="1")
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    if extra:
        env.update({k: str(v) for k, v in extra.items() if v is not None})
    return env


# ====================================================================== build


def source_hash(extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    files = [ROOT / "setup.py", ROOT / "pyproject.toml", ROOT / "stoichconv" / "_build_config.py"]
    files += sorted(p for p in (ROOT / "csrc").rglob("*") if p.is_file())
    for p in files:
        if p.exists():
            h.update(str(p.relative_to(ROOT)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


CHECK_BUILD = ("import stoichconv, torch; from stoichconv._extension import _C, build_info; "
               "assert stoichconv.has_cuda_kernels(), 'stoichconv._C has no CUDA kernels'; "
               "print('stoichconv._C with CUDA kernels:', _C.__file__); print('build info:', build_info())")


def build(py: str, env: dict, log_path: Path, cap_s: float) -> tuple:
    """Build (or find up to date) the extension; returns ``(rc, timed_out, note)``."""
    deadline = time.monotonic() + cap_s
    stamp = ROOT / "build" / "gpu-check-build.json"
    key = source_hash(f"{py}|{env.get('TORCH_CUDA_ARCH_LIST')}|{env.get('GPU_CHECK_TORCH')}")
    if stamp.exists() and json.loads(stamp.read_text() or "{}").get("hash") == key:
        rc, timed_out = run_cmd([py, "-c", CHECK_BUILD], log_path, env, deadline - time.monotonic())
        if rc == 0:
            return 0, False, "up to date (same sources, this torch): not rebuilt"
    rc, timed_out = run_cmd([py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-v", "-e", "."],
                            log_path, env, deadline - time.monotonic())
    note = "pip install -e ."
    if rc != 0 and not timed_out:
        # e.g. setuptools < 77 rejects pyproject's SPDX license string: build the extension in
        # place from a scratch folder that has no pyproject.toml (sources linked, not copied)
        scratch = ROOT / "build" / "gpu-check-scratch"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        shutil.copy2(ROOT / "setup.py", scratch / "setup.py")
        for name in ("csrc", "stoichconv"):
            (scratch / name).symlink_to(ROOT / name, target_is_directory=True)
        with open(log_path, "ab") as f:
            f.write(b"\n[gpu-check] pip install failed; fallback: setup.py build_ext --inplace (no pyproject)\n")
        scratch_env = dict(env, PYTHONPATH=env.get("PYTHONPATH", ""))
        proc_cmd = ["bash", "-c", f"cd {scratch} && {py} setup.py build_ext --inplace"]
        rc, timed_out = run_cmd(proc_cmd, log_path, scratch_env, deadline - time.monotonic())
        for name in ("csrc", "stoichconv"):  # the links only, never what they point to
            (scratch / name).unlink()
        shutil.rmtree(scratch, ignore_errors=True)
        note = "pip install -e . failed; built with setup.py build_ext --inplace"
    if rc == 0:
        rc, timed_out = run_cmd([py, "-c", CHECK_BUILD], log_path, env, max(deadline - time.monotonic(), 30))
        if rc == 0:
            stamp.parent.mkdir(exist_ok=True)
            stamp.write_text(json.dumps({"hash": key, "python": py, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}))
    return rc, timed_out, note


# ====================================================================== results


def parse_junit(path: Path) -> Optional[dict]:
    if not path.exists():
        return None
    try:
        tree = ET.parse(path)
    except ET.ParseError as error:
        return {"parse_error": str(error)}
    counts = collections.Counter()
    failures, skips, durations, properties = [], collections.Counter(), [], {}
    for case in tree.iter("testcase"):
        nodeid = f"{case.get('classname', '')}::{case.get('name', '')}"
        counts["tests"] += 1
        durations.append((float(case.get("time") or 0), nodeid))
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "errors"
                message = (child.get("message") or child.text or "").strip().splitlines()
                failures.append(f"{nodeid}: {message[0][:300] if message else child.tag}")
            elif child.tag == "skipped":
                outcome = "skipped"
                skips[(child.get("message") or "")[:200]] += 1
            elif child.tag == "properties":
                properties[nodeid] = {p.get("name"): p.get("value") for p in child.iter("property")}
        counts[outcome] += 1
    durations.sort(reverse=True)
    return {**{k: counts.get(k, 0) for k in ("tests", "passed", "failed", "errors", "skipped")},
            "failures": failures[:40], "skip_reasons": dict(skips.most_common(20)),
            "slowest": [[n, round(t, 2)] for t, n in durations[:10]], "properties": properties,
            "test_seconds": round(sum(t for t, _ in durations), 1)}


def sanitizer_findings(log_path: Path) -> dict:
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    counts = [int(m) for m in re.findall(r"ERROR SUMMARY:\s*(\d+)\s+error", text)]
    lines = [ln for ln in text.splitlines() if ln.startswith("=========") and
             re.search(r"Invalid|Race|race|Uninitiali|Barrier|barrier|Error|error", ln)
             and "ERROR SUMMARY" not in ln]
    refused = SANITIZER_REFUSED.search(text) if not counts else None
    return {"errors": sum(counts) if counts else None, "reports": lines[:20],
            "refused": refused.group(0) if refused else None}


def format_steps(records: list) -> str:
    lines = [f"{'step':<14} {'status':<28} {'seconds':>8} {'estimate':>9}  tests (passed/failed/errors/skipped)"]
    for r in records:
        t = r.get("tests") or {}
        tests = f"{t.get('passed', 0)}/{t.get('failed', 0)}/{t.get('errors', 0)}/{t.get('skipped', 0)}" if t else ""
        sec = f"{r['seconds']:.0f}" if r.get("seconds") is not None else "-"
        est = f"{r['estimate_s']:.0f}" if r.get("estimate_s") is not None else "-"
        lines.append(f"{r['name']:<14} {r['status'][:28]:<28} {sec:>8} {est:>9}  {tests}")
    return "\n".join(lines)


# ====================================================================== real run


def pytest_cmd(py: str, step: Step, junit: Path, use_xdist: bool) -> list:
    cmd = [py, "-m", "pytest", *step.pytest_args, "-q", "-rfEs", "--durations=10", f"--junitxml={junit}",
           "-o", "junit_family=xunit1", "-o", "junit_logging=no", "-p", "no:cacheprovider"]
    if step.xdist and use_xdist:
        cmd += ["-n", str(XDIST_WORKERS)]
    return cmd


def real_run(tier: int, py: str, out: Out) -> int:
    started = time.monotonic()
    deadline = started + DEADLINE_S[tier]
    summary = {"tier": tier, "target": TIER_NAMES[tier], "budget_s": BUDGET_S[tier], "deadline_s": DEADLINE_S[tier],
               "python": py, "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "expected_machine": EXPECTED,
               "steps": [], "status": "running"}
    records = {}
    steps = tier_steps(tier)
    for s in steps:
        records[s.name] = {"name": s.name, "kind": s.kind, "what": s.what, "status": "not run", "seconds": None,
                           "estimate_s": s.estimate(None), "cap_s": s.cap_s}
    summary["steps"] = [records[s.name] for s in steps]
    out.write_summary(summary)
    env = child_env()
    tools = find_tools(env)
    if tools["cuda_home"]:
        env["CUDA_HOME"] = tools["cuda_home"]
    state = {"use_xdist": False, "sanitizer": tools["compute_sanitizer"], "sanitizer_ok": False, "abort": None}

    def finish(step: Step, rc, timed_out, seconds, tmp_log, status=None, header="", **extra):
        rec = records[step.name]
        if status is None:
            status = "ok" if rc == 0 else (f"TIMEOUT after {step.cap_s:.0f} s" if timed_out else f"FAILED (rc {rc})")
            if step.kind in ("pytest", "sanitizer") and rc == 5:
                status = "FAILED (no test selected)"
        rec.update(status=status, rc=rc, seconds=round(seconds, 1), **extra)
        out.append_step_log(step.name, header, tmp_log, f"{status} in {seconds:.0f} s")
        out.write_summary(summary)
        log(f"<<< {step.name}: {status} in {seconds:.0f} s (estimate {rec['estimate_s']:.0f} s)")

    def cap(step: Step, reserve: float = 0.0) -> float:
        return min(step.cap_s, deadline - time.monotonic() - reserve)

    def run_env(step):
        tmp_log = out.tmp(f"{step.name}.log")
        start = time.monotonic()
        rc, timed_out = run_cmd([py, "-c", ENV_PROBE], tmp_log, env, cap(step))
        text = tmp_log.read_text(errors="replace") if tmp_log.exists() else ""
        m = re.search(r"^GPU_CHECK_ENV (.*)$", text, re.MULTILINE)
        info = json.loads(m.group(1)) if m else {}
        info.update(tools, cores=os.cpu_count(), disk_free_gb=round(shutil.disk_usage(ROOT).free / 2**30, 1),
                    max_jobs=env.get("MAX_JOBS"))
        if tools["nvcc"]:
            with contextlib.suppress(Exception):
                version = subprocess.run([tools["nvcc"], "--version"], capture_output=True, text=True, timeout=30)
                info["nvcc_version"] = version.stdout.strip().splitlines()[-1]
        summary["env"] = info
        notes = []
        if info.get("setuptools") and int(info["setuptools"].split(".")[0]) < 77:
            notes.append(f"setuptools {info['setuptools']} < 77: pip install -e may fail on pyproject; fallback build")
        if tier == 1 and not info.get("pytest-xdist"):
            notes.append(f"pytest-xdist missing: kernel_tests run serially (estimate assumes -n {XDIST_WORKERS})")
        if not info.get("triton"):
            notes.append("triton missing: the Triton cases fail")
        if not info.get("torch"):
            state["abort"] = f"torch does not import with {py}: {info.get('torch_error')}"
        elif not info.get("cuda_available"):
            state["abort"] = f"torch {info.get('torch')} sees no CUDA GPU here"
        elif not tools["nvcc"]:
            state["abort"] = "no nvcc found (CUDA_HOME, /usr/local/cuda, PATH): the extension cannot be built"
        state["use_xdist"] = bool(info.get("pytest-xdist"))
        if info.get("capability") and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            env["TORCH_CUDA_ARCH_LIST"] = info["capability"]
        env["GPU_CHECK_TORCH"] = str(info.get("torch"))
        for n in notes:
            log("note: " + n)
        with open(tmp_log, "a") as f:
            f.write(json.dumps(info, indent=2) + "\n" + "\n".join(notes) + "\n")
        log("env: " + ", ".join(f"{k}={info.get(k)}" for k in ("python", "torch", "triton", "device", "capability",
                                                                   "nvcc_version", "compute_sanitizer")))
        status = f"FAILED: {state['abort']}" if state["abort"] else None
        finish(step, 1 if state["abort"] else rc, timed_out, time.monotonic() - start, tmp_log, status=status,
               header="environment", notes=notes)

    def run_build(step):
        tmp_log = out.tmp(f"{step.name}.log")
        start = time.monotonic()
        reserve = 120 if tier == 1 else 60
        rc, timed_out, note = build(py, env, tmp_log, cap(step, reserve))
        status = None
        if rc == 0 and note.startswith("up to date"):
            status = "ok (up to date)"
        finish(step, rc, timed_out, time.monotonic() - start, tmp_log, status=status,
               header=f"{note}; TORCH_CUDA_ARCH_LIST={env.get('TORCH_CUDA_ARCH_LIST')} MAX_JOBS={env.get('MAX_JOBS')}",
               note=note)
        if rc != 0:
            state["abort"] = "the build failed"

    def run_pytest_group(group_steps):
        procs = {}
        for step in group_steps:
            junit = out.tmp(f"{step.name}.xml")
            cmd = pytest_cmd(py, step, junit, state["use_xdist"])
            step_env = dict(env, **{k: v for k, v in step.env.items()})
            if step.threads:
                step_env["OMP_NUM_THREADS"] = str(step.threads)
            records[step.name]["command"] = " ".join(cmd[1:])
            log(f">>> {step.name} (cap {cap(step, 60 if tier == 1 else 0):.0f} s): {' '.join(cmd[1:])}")
            proc = Proc(cmd, out.tmp(f"{step.name}.log"), step_env, cap(step, 60 if tier == 1 else 0))
            RUNNING.append(proc)
            procs[step.name] = (step, proc, junit)
        pending = dict(procs)
        while pending:
            for name, (step, proc, junit) in list(pending.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                RUNNING.remove(proc)
                del pending[name]
                tests = parse_junit(junit)
                with contextlib.suppress(FileNotFoundError):
                    junit.unlink()
                est = step.estimate(tests.get("tests") if tests else None, state["use_xdist"])
                records[name]["estimate_s"] = round(est, 1)
                status = None
                if rc == 0 and tests and tests.get("tests", 0) == 0:
                    status, rc = "FAILED (no test ran)", 5
                finish(step, rc, proc.timed_out, proc.seconds, proc.log_path, status=status,
                       header=records[name]["command"], tests=tests)
                print(_tail(out.log_path, 6), flush=True)
            time.sleep(0.5)

    def run_bench(step):
        tmp_log, tmp_json = out.tmp(f"{step.name}.log"), out.tmp("bench.json")
        cmd = [py, "benchmarks/gpu_bench.py", "--quick", "--json", str(tmp_json)]
        records[step.name]["command"] = " ".join(cmd[1:])
        log(f">>> {step.name} (cap {cap(step):.0f} s): {' '.join(cmd[1:])}")
        start = time.monotonic()
        rc, timed_out = run_cmd(cmd, tmp_log, dict(env, OMP_NUM_THREADS="8"), cap(step))
        rows = json.loads(tmp_json.read_text()) if tmp_json.exists() else []
        with contextlib.suppress(FileNotFoundError):
            tmp_json.unlink()
        text = tmp_log.read_text(errors="replace") if tmp_log.exists() else ""
        table = text[text.find("GPU benchmark on"):] if "GPU benchmark on" in text else ""
        m = re.search(r"^GPU_BENCH_ESTIMATE_S ([0-9.]+)", text, re.MULTILINE)
        if m:
            records[step.name]["estimate_s"] = float(m.group(1))
        finish(step, rc, timed_out, time.monotonic() - start, tmp_log, header=records[step.name]["command"],
               rows=rows, table=table.strip())
        return table

    def run_probe(step):
        tmp_log = out.tmp(f"{step.name}.log")
        start = time.monotonic()
        san = state["sanitizer"]
        if not san:
            tmp_log.write_text("compute-sanitizer not found ($CUDA_HOME/bin, $CUDA_HOME/compute-sanitizer, PATH)\n")
            state["skip_reason"] = "compute-sanitizer not found"
            finish(step, 0, False, time.monotonic() - start, tmp_log, status="skipped: compute-sanitizer not found",
                   header="probe")
            return
        code = ("import torch; x = torch.ones(8, device='cuda'); torch.cuda.synchronize(); "
                "print('SANITIZER_PROBE_OK', float(x.sum()))")
        rc, timed_out = run_cmd([san, "--tool", "memcheck", py, "-c", code], tmp_log, env, cap(step))
        text = tmp_log.read_text(errors="replace") if tmp_log.exists() else ""
        if rc == 0 and "SANITIZER_PROBE_OK" in text:
            state["sanitizer_ok"] = True
            finish(step, 0, False, time.monotonic() - start, tmp_log, header=f"{san} --tool memcheck")
            return
        refused = SANITIZER_REFUSED.search(text)
        reason = (refused.group(0) if refused else (text.strip().splitlines() or ["no output"])[-1])[:200]
        state["skip_reason"] = f"compute-sanitizer cannot run here: {reason}"
        finish(step, rc, timed_out, time.monotonic() - start, tmp_log, status=f"skipped: sanitizer refused ({reason[:60]})",
               header=f"{san} --tool memcheck", reason=reason)

    def run_sanitizer(step):
        tmp_log, junit = out.tmp(f"{step.name}.log"), out.tmp(f"{step.name}.xml")
        if not state["sanitizer_ok"]:
            tmp_log.write_text(state.get("skip_reason", "sanitizer unavailable") + "\n")
            finish(step, 0, False, 0.0, tmp_log, status="skipped: " + state.get("skip_reason", "")[:60],
                   header="not run", reason=state.get("skip_reason"))
            return
        extra = os.environ.get("GPU_SANITIZE_ARGS", "").split()
        cmd = [state["sanitizer"], "--tool", step.tool, "--error-exitcode", "99", "--print-limit", "20", *extra,
               *pytest_cmd(py, step, junit, False)]
        step_env = dict(env, **step.env)
        if step.threads:
            step_env["OMP_NUM_THREADS"] = str(step.threads)
        records[step.name]["command"] = " ".join(cmd)
        log(f">>> {step.name} (cap {cap(step):.0f} s): {step.tool} over {' '.join(step.pytest_args)}")
        start = time.monotonic()
        rc, timed_out = run_cmd(cmd, tmp_log, step_env, cap(step))
        tests = parse_junit(junit)
        with contextlib.suppress(FileNotFoundError):
            junit.unlink()
        findings = sanitizer_findings(tmp_log)
        records[step.name]["estimate_s"] = round(step.estimate(tests.get("tests") if tests else None), 1)
        status = None
        if findings["refused"] and rc != 0:
            status = f"skipped: {step.tool} refused ({findings['refused']})"
        elif rc == 99 or (findings["errors"] or 0) > 0:
            status = f"FAILED: {findings['errors']} sanitizer errors"
        finish(step, rc, timed_out, time.monotonic() - start, tmp_log, status=status, header=records[step.name]["command"],
               tests=tests, sanitizer=findings)

    bench_table = ""
    try:
        i = 0
        while i < len(steps):
            step = steps[i]
            if state["abort"] or time.monotonic() > deadline - 5:
                records[step.name]["status"] = "not run: " + (state["abort"] or "deadline reached")
                out.write_summary(summary)
                i += 1
                continue
            records[step.name]["started_at_s"] = round(time.monotonic() - started, 1)
            if step.group:
                group = [s for s in steps[i:] if s.group == step.group]
                for s in group:
                    records[s.name]["started_at_s"] = records[step.name]["started_at_s"]
                run_pytest_group(group)
                i += len(group)
                continue
            if step.kind != "pytest":
                log(f">>> {step.name}: {step.what}")
            {"env": run_env, "build": run_build, "probe": run_probe, "sanitizer": run_sanitizer}.get(
                step.kind, lambda s: None)(step)
            if step.kind == "bench":
                bench_table = run_bench(step)
            if step.kind == "pytest":
                run_pytest_group([step])
            i += 1
    finally:
        for proc in list(RUNNING):
            proc.kill()
        total = time.monotonic() - started
        ok_states = ("ok", "skipped")
        failed = [r["name"] for r in summary["steps"] if not r["status"].startswith(ok_states)]
        summary.update(total_s=round(total, 1), status="ok" if not failed else "FAILED", failed_steps=failed,
                       finished=time.strftime("%Y-%m-%dT%H:%M:%S"), within_budget=total <= BUDGET_S[tier])
        summary["out"] = out.audit()
        out.write_summary(summary)
        summary["out"] = out.audit()
        out.write_summary(summary)
    print()
    print(f"=== {TIER_NAMES[tier]} summary ({total:.0f} s, budget {BUDGET_S[tier]} s; results in {out.path}/)")
    print(format_steps(summary["steps"]))
    for problem in summary["out"]["problems"]:
        print("RESULTS FOLDER:", problem)
    print(f"{TIER_NAMES[tier]}: {'all steps passed' if not failed else 'FAILED: ' + ', '.join(failed)}")
    if bench_table:
        print()
        print(bench_table)
    return 0 if not failed else (2 if records[steps[0].name]["status"].startswith("FAILED") else 1)


# ====================================================================== dry run


class _Collector:
    def __init__(self):
        self.items, self.errors = [], []

    def pytest_collectreport(self, report):
        if report.failed:
            self.errors.append(f"{report.nodeid}: {str(report.longrepr).strip().splitlines()[-1][:300]}")

    def pytest_collection_finish(self, session):
        self.items = [item.nodeid for item in session.items]


def collect(args) -> tuple:
    """``(selected node ids, collection errors, pytest rc)`` of ``pytest args --collect-only``, in
    this process (torch and the package are imported once for every step)."""
    import pytest

    collector = _Collector()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        rc = pytest.main([*args, "--collect-only", "-q", "-p", "no:cacheprovider"], plugins=[collector])
    errors = list(collector.errors)
    if int(rc) not in (0, 5) and not errors:
        errors.append(buf.getvalue().strip().splitlines()[-1] if buf.getvalue().strip() else f"pytest rc {int(rc)}")
    return collector.items, errors, int(rc)


def dry_run(tiers, out_dir: Path, py: str) -> int:
    start = time.monotonic()
    problems = []
    os.chdir(ROOT)
    # 1. the scripts parse
    bash = shutil.which("bash")
    if bash:
        res = subprocess.run([bash, "-n", str(ROOT / "tools" / "gpu_check.sh")], capture_output=True, text=True)
        if res.returncode:
            problems.append(f"tools/gpu_check.sh does not parse: {res.stderr.strip()}")
    for path in [ROOT / "tools" / "gpu_check.py", ROOT / "benchmarks" / "gpu_bench.py",
                 *sorted((ROOT / "tests" / "gpu").glob("*.py"))]:
        try:
            compile(path.read_text(), str(path), "exec")
        except SyntaxError as error:
            problems.append(f"{path.relative_to(ROOT)} does not compile: {error}")
    # the benchmark's dry run in a second process, concurrently with the collections below
    bench_json = out_dir / ".tmp-bench-dry-run.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    bench_proc = None
    if any(s.kind == "bench" for t in tiers for s in tier_steps(t)) and (ROOT / "benchmarks" / "gpu_bench.py").exists():
        bench_proc = subprocess.Popen([py, str(ROOT / "benchmarks" / "gpu_bench.py"), "--dry-run", "--quick", "--json",
                                       str(bench_json)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                                          [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))))
    # 2. this Python
    import torch

    here = f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA visible: {torch.cuda.is_available()}"
    tools = find_tools(dict(os.environ))
    # 3. every pytest step: paths exist, collected, > 0 selected
    estimates, plan = {}, []
    for tier in tiers:
        for step in tier_steps(tier):
            entry = {"tier": tier, "name": step.name, "kind": step.kind, "what": step.what, "cap_s": step.cap_s,
                     "group": step.group}
            if step.pytest_args:
                missing = [p for p in _paths_named(step.pytest_args) if not (ROOT / p.split("::")[0]).exists()]
                for a in step.pytest_args:
                    if a.startswith("--ignore=") and not (ROOT / a.split("=", 1)[1]).exists():
                        problems.append(f"{tier}:{step.name}: --ignore path {a.split('=', 1)[1]} does not exist")
                if missing:
                    problems.append(f"{tier}:{step.name}: missing path(s) {missing}")
                items, errors, rc = collect(step.pytest_args)
                files = collections.Counter(i.split("::")[0] for i in items)
                entry.update(command="pytest " + " ".join(step.pytest_args) + (f" -n {XDIST_WORKERS}" if step.xdist else ""),
                             selected=len(items), files=dict(files), collect_errors=errors)
                if errors:
                    problems.append(f"{tier}:{step.name}: collection errors: {errors[:3]}")
                if not items:
                    problems.append(f"{tier}:{step.name}: selects no test (pytest rc {rc})")
                est = step.estimate(len(items))
            elif step.kind == "bench":
                if not (ROOT / "benchmarks" / "gpu_bench.py").exists():
                    problems.append("benchmarks/gpu_bench.py is missing")
                    est = 0.0
                else:
                    if bench_proc is not None and bench_proc.returncode is None:
                        try:
                            bench_out, _ = bench_proc.communicate(timeout=240)
                        except subprocess.TimeoutExpired:
                            bench_proc.kill()
                            bench_out, _ = bench_proc.communicate()
                        bench_result = json.loads(bench_json.read_text()) if bench_json.exists() else {
                            "rows": [], "checked": [], "estimate_s": 0.0,
                            "problems": [f"gpu_bench.py --dry-run failed (rc {bench_proc.returncode}): "
                                         f"{(bench_out or '').strip().splitlines()[-3:]}"]}
                        with contextlib.suppress(FileNotFoundError):
                            bench_json.unlink()
                    result = bench_result
                    est = float(result["estimate_s"])
                    entry.update(command="benchmarks/gpu_bench.py --quick", selected=len(result["rows"]),
                                 cases_checked=len(result["checked"]), bench_problems=result["problems"],
                                 rows=[f"{r['op']} [{r['backend']}]" for r in result["rows"]])
                    problems += [f"{tier}:bench: {p}" for p in result["problems"]]
                    if not result["rows"]:
                        problems.append(f"{tier}:bench: plans no row")
            elif step.kind == "build":
                units = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.suffix in (".cu", ".cpp"))
                entry.update(command="pip install --no-build-isolation --no-deps -e .", translation_units=len(units))
                est = step.estimate(None)
            else:
                est = step.estimate(None)
            estimates[f"{tier}:{step.name}"] = est
            entry["estimate_s"] = round(est, 1)
            plan.append(entry)
    totals = {}
    for tier in tiers:
        totals[tier] = tier_total(tier, {s.name: estimates[f"{tier}:{s.name}"] for s in tier_steps(tier)})
        if totals[tier] > BUDGET_S[tier]:
            problems.append(f"tier {tier} estimate {totals[tier]:.0f} s exceeds its budget {BUDGET_S[tier]} s")
    # 4. the plan
    print(f"gpu-check DRY RUN on this machine ({here}); nothing runs on a GPU.")
    print(f"On the lent machine: {EXPECTED}; the extension is built there (one built here does not load there).")
    print(f"compute-sanitizer here: {tools['compute_sanitizer'] or 'not found'} (tier 2 skips, reported, where it "
          "is missing or refuses the device)")
    for tier in tiers:
        print()
        print(f"tier {tier}: {TIER_NAMES[tier]}  (budget {BUDGET_S[tier]} s, hard deadline {DEADLINE_S[tier]} s)")
        print(f"  {'step':<13} {'selected':>8} {'estimate':>9} {'cap':>5}  command")
        for e in plan:
            if e["tier"] != tier:
                continue
            sel = str(e.get("selected", "-"))
            par = "  [concurrent: " + e["group"] + "]" if e.get("group") else ""
            print(f"  {e['name']:<13} {sel:>8} {e['estimate_s']:>8.0f}s {e['cap_s']:>4.0f}s  "
                  f"{e.get('command', e['what'])}{par}")
        print(f"  {'total':<13} {'':>8} {totals[tier]:>8.0f}s        (a concurrent group counts as its longest step)")
    seconds = time.monotonic() - start
    result = {"dry_run": True, "tiers": list(tiers), "here": here, "expected_machine": EXPECTED,
              "budget_s": {t: BUDGET_S[t] for t in tiers}, "total_estimate_s": {t: round(totals[t], 1) for t in tiers},
              "steps": plan, "problems": problems, "seconds": round(seconds, 1), "ok": not problems}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "dry-run.json").write_text(json.dumps(result, indent=2))
    print()
    for p in problems:
        print("PROBLEM:", p)
    print(f"gpu-check dry run: {'ok' if not problems else 'FAILED'} in {seconds:.0f} s; plan in {out_dir}/dry-run.json")
    return 0 if not problems else 1


# ====================================================================== main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="GPU check tiers (see the module docstring)")
    parser.add_argument("--tier", choices=("1", "2", "all"), default="1")
    parser.add_argument("--dry-run", action="store_true", help="also: DRY_RUN=1")
    parser.add_argument("--out", help="results folder (default $GPU_CHECK_OUT or bench-results/gpu-check)")
    args = parser.parse_args(argv)
    tiers = (1, 2) if args.tier == "all" else (int(args.tier),)
    out_dir = Path(args.out or os.environ.get("GPU_CHECK_OUT") or "bench-results/gpu-check")
    if not out_dir.is_absolute():
        out_dir = ROOT / out_dir
    py = os.environ.get("GPU_CHECK_PYTHON") or sys.executable
    if args.dry_run or _truthy(os.environ.get("DRY_RUN")):
        return dry_run(tiers, out_dir, py)
    signal.signal(signal.SIGTERM, _on_signal)
    rc = 0
    for tier in tiers:
        log(f"{TIER_NAMES[tier]} (tier {tier}) with {py}; results in {out_dir}/")
        rc = max(rc, real_run(tier, py, Out(out_dir, tier)))
    return rc


if __name__ == "__main__":
    sys.exit(main())
