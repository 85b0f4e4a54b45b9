#!/usr/bin/env python
"""Run the models-s3 init container's command, as kustomize renders it, against a local
S3-compatible endpoint, and check that it copies the exports intact (docs/deploy.md).

    python scripts/check_models_s3.py EXPORT_DIR [EXPORT_DIR ...]

Needs `kubectl` (its kustomize), and `aws` and `moto_server` on PATH (PyPI: awscli, and
moto[server], an S3 emulator); the image runs AWS CLI v2, PyPI has v1 (the same `s3 sync`
and the same environment settings). Starts moto on a free loopback port, uploads the exports
under the ConfigMap's `uri`, runs the rendered command with the ConfigMap's values (its
`endpoint` replaced by moto's) and the environment of the manifest, and compares the trees.
"""
from __future__ import annotations

import filecmp
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
OVERLAY = ROOT / "deploy" / "k8s" / "overlays" / "gpu-s3"


def rendered_init(endpoint: str) -> tuple[list[str], dict]:
    """The init container's command and environment, the ConfigMap's values filled in."""
    out = subprocess.run(["kubectl", "kustomize", str(OVERLAY)], capture_output=True, text=True, check=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    data = dict(next(d for d in docs if d["kind"] == "ConfigMap")["data"], endpoint=endpoint)
    (init,) = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["initContainers"]
    env = {e["name"]: data[e["valueFrom"]["configMapKeyRef"]["key"]] if "valueFrom" in e else e["value"]
           for e in init["env"]}
    command = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in init["command"]]  # the kubelet's $(VAR)
    return command, env


def main() -> int:
    exports = [Path(p) for p in sys.argv[1:]]
    if not exports or not all((p / "manifest.json").is_file() for p in exports):
        sys.exit(__doc__)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    work = Path(tempfile.mkdtemp(prefix="check-models-s3-"))
    moto = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        command, env = rendered_init(endpoint)
        uri = command[command.index("sync") + 1]
        bucket = uri.split("/")[2]
        creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}  # the Secret's keys
        env = {"PATH": os.environ["PATH"], **creds, **env, "HOME": str(work / "home")}  # HOME: the pod's /tmp
        (work / "home").mkdir()
        admin = {**env, "AWS_ENDPOINT_URL": endpoint}
        for _ in range(50):  # moto's start
            if subprocess.run(["aws", "s3", "mb", f"s3://{bucket}"], env=admin, capture_output=True).returncode == 0:
                break
            time.sleep(0.2)
        else:
            raise SystemExit(f"moto_server did not answer on {endpoint}")
        for p in exports:
            subprocess.run(["aws", "s3", "sync", str(p), f"{uri.rstrip('/')}/{p.name}/", "--only-show-errors"],
                           env=admin, check=True)
        models = work / "models"  # the emptyDir
        models.mkdir()
        command = [str(models) if a == "/models" else a for a in command]
        print("$", " ".join(command))
        print("  with", " ".join(f"{k}={v}" for k, v in sorted(env.items()) if k.startswith("AWS_") and k not in creds))
        subprocess.run(command, env=env, check=True)
        for p in exports:
            cmp = filecmp.dircmp(p, models / p.name)
            if cmp.left_only or cmp.right_only or cmp.diff_files or cmp.funny_files:
                raise SystemExit(f"{p.name}: the copy differs ({cmp.left_only, cmp.right_only, cmp.diff_files})")
            print(f"{p.name}: {len(cmp.same_files)} files copied intact")
    finally:
        moto.terminate()
        moto.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    print("models-s3 ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
