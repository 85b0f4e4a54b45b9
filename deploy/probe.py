#!/usr/bin/env python3
"""Kubernetes probes of a fewstep Triton pod, run inside the container (exec probes).

    probe.py ready  every model of the repository answers ready (Triton's model-ready endpoints)
    probe.py infer  `ready`, then one real 1-image, 1-step request through every ensemble,
                    which must come back in time with a finite sample

Exit 0 when healthy, 1 (with one line on stderr) when not. Only the standard library: the
probe starts in a fraction of a second and needs nothing beyond the image's Python.

Why a real request: Triton 2.51 (the 24.10 container) keeps answering "ready" for a Python
model whose stub process has died (docs/deploy.md), so only a request notices a dead
model. HTTP on 127.0.0.1 is enough: the probe runs in the pod, and the server binds HTTP to
loopback so no client can reach the HTTP front end.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path


class Unhealthy(Exception):
    pass


def _request(url: str, timeout: float, body: dict | None = None) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET",
                                 headers={"Content-Type": "application/json"} if data is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, OSError) as e:
        raise Unhealthy(f"{url}: {getattr(e, 'reason', e)}") from None


def repository_models(repo: Path) -> list[str]:
    """Model names of a repository: its folders that hold a config.pbtxt."""
    names = sorted(p.parent.name for p in repo.glob("*/config.pbtxt"))
    if not names:
        raise Unhealthy(f"no models in {repo}")
    return names


def check_ready(base: str, models: list[str], timeout: float) -> None:
    code, _ = _request(f"{base}/v2/health/ready", timeout)
    if code != 200:
        raise Unhealthy(f"server not ready (HTTP {code})")
    for m in models:
        code, _ = _request(f"{base}/v2/models/{m}/ready", timeout)
        if code != 200:
            raise Unhealthy(f"model {m} not ready (HTTP {code})")


def ensembles(base: str, models: list[str], timeout: float) -> list[dict]:
    """Configs of the models clients call (the ensembles)."""
    out = []
    for m in models:
        code, body = _request(f"{base}/v2/models/{m}/config", timeout)
        if code != 200:
            raise Unhealthy(f"model {m}: no config (HTTP {code})")
        cfg = json.loads(body)
        if cfg.get("platform") == "ensemble":
            out.append(cfg)
    if not out:
        raise Unhealthy("no ensemble model to call")
    return out


def check_infer(base: str, cfg: dict, timeout: float) -> None:
    """One image at one step; a class-conditional model gets class 0."""
    name = cfg["name"]
    params = {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
    inputs = [{"name": "seed", "shape": [1, 1], "datatype": "INT64", "data": [0]},
              {"name": "steps", "shape": [1, 1], "datatype": "INT32", "data": [1]}]
    if int(params.get("num_classes", "0") or 0) > 0:
        inputs.append({"name": "class_label", "shape": [1, 1], "datatype": "INT32", "data": [0]})
    code, body = _request(f"{base}/v2/models/{name}/infer", timeout,
                          {"inputs": inputs, "outputs": [{"name": "sample"}]})
    if code != 200:
        raise Unhealthy(f"model {name}: request failed (HTTP {code}): {body[:300].decode(errors='replace')}")
    outs = {o["name"]: o for o in json.loads(body).get("outputs", [])}
    data = outs.get("sample", {}).get("data") or []
    if not data or not all(math.isfinite(v) for v in data):
        raise Unhealthy(f"model {name}: no finite sample in the answer")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("ready", "infer"))
    p.add_argument("--url", default=os.environ.get("FEWSTEP_PROBE_URL", "http://127.0.0.1:8000"),
                   help="Triton's HTTP endpoint (default http://127.0.0.1:8000)")
    p.add_argument("--repo", default=os.environ.get("FEWSTEP_REPO", "/srv/repo"),
                   help="the model repository the server runs (default $FEWSTEP_REPO or /srv/repo)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per HTTP request")
    args = p.parse_args(argv)
    base = args.url.rstrip("/")
    try:
        models = repository_models(Path(args.repo))
        check_ready(base, models, args.timeout)
        if args.mode == "infer":
            for cfg in ensembles(base, models, args.timeout):
                check_infer(base, cfg, args.timeout)
    except Unhealthy as e:
        print(f"unhealthy: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
