"""The GPU check (``make gpu-check`` / ``make gpu-sanitize``, ``tools/gpu_check.py``) without a GPU:

* the dry run of both tiers (what CI and ``make test`` run): it parses the scripts, collects
  every pytest step (each must select tests), builds and calls every benchmark case on the CPU,
  and its plan fits the budgets (tier 1 <= 6 min from a bare machine, tier 2 <= 4 min);
* the real mode on this machine stops at its ``env`` step (no GPU) and still leaves a summary
  and a log within the limits of the results folder;
* the driver's pure helpers (junit and sanitizer parsing, totals, folder audit).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "gpu_check.sh"
TIER_STEPS = {
    1: ["env", "build", "gpu_tests", "kernel_tests", "bench"],
    2: ["env", "probe", "build", "memcheck", "racecheck", "initcheck", "synccheck"],
}


def _driver():
    spec = importlib.util.spec_from_file_location("_gpu_check_driver", ROOT / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _run(args, out, extra_env=None, timeout=300):
    env = dict(os.environ, GPU_CHECK_OUT=str(out), GPU_CHECK_PYTHON=sys.executable)
    env.pop("DRY_RUN", None)
    env.update(extra_env or {})
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    res = _run(["--tier", "all"], out, {"DRY_RUN": "1"})
    return res, out


def test_dry_run_passes_and_prints_the_plan(dry_run):
    res, out = dry_run
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    for text in ("tier 1: make gpu-check", "tier 2: make gpu-sanitize", "gpu-check dry run: ok"):
        assert text in res.stdout
    plan = json.loads((out / "dry-run.json").read_text())
    assert plan["ok"] and plan["problems"] == []
    assert sorted(p.name for p in out.iterdir()) == ["dry-run.json"]  # nothing else left behind


def test_dry_run_plan_selects_tests_in_every_step_and_fits_the_budgets(dry_run):
    _, out = dry_run
    plan = json.loads((out / "dry-run.json").read_text())
    for tier, names in TIER_STEPS.items():
        steps = [s for s in plan["steps"] if s["tier"] == tier]
        assert [s["name"] for s in steps] == names
        for s in steps:
            if s["kind"] in ("pytest", "sanitizer", "bench"):
                assert s["selected"] > 0, s
                assert not s.get("collect_errors"), s
            assert s["estimate_s"] >= 0 and s["cap_s"] > 0
            if s["name"] != "build" or tier == 1:
                assert s["estimate_s"] > 0, s
    totals = {int(k): v for k, v in plan["total_estimate_s"].items()}
    assert totals[1] <= 360, totals
    assert totals[2] <= 240, totals
    by_name = {(s["tier"], s["name"]): s for s in plan["steps"]}
    # the real-size GPU tests and the sanitizer subset are this suite's own files
    assert all(f.startswith("tests/gpu/") for f in by_name[(1, "gpu_tests")]["files"])
    assert by_name[(1, "gpu_tests")]["selected"] >= 40
    assert not any(f.startswith("tests/gpu/") for f in by_name[(1, "kernel_tests")]["files"])
    assert by_name[(2, "memcheck")]["files"] == {"tests/gpu/test_sanitizer_subset.py": by_name[(2, "memcheck")]["selected"]}
    # the bench plans the stoich conv (fp32 and bf16), the pert-mask ops and the training step
    rows = " ".join(by_name[(1, "bench")]["rows"])
    for text in ("stoich_conv fwd+bwd gated+attn fp32 [cuda]", "bf16 [triton]", "filter_edges physical [cuda]",
                 "train_step HeteroCell C=64 L=3 H=2 [cuda]", "train_step HeteroCell C=64 L=3 H=2 [triton]"):
        assert text in rows
    assert by_name[(1, "bench")]["cases_checked"] > 0


def test_real_mode_without_a_gpu_stops_at_env_and_leaves_a_summary(tmp_path):
    res = _run(["--tier", "1"], tmp_path, timeout=120)
    assert res.returncode == 2, res.stdout[-3000:] + res.stderr[-3000:]
    assert "sees no CUDA GPU" in res.stdout
    summary = json.loads((tmp_path / "tier1-summary.json").read_text())
    assert summary["status"] == "FAILED" and summary["failed_steps"][0] == "env"
    assert [s["name"] for s in summary["steps"]] == TIER_STEPS[1]
    assert all(s["status"].startswith("not run") for s in summary["steps"][1:])
    assert summary["out"]["problems"] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tier1-summary.json", "tier1.log"]
    assert "===== env" in (tmp_path / "tier1.log").read_text()


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_targets_call_the_driver():
    res = subprocess.run(["make", "-n", "gpu-check", "gpu-sanitize"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "tools/gpu_check.sh --tier 1" in res.stdout and "tools/gpu_check.sh --tier 2" in res.stdout


# ------------------------------------------------------------------ the driver's helpers


def test_step_estimates_and_tier_totals():
    g = _driver()
    steps = {s.name: s for s in g.tier_steps(1)}
    assert steps["kernel_tests"].estimate(400) < steps["kernel_tests"].estimate(400, xdist=False)
    estimates = {"env": 10, "build": 170, "gpu_tests": 90, "kernel_tests": 70, "bench": 50}
    assert g.tier_total(1, estimates) == 10 + 170 + 90 + 50  # the concurrent group counts once
    assert g._paths_named(["tests", "-m", "cuda", "--ignore=tests/gpu", "-k", "x or y"]) == ["tests"]


def test_parse_junit(tmp_path):
    g = _driver()
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<testsuites><testsuite>'
        '<testcase classname="tests.gpu.t" name="a" time="1.5"><properties>'
        '<property name="host_syncs" value="7"/></properties></testcase>'
        '<testcase classname="tests.gpu.t" name="b" time="0.1"><failure message="AssertionError: bad">x</failure></testcase>'
        '<testcase classname="tests.gpu.t" name="c" time="0"><skipped message="no bf16"/></testcase>'
        '</testsuite></testsuites>')
    r = g.parse_junit(xml)
    assert (r["tests"], r["passed"], r["failed"], r["skipped"]) == (3, 1, 1, 1)
    assert r["properties"]["tests.gpu.t::a"] == {"host_syncs": "7"}
    assert r["failures"] == ["tests.gpu.t::b: AssertionError: bad"]
    assert r["skip_reasons"] == {"no bf16": 1}
    assert r["slowest"][0] == ["tests.gpu.t::a", 1.5]
    assert g.parse_junit(tmp_path / "missing.xml") is None


def test_sanitizer_findings(tmp_path):
    g = _driver()
    log = tmp_path / "s.log"
    log.write_text("========= COMPUTE-SANITIZER\n========= Invalid __global__ read of size 4 bytes\n"
                   "========= ERROR SUMMARY: 3 errors\n")
    f = g.sanitizer_findings(log)
    assert f["errors"] == 3 and f["refused"] is None and "Invalid __global__ read" in f["reports"][0]
    log.write_text("========= Error: Device not supported\n")
    f = g.sanitizer_findings(log)
    assert f["errors"] is None and f["refused"] == "Device not supported"


def test_results_folder_audit(tmp_path):
    g = _driver()
    out = g.Out(tmp_path / "o", 1)
    for i in range(9):
        (out.path / f"f{i}").write_text("x")
    (out.path / "sub").mkdir()
    (out.path / "sub" / "g").write_text("x")
    problems = out.audit()["problems"]
    assert any("10 files" in p for p in problems) and any("sub-folder" in p for p in problems)


def test_step_log_is_capped(tmp_path, monkeypatch):
    g = _driver()
    monkeypatch.setattr(g, "STEP_LOG_HEAD", 100)
    monkeypatch.setattr(g, "STEP_LOG_TAIL", 200)
    out = g.Out(tmp_path, 1)
    tmp = out.tmp("x.log")
    tmp.write_bytes(b"a" * 1000 + b"END")
    out.append_step_log("x", "header", tmp, "footer")
    text = out.log_path.read_text()
    assert "bytes left out" in text and text.count("a") < 400 and "END" in text and not tmp.exists()
