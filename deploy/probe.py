#!/usr/bin/env python3
"""Kubernetes probes of a fewstep Triton pod, run inside the container (exec probes).

    probe.py ready  the server and every model of the repository report ready
    probe.py infer  `ready`, then one real 1-image, 1-step request through every ensemble,
                    which must come back in time with a finite sample (the startup probe)
    probe.py live   the server is live, every model ready, and every instance of every
                    Python model still has its stub process (the liveness probe)

Exit 0 when healthy, 1 (with one line on stderr) when not. Over gRPC on loopback, the
server's only client protocol (HTTP is off, as in `fewstep serve`).

Why `live` counts stub processes: Triton 2.51 (the 24.10 container) keeps answering "ready"
for a Python model whose stub process has died, and does not restart the stub; every request
to that model fails from then on (docs/deploy.md). A request would notice, but it queues
behind the pod's load, so a busy pod would be restarted for being busy. Counting processes
under /proc and asking Triton's live, ready and config endpoints (answered outside the
inference queues) costs the same whatever the load.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from collections import Counter
from pathlib import Path

from fewstep.serving.health import find_stubs, listening_pid


class Unhealthy(Exception):
    pass


def repository_models(repo: Path) -> list[str]:
    """Model names of a repository: its folders that hold a config.pbtxt."""
    names = sorted(p.parent.name for p in repo.glob("*/config.pbtxt"))
    if not names:
        raise Unhealthy(f"no models in {repo}")
    return names


def check_ready(client, models: list[str], timeout: float) -> None:
    if not client.is_server_ready(client_timeout=timeout):
        raise Unhealthy("server not ready")
    check_models_ready(client, models, timeout)


def check_models_ready(client, models: list[str], timeout: float) -> None:
    for m in models:
        if not client.is_model_ready(m, client_timeout=timeout):
            raise Unhealthy(f"model {m} not ready")


def python_instances(client, models: list[str], timeout: float) -> dict[str, int]:
    """{model: stub processes Triton starts for it} for the Python-backend models: one per
    instance (a KIND_GPU group has `count` instances on each of its GPUs)."""
    out = {}
    for m in models:
        cfg = client.get_model_config(m, as_json=True, client_timeout=timeout)["config"]
        if cfg.get("backend") != "python":
            continue
        out[m] = sum(int(g.get("count", 1)) * (max(1, len(g.get("gpus", []))) if g.get("kind") == "KIND_GPU" else 1)
                     for g in cfg.get("instance_group", []))
    return out


def check_live(client, models: list[str], port: int, timeout: float) -> None:
    if not client.is_server_live(client_timeout=timeout):
        raise Unhealthy("server not live")
    check_models_ready(client, models, timeout)
    expected = python_instances(client, models, timeout)
    server = listening_pid(port)
    if server is None:
        raise Unhealthy(f"no process of this pod listens on port {port}")
    alive = Counter(s.model for s in find_stubs(server))
    for m, n in sorted(expected.items()):
        if alive[m] < n:
            raise Unhealthy(f"model {m}: {alive[m]} of its {n} Python backend stub processes alive "
                            "(Triton 2.51 does not restart a dead one)")


def ensembles(client, models: list[str], timeout: float) -> list[dict]:
    """Configs of the models clients call (the ensembles)."""
    out = []
    for m in models:
        cfg = client.get_model_config(m, as_json=True, client_timeout=timeout)["config"]
        if cfg.get("platform") == "ensemble":
            out.append(cfg)
    if not out:
        raise Unhealthy("no ensemble model to call")
    return out


def check_infer(client, cfg: dict, timeout: float) -> None:
    """One image at one step; a class-conditional model gets class 0."""
    import numpy as np
    import tritonclient.grpc as grpc

    name = cfg["name"]
    params = {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
    dtypes = {i["name"]: i["data_type"].replace("TYPE_", "") for i in cfg.get("input", [])}
    values = {"seed": 0, "steps": 1}
    if int(params.get("num_classes", "0") or 0) > 0:
        values["class_label"] = 0
    inputs = []
    for key, value in values.items():  # the dtypes the config declares
        dtype = dtypes[key]
        inp = grpc.InferInput(key, [1, 1], dtype)
        inp.set_data_from_numpy(np.full((1, 1), value, dtype={"INT32": np.int32, "INT64": np.int64}[dtype]))
        inputs.append(inp)
    result = client.infer(name, inputs, outputs=[grpc.InferRequestedOutput("sample")], client_timeout=timeout)
    sample = result.as_numpy("sample")
    if sample is None or sample.size == 0 or not all(math.isfinite(float(v)) for v in sample.reshape(-1)):
        raise Unhealthy(f"model {name}: no finite sample in the answer")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("ready", "infer", "live"))
    p.add_argument("--url", default=os.environ.get("FEWSTEP_PROBE_URL", "127.0.0.1:8001"),
                   help="Triton's gRPC endpoint (default 127.0.0.1:8001)")
    p.add_argument("--repo", default=os.environ.get("FEWSTEP_REPO", "/srv/repo"),
                   help="the model repository the server runs (default $FEWSTEP_REPO or /srv/repo)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per call")
    args = p.parse_args(argv)
    import tritonclient.grpc as grpc
    from tritonclient.utils import InferenceServerException

    client = grpc.InferenceServerClient(args.url)
    try:
        models = repository_models(Path(args.repo))
        if args.mode == "live":
            check_live(client, models, int(args.url.rsplit(":", 1)[1]), args.timeout)
            return 0
        check_ready(client, models, args.timeout)
        if args.mode == "infer":
            for cfg in ensembles(client, models, args.timeout):
                check_infer(client, cfg, args.timeout)
    except InferenceServerException as e:
        print(f"unhealthy: {e.message() or e}", file=sys.stderr)
        return 1
    except Unhealthy as e:
        print(f"unhealthy: {e}", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
