"""Hardening of the serving stack (issue 14), each on the real tritonserver:

- a model dir can name only plain files inside its own folder (manifest `files`);
- HTTP is off unless asked for; with it on, a guard answers 413 to a 100 MB body and the
  server stays up;
- the admin protocols (shared memory, model repository, logging, trace) refuse a client
  without the launcher's key; statistics stay open (`fewstep bench`);
- no integer wraps: steps past 32 bits is INVALID_ARGUMENT over gRPC and HTTP JSON;
- SIGKILL of `fewstep serve` takes tritonserver, its stubs, its ports and temporary files
  with it;
- a server restarts on the same ports at once;
- gRPC over TLS (a self-signed certificate from the openssl CLI), through `fewstep serve`
  and `fewstep generate`.
"""
from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc", reason="serving tests need tritonclient[grpc] (the serve extra)")

import tritonclient.grpc as grpcclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from fewstep.export.manifest import ManifestError, read_manifest, sha256_file  # noqa: E402
from fewstep.errors import UserError  # noqa: E402
from fewstep.serving.client import Client, ServingError  # noqa: E402
from fewstep.serving.launcher import Server, exposure_warning, free_port  # noqa: E402
from fewstep.serving.repository import Options, write_repository  # noqa: E402
from conftest import raw_infer, start_serve, stop_serve  # noqa: E402

FEWSTEP = [sys.executable, "-m", "fewstep.cli"]


# --- item 1: a model dir names plain files inside itself only ---------------------------------------

def _copy_model(served_model_dirs, tmp_path) -> Path:
    dst = tmp_path / "src" / "a" / "b" / "model"  # ../../../ stays inside tmp_path
    shutil.copytree(served_model_dirs["tiny"], dst)
    return dst


def _add_file(model: Path, key: str, content: bytes, where: Path) -> None:
    where.parent.mkdir(parents=True, exist_ok=True)
    where.write_bytes(content)
    m = json.loads((model / "manifest.json").read_text())
    m["files"][key] = sha256_file(where)
    (model / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("key", ["../../../injected/1/model.py", "sub/x.py", "/tmp/abs.py", "..", ".hidden"])
def test_manifest_files_outside_the_model_dir_are_refused(served_model_dirs, tmp_path, key):
    model = _copy_model(served_model_dirs, tmp_path)
    target = (model / key) if not key.startswith("/") else tmp_path / "abs.py"
    if key not in ("..",):
        _add_file(model, key, b"import os  # code a model dir must never get into a repository\n",
                  target.resolve() if key != ".hidden" else model / ".hidden")
    else:
        m = json.loads((model / "manifest.json").read_text())
        m["files"][key] = "sha256:" + "0" * 64
        (model / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError) as e:
        read_manifest(model)
    assert "\n" not in str(e.value) and "files" in str(e.value)
    repo = tmp_path / "repo"
    with pytest.raises(UserError):
        write_repository(repo, [str(model)], Options(device="cpu"))
    assert not (repo / "injected").exists()
    assert not any(repo.rglob("*.py")) if repo.exists() else True


def test_symlinks_are_refused_and_only_named_files_are_copied(served_model_dirs, tmp_path):
    model = _copy_model(served_model_dirs, tmp_path)
    (model / "stray.txt").write_text("not in the manifest")
    written = write_repository(tmp_path / "repo", [str(model)], Options(device="cpu"))
    copied = sorted(p.name for p in (tmp_path / "repo" / "tiny_jump" / "1" / "model").iterdir())
    assert copied == sorted(set(json.loads((model / "manifest.json").read_text())["files"]) | {"manifest.json"})
    assert written[0]["name"] == "tiny"
    # jump.onnx as a link to a file of the same content elsewhere: refused, one line
    outside = tmp_path / "elsewhere.onnx"
    shutil.copy(model / "jump.onnx", outside)
    (model / "jump.onnx").unlink()
    (model / "jump.onnx").symlink_to(outside)
    with pytest.raises(ManifestError, match="jump.onnx is a symbolic link") as e:
        write_repository(tmp_path / "repo2", [str(model)], Options(device="cpu"))
    assert "\n" not in str(e.value)
    # the manifest itself as a link: refused too
    (model / "jump.onnx").unlink()
    shutil.copy(outside, model / "jump.onnx")
    shutil.move(model / "manifest.json", tmp_path / "manifest.json")
    (model / "manifest.json").symlink_to(tmp_path / "manifest.json")
    with pytest.raises(ManifestError, match="manifest.json is a symbolic link"):
        read_manifest(model)


def test_serve_refuses_an_injecting_model_dir_with_one_line(served_model_dirs, tmp_path):
    model = _copy_model(served_model_dirs, tmp_path)
    _add_file(model, "../../../injected/1/model.py", b"x = 1\n", (model / "../../../injected/1/model.py").resolve())
    r = subprocess.run(FEWSTEP + ["serve", "--model", str(model), "--dry-run", "--repo", str(tmp_path / "repo")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "only plain file names" in err[0], r.stderr


# --- items 4 and 5 on the session server (gRPC only) -------------------------------------------

def _raw_infer(url, model, inputs, headers=None):
    return raw_infer(url, model, inputs, headers=headers)


def _listening_ports(pid: int) -> set[int]:
    """TCP ports a process listens on (Linux /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # 0A: LISTEN
                ports.add(int(f[1].rsplit(":", 1)[1], 16))
    return ports


def test_http_is_off_by_default(triton_stack):
    server = triton_stack.server
    assert server.http_url is None
    assert _listening_ports(server.proc.pid) == {server.grpc_port, server.metrics_port}


def test_admin_protocols_refuse_a_client_without_the_key(triton_stack):
    server = triton_stack.server
    c = grpcclient.InferenceServerClient(triton_stack.url)
    try:
        refused = {
            "shared-memory": lambda h: c.register_system_shared_memory("x", "/fewstep_test_region", 64, headers=h),
            "shared-memory status": lambda h: c.get_system_shared_memory_status(headers=h),
            "model-repository": lambda h: c.get_model_repository_index(headers=h),
            "model load": lambda h: c.load_model("tiny", headers=h),
            "logging": lambda h: c.update_log_settings({"log_verbose_level": 1}, headers=h),
            "trace": lambda h: c.get_trace_settings(headers=h),
        }
        for what, call in refused.items():
            for headers in (None, {"triton-grpc-protocol-fewstep-admin-key": "guess"}):
                with pytest.raises(InferenceServerException) as e:
                    call(headers)
                msg = e.value.message().lower()
                assert "restricted" in msg or "header" in msg, (what, e.value)
        # our tools hold the key: the same calls go through
        assert c.get_log_settings(headers=server.admin_headers, as_json=True)["settings"]
        assert {m["name"] for m in server.repository_index()} >= {"tiny", "tiny_sampler", "toyc"}
        # statistics stay open: fewstep bench reads them without a key
        stats = c.get_inference_statistics("tiny", as_json=True)
        assert stats["model_stats"][0]["name"] == "tiny"
    finally:
        c.close()
    assert server.proc.poll() is None


@pytest.mark.parametrize("field,value", [("steps", 2 ** 32 + 1), ("steps", 2 ** 31), ("steps", -(2 ** 32) + 2),
                                         ("class_label", 2 ** 32 + 1)])
def test_integers_past_32_bits_are_invalid_argument_over_grpc(triton_stack, field, value):
    model = "toyc" if field == "class_label" else "tiny"
    inputs = [("seed", np.array([[1]], np.int64), "INT64"), ("steps", np.array([[2]], np.int64), "INT64")]
    inputs = [i for i in inputs if i[0] != field] + [(field, np.array([[value]], np.int64), "INT64")]
    if model == "toyc" and field != "class_label":
        inputs.append(("class_label", np.array([[0]], np.int64), "INT64"))
    with pytest.raises(InferenceServerException) as e:
        _raw_infer(triton_stack.url, model, inputs)
    assert "INVALID_ARGUMENT" in str(e.value.status()) and f"got {value}" in e.value.message(), e.value


def test_client_refuses_values_it_cannot_send_exactly(triton_stack):
    with Client(triton_stack.url) as c:
        with pytest.raises(OverflowError):
            c.generate("tiny", [1], 2 ** 64)


def test_exposure_warning_beyond_loopback_without_tls():
    assert exposure_warning("127.0.0.1", 8001, None) is None
    assert exposure_warning("localhost", 8001, None) is None
    assert "without TLS" in exposure_warning("0.0.0.0", 8001, None)
    assert exposure_warning("0.0.0.0", 8001, object()) is None


# --- items 3, 5 (HTTP) and 8: a server with HTTP on, restarted on the same ports ------------------

def _post(port: int, path: str, body: bytes, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        c.request("POST", path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read()
    except (ConnectionError, http.client.HTTPException) as e:
        return 0, repr(e).encode()
    finally:
        c.close()


def _infer_json(steps) -> bytes:
    return json.dumps({"inputs": [{"name": "seed", "shape": [1, 1], "datatype": "INT64", "data": [3]},
                                  {"name": "steps", "shape": [1, 1], "datatype": "INT64", "data": [steps]}],
                       "outputs": [{"name": "sample"}]}).encode()


def test_http_guard_integer_range_and_restart_on_the_same_ports(served_model_dirs, tmp_path):
    from fewstep.serving.launcher import find_triton

    try:
        find_triton()
    except UserError as e:
        pytest.skip(f"no tritonserver: {e}")
    repo = tmp_path / "repo"
    written = write_repository(repo, [str(served_model_dirs["tiny"])], Options(device="cpu", threads=1))
    names = written[0]["models"]
    ports = dict(grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
    server = Server(repo, models=names, http=True, log_file=tmp_path / "log1.txt", **ports)
    with server:
        hp = server.http_port
        status, body = _post(hp, "/v2/models/tiny/infer", _infer_json(2))
        assert status == 200, body
        good = json.loads(body)["outputs"][0]["data"]
        # item 5 over HTTP JSON: a value past 32 bits is refused, not wrapped to 1 step
        status, body = _post(hp, "/v2/models/tiny/infer", _infer_json(4294967297))
        assert status == 400 and b"steps: must be an integer in [1, 64], got 4294967297" in body, body
        status, body = _post(hp, "/v2/models/tiny/infer", _infer_json(2 ** 64 + 1))  # past int64: Triton's parser
        assert status in (400, 500) and b"parse" in body.lower(), body
        # item 3: 100 MB of valid JSON padded with spaces; the guard answers 413, Triton never sees it
        big = _infer_json(2)[:-1] + b" " * (100 << 20) + b"}"
        status, body = _post(hp, "/v2/models/tiny/infer", big)
        assert status == 413 and b"over the limit" in body, (status, body[:200])
        assert server.proc.poll() is None
        status, body = _post(hp, "/v2/models/tiny/infer", _infer_json(2))
        assert status == 200 and json.loads(body)["outputs"][0]["data"] == good
        # item 4 over HTTP: logging needs the key
        status, _ = _post(hp, "/v2/logging", b'{"log_verbose_level": 1}')
        assert status in (401, 403), status
        status, _ = _post(hp, "/v2/logging", b"{}", headers=server.admin_http_headers)
        assert status == 200
        with Client(server.grpc_url) as c:
            assert c.generate("tiny", [3], 2).shape == (1, 28, 28, 1)
    assert server.proc is None
    # item 8: the same ports again, at once (connections above left TIME_WAIT sockets behind)
    t0 = time.monotonic()
    again = Server(repo, models=names, http=True, log_file=tmp_path / "log2.txt", **ports)
    with again:
        assert again.grpc_port == ports["grpc_port"] and again.http_port == ports["http_port"]
        status, body = _post(again.http_port, "/v2/models/tiny/infer", _infer_json(2))
        assert status == 200 and json.loads(body)["outputs"][0]["data"] == good
    assert time.monotonic() - t0 < 120


# --- items 7 and 9 through the CLI: TLS, then SIGKILL of the launcher -----------------------------

def _self_signed(tmp_path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI makes the test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def _group_alive(pgid: int) -> list[int]:
    from fewstep.serving.launcher import process_group_members

    return process_group_members(pgid)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def test_tls_serve_and_generate_then_sigkill_of_serve_leaves_nothing(served_model_dirs, tmp_path):
    from fewstep.serving.launcher import admin_key_file

    cert, key = _self_signed(tmp_path)
    port, metrics = free_port(), free_port()
    proc, text = start_serve(["--model", str(served_model_dirs["toyc"]), "--grpc-port", str(port),
                              "--metrics-port", str(metrics), "--threads", "1",
                              "--grpc-tls-cert", str(cert), "--grpc-tls-key", str(key)])
    try:
        assert f"gRPC     127.0.0.1:{port} (TLS)" in text and "HTTP     off" in text, text
        # TLS: a client that checks the certificate gets images; a plaintext client gets nothing
        with Client(f"localhost:{port}", ssl=True, root_certificates=cert) as c:
            assert c.generate("toyc", [1], 2, class_labels=[1]).shape == (1, 2)
            assert c.models() == ["toyc"]  # the admin key file of this user's server
        with Client(f"127.0.0.1:{port}", timeout=5) as c:
            assert not c.ready()
        out = tmp_path / "toyc.png"
        r = subprocess.run(FEWSTEP + ["generate", "--url", f"localhost:{port}", "--model", "toyc", "--class-label", "1",
                                      "--num", "2", "--out", str(out), "--tls-ca", str(cert)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and out.is_file(), r.stderr
        # item 7: SIGKILL of the launcher; its watchdog takes the server and its files with it
        triton = [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == proc.pid
                  and Path(f"/proc/{p}/comm").read_text().strip() == "tritonserver"]
        assert len(triton) == 1
        members = _group_alive(triton[0])
        assert len(members) >= 4  # tritonserver and the stubs of toyc_jump, _sampler, _stream
        repo = [a for a in Path(f"/proc/{triton[0]}/cmdline").read_bytes().decode().split("\0")
                if a.startswith("--model-repository=")][0].split("=", 1)[1]
        assert Path(repo).is_dir() and admin_key_file(port).is_file()
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 15
        while ((_group_alive(triton[0]) or not _port_free(port) or Path(repo).exists()
                or admin_key_file(port).exists()) and time.monotonic() < deadline):
            time.sleep(0.2)
        assert _group_alive(triton[0]) == [], "tritonserver or a stub outlived its launcher"
        assert _port_free(port) and _port_free(metrics)
        assert not Path(repo).exists(), "the temporary repository outlived the launcher"
        assert not admin_key_file(port).exists()
        assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"fewstep_{proc.pid}_")]
    finally:
        stop_serve(proc)


def _parent(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(stat[stat.rindex(")") + 2:].split()[1])


def test_tls_options_are_checked(tmp_path):
    from fewstep.serving.cli import hardening_options
    from types import SimpleNamespace

    base = dict(http=False, http_max_body=1 << 20, grpc_tls_cert=None, grpc_tls_key=None)
    with pytest.raises(UserError, match="go together"):
        hardening_options(SimpleNamespace(**{**base, "grpc_tls_cert": "c.pem"}))
    with pytest.raises(UserError, match="no such file"):
        hardening_options(SimpleNamespace(**{**base, "grpc_tls_cert": str(tmp_path / "c"), "grpc_tls_key": "k"}))
    with pytest.raises(ServingError, match="no such file"):
        Client("localhost:1", root_certificates=tmp_path / "none.pem")


def test_port_check_allows_time_wait_but_not_a_listener():
    from fewstep.serving.launcher import check_port_free

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Triton's listeners do
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(UserError, match=f"cannot bind 127.0.0.1:{port}"):
            check_port_free("127.0.0.1", port)
        # a connection closed by the listening side leaves TIME_WAIT on this port
        c = socket.create_connection(("127.0.0.1", port))
        conn, _ = s.accept()
        conn.close()
        c.recv(1)
        c.close()
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))  # the old check (no SO_REUSEADDR) refused it for ~60 s
    check_port_free("127.0.0.1", port)  # free at once, as a restarted server needs it
