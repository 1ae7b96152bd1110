"""The device machine's scripts, run here: ``benchmarks/device/run.sh`` end to end on the CPU (``--device cpu
--quick`` through ``MOE_GPU_ARGS``), with a fake ``$OUT`` and only the packages of the device image importable
(``benchmarks/device/image_sim``), the CUDA test files collected under that image, and the wheel list of
``benchmarks/device/wheels.sh`` against the versions ``pyproject.toml`` pins (the script itself downloads from PyPI
and is not run in tests)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEVICE = ROOT / "benchmarks" / "device"
RUN_SH = DEVICE / "run.sh"


def _image_site(folder: Path) -> Path:
    """A site folder that holds the device-image simulation (as run.sh's install target it stays first on the path)."""
    folder.mkdir()
    shutil.copy(DEVICE / "image_sim" / "sitecustomize.py", folder)
    shutil.copy(DEVICE / "image_packages.txt", folder)
    return folder


def _wheel(folder: Path) -> Path:
    """A real, minimal pure-Python wheel (``probe_pkg 1.0``), so the install step runs as on the device."""
    folder.mkdir()
    path = folder / "probe_pkg-1.0-py3-none-any.whl"
    files = {
        "probe_pkg/__init__.py": "VALUE = 42\n",
        "probe_pkg-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: probe-pkg\nVersion: 1.0\n",
        "probe_pkg-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + "probe_pkg-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in {**files, "probe_pkg-1.0.dist-info/RECORD": record}.items():
            archive.writestr(name, text)
    return folder


def _run(tmp_path: Path, args: str, **env: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out"
    environment = {
        **os.environ,
        "OUT": str(out),
        "MOE_GPU_ARGS": args,
        "MOE_GPU_PYTHON": sys.executable,
        "MOE_GPU_SITE": str(tmp_path / "site"),
        "MOE_GPU_WHEELS": str(tmp_path / "none"),
        "OMP_NUM_THREADS": "1",
        **env,
    }
    result = subprocess.run(["bash", str(RUN_SH)], env=environment, capture_output=True, text=True, timeout=300)
    return result, out


@pytest.mark.slow
def test_run_sh_installs_the_wheels_runs_every_section_and_keeps_log_and_numbers(tmp_path):
    wheels, site = _wheel(tmp_path / "wheels"), _image_site(tmp_path / "site")
    result, out = _run(tmp_path, "--device cpu --quick", MOE_GPU_WHEELS=str(wheels))
    assert result.returncode == 0, result.stdout[-3000:]
    log = (out / "gpu.log").read_text()
    assert log == result.stdout  # everything printed is in the log, stderr included
    assert (site / "probe_pkg" / "__init__.py").read_text() == "VALUE = 42\n"  # installed where PYTHONPATH points
    assert f"PYTHONPATH={ROOT}:{site}" in log
    for line in ("[tests] SKIP", "[hf] PASS", "[tokens] PASS", "[overhead] PASS", "all checks passed",
                 "run.sh: gpu.py exit code 0"):  # fmt: skip
        assert line in log, line
    report = json.loads((out / "gpu.json").read_text())
    assert report["ok"] is True and report["quick"] is True
    assert {name: entry["status"] for name, entry in report["sections"].items()} == {
        "tests": "SKIP", "hf": "PASS", "tokens": "PASS", "overhead": "PASS",
    }  # fmt: skip
    rows = report["sections"]["tokens"]["results"]
    assert [(r["preset"], r["dispatch"]) for r in rows] == [("tiny", "loop"), ("tiny", "grouped")]
    assert rows[0]["first_loss"] == pytest.approx(rows[1]["first_loss"], rel=1e-2)
    variants = report["sections"]["overhead"]["results"]
    assert {"none", "every50", "every1", "naive"} <= set(variants) and variants["none"]["ratio"] == 1.0
    try:
        import moewatch  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        assert {"moewatch", "moewatch1"} <= set(variants)  # MoEWatch through benchmarks/peers.py's adapter
    assert report["sections"]["hf"]["results"]["counts"]


@pytest.mark.slow
def test_run_sh_exits_non_zero_when_a_section_is_over_budget(tmp_path):
    result, out = _run(tmp_path, "--device cpu --quick --sections hf --budget 1")
    assert result.returncode == 1
    assert "no wheels in" in result.stdout and "[hf] OVER" in result.stdout
    report = json.loads((out / "gpu.json").read_text())
    assert report["ok"] is False and report["sections"]["hf"]["status"] == "OVER"


def test_run_sh_stops_gpu_py_at_its_time_limit(tmp_path):
    result, out = _run(tmp_path, "--device cpu --quick", MOE_GPU_TIMEOUT="1")
    assert result.returncode == 124
    assert "ran past 1 s and was stopped" in (out / "gpu.log").read_text()


def test_run_sh_needs_out(tmp_path):
    environment = {k: v for k, v in os.environ.items() if k != "OUT"}
    result = subprocess.run(["bash", str(RUN_SH)], env=environment, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "OUT must name the folder" in result.stderr


@pytest.mark.slow
def test_cuda_test_files_import_with_only_the_device_images_packages(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from gpu import cuda_test_files
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    environment = {**os.environ, "PYTHONPATH": f"{DEVICE / 'image_sim'}:{ROOT}", "OMP_NUM_THREADS": "1"}
    files = cuda_test_files()
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files]
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert re.search(r"^\d+ tests? collected", result.stdout, flags=re.MULTILINE), result.stdout[-2000:]
    assert "megatron" in result.stdout  # the carried wheel's tests are collected, not skipped at import
    if importlib.util.find_spec("wandb") is not None:  # here, but not in the image: the simulation hides it
        probe = "import importlib.util\nprint(importlib.util.find_spec('wandb'))\nimport wandb\n"
        blocked = subprocess.run([sys.executable, "-c", probe], env=environment, capture_output=True, timeout=60)
        assert blocked.stdout.strip() == b"None" and b"not in the device image" in blocked.stderr


def test_wheels_sh_carries_the_versions_pyproject_pins():
    text = (ROOT / "benchmarks" / "device" / "wheels.sh").read_text()
    listed = re.findall(r'^\s+"([a-z0-9-]+==[0-9.]+)"$', text, flags=re.MULTILINE)
    assert sorted(name.split("==")[0] for name in listed) == ["megatron-core", "moewatch"]
    pyproject = (ROOT / "pyproject.toml").read_text()
    for spec in listed:
        assert f'"{spec}"' in pyproject, spec  # the peers / bench extras pin the same version
    assert "--no-deps" in text and "--python-version 3.12" in text and 'MAX_MIB="${MAX_MIB:-50}"' in text
