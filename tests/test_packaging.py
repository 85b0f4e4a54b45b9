"""The installed layout: one top-level name, `fewstep`, in site-packages (the repository keeps
training/, export/, serving/ and demo/ at its top level; an install maps them under fewstep)."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_installs_one_top_level_package(tmp_path):
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools")
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    wheel = next(tmp_path.glob("fewstep-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"fewstep"}, top
    for module in ("fewstep/sampling.py", "fewstep/training/loop.py", "fewstep/training/methods/ctm.py",
                   "fewstep/export/manifest.schema.json", "fewstep/serving/models/sampler.py",
                   "fewstep/demo/app.py", "fewstep/training/assets/feature-net-fmnist.safetensors",
                   "fewstep/figures.py", "fewstep/training/evaluator.py"):
        assert module in names, module
