"""What `fewstep generate` and `fewstep serve` tell their user: a summary of what was done,
refusals that say why, defaults in --help, and a port clash that names the flag to change.
The generate tests run against the real tritonserver of the `triton_stack` fixture."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FEWSTEP = [sys.executable, "-m", "fewstep.cli"]


def _run(*args, timeout=180):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(FEWSTEP + list(args), capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def test_generate_help_shows_defaults():
    r = _run("generate", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())  # argparse wraps lines
    for said in ("(default 127.0.0.1:8001)", "(default: the model's default", "image i uses seed + i (default 0)",
                 "number of images (default 1)", "deadline of each request in seconds, retries included",
                 "refused where it would change nothing"):
        assert said in text, said


def test_serve_help_names_ports_and_defaults():
    r = _run("serve", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert re.search(r"--grpc-port GRPC_PORT port of Triton's gRPC endpoint.*\(default 8001; 0 = any free port\)", text)
    assert re.search(r"--http-port HTTP_PORT port of Triton's HTTP endpoint \(default 8000", text)
    assert re.search(r"--metrics-port METRICS_PORT port of Triton's Prometheus metrics \(default 8002", text)


def test_serve_port_clash_names_the_flag(served_model_dirs):
    pytest.importorskip("tritonclient.grpc", reason="serving needs the serve extra")
    from fewstep.errors import UserError
    from fewstep.serving.launcher import find_triton

    try:
        find_triton()
    except UserError as e:
        pytest.skip(f"no tritonserver: {e}")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = _run("serve", "--model", str(served_model_dirs["tiny"]), "--grpc-port", str(port),
                 "--http-port", "0", "--metrics-port", "0")
    assert r.returncode == 2
    assert f"cannot bind 127.0.0.1:{port} for Triton's grpc endpoint" in r.stderr
    assert "choose another port with --grpc-port" in r.stderr


def test_generate_says_what_happened(triton_stack, tmp_path):
    out = tmp_path / "grid.png"
    r = _run("generate", "--url", triton_stack.url, "--model", "tiny", "--steps", "2", "--seed", "5", "--num", "3",
             "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert out.is_file()
    line = r.stdout.strip().splitlines()[-1]
    assert re.fullmatch(rf"tiny \(rf\): 3 images, seeds 5-7, 2 steps \(made for 8\), \d+ ms in 1 request "
                        rf"to {re.escape(triton_stack.url)} -> {re.escape(str(out))}", line), line
    r = _run("generate", "--url", triton_stack.url, "--model", "tiny", "--out", str(tmp_path / "one.png"))
    assert r.returncode == 0, r.stderr
    assert "1 image, seed 0, 8 steps, " in r.stdout  # the default: the count it was made for (no note)


def test_generate_refuses_a_gamma_that_changes_nothing(triton_stack, tmp_path):
    out = str(tmp_path / "x.png")
    # toyc is a consistency model: its sampler always re-noises (gamma 1)
    r = _run("generate", "--url", triton_stack.url, "--model", "toyc", "--class-label", "1", "--steps", "2",
             "--gamma", "0", "--out", out)
    assert r.returncode == 2 and "--gamma: toyc is a consistency model" in r.stderr
    assert "leave --gamma out" in r.stderr and not Path(out).exists()
    r = _run("generate", "--url", triton_stack.url, "--model", "tiny", "--steps", "1", "--gamma", "0.5", "--out", out)
    assert r.returncode == 2 and "gamma has no effect at 1 step" in r.stderr
    # where gamma does change the samples it is used, and said
    r = _run("generate", "--url", triton_stack.url, "--model", "tiny", "--steps", "2", "--gamma", "0.5", "--out", out)
    assert r.returncode == 0, r.stderr
    assert ", gamma 0.5, " in r.stdout
