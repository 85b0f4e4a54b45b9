"""`fewstep serve` (Triton on exported models) and `fewstep generate` (a gRPC client)."""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fewstep.errors import UserError
from fewstep.export.runner import BACKENDS
from fewstep.serving.client import DEADLINE_S
from fewstep.serving.launcher import GRACE_S
from fewstep.serving.native_jump import JUMP_BACKENDS
from fewstep.serving.protocol import INPUTS


# --- serve ------------------------------------------------------------------------------------

def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", required=True, metavar="[NAME=]DIR",
                   help="an exported model dir (repeatable); served as NAME (default: the manifest's name)")
    p.add_argument("--repo", help="model repository to write (default: a temporary dir, removed on exit)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--grpc-port", type=int, default=8001,
                   help="port of Triton's gRPC endpoint, the one clients use (default 8001; 0 = any free port)")
    p.add_argument("--http-port", type=int, default=8000,
                   help="port of Triton's HTTP endpoint (default 8000; 0 = any free port), used with --http")
    p.add_argument("--metrics-port", type=int, default=8002,
                   help="port of Triton's Prometheus metrics (default 8002; 0 = any free port)")
    add_hardening_args(p)
    p.add_argument("--instances", type=int, default=0,
                   help="instances that run the jump: samplers (inline) or <name>_jump (bls); "
                        "0 = auto: instances x threads = cores on the CPU, 1 per GPU")
    p.add_argument("--sampler-instances", type=int, default=0,
                   help="instances of each <name>_sampler, one step scheduler each (0 = as --instances)")
    p.add_argument("--workers", type=int, default=8, help="streams run at once per <name>_stream instance")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"),
                   help="where the jump runs: auto = GPU instances only when a GPU (and a GPU runtime) is present")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="jump runtime (export.runner); auto = a TensorRT engine on GPU when one fits")
    p.add_argument("--threads", type=int, default=0,
                   help="intra-op threads per jump session (0 = auto: cores / instances on the CPU)")
    p.add_argument("--jump", default="auto", choices=("auto", "inline", "bls"),
                   help="how the sampler runs each step: inline = the jump in the sampler's own process "
                        "(ONNX Runtime, CPU or CUDA; no per-step hop); bls = a request to <name>_jump "
                        "(for a jump on its own backend); auto = inline (docs/PERFORMANCE.md)")
    p.add_argument("--jump-backend", default="python", choices=JUMP_BACKENDS,
                   help="Triton backend of <name>_jump: python (default; the bundled server has only it), "
                        "or Triton's native onnxruntime / tensorrt backend for NVIDIA's container "
                        "(with --dry-run; the sampler then calls it by BLS; docs/deploy.md)")
    p.add_argument("--triton-container", default="", metavar="RELEASE",
                   help="with --jump-backend onnxruntime|tensorrt: the NVIDIA Triton container the repository is "
                        "for; its TensorRT must match the plan and its onnxruntime read the ONNX IR (default: "
                        "$FEWSTEP_TRITON_CONTAINER, in NVIDIA's container its own release, else 24.10; "
                        "'tensorrt=X.Y.Z,onnx-ir=N' names another container's versions)")
    p.add_argument("--no-png", action="store_true", help="do not offer the optional png output")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for every model to be ready")
    p.add_argument("--grace", type=float, default=GRACE_S,
                   help=f"on SIGTERM/SIGINT, seconds the requests in flight get to finish (default {GRACE_S})")
    p.add_argument("--probe-interval", type=float, default=2.0,
                   help="seconds between the watchdog's 1-step probes of every model (a hung stub is "
                        "restarted after two missed probes; 0 = no probe; default 2)")
    p.add_argument("--log-file", help="tritonserver log (default: a file in a temporary dir)")
    p.add_argument("--log-verbose", type=int, default=0)
    p.add_argument("--dry-run", action="store_true",
                   help="only write the model repository (to --repo, default ./model_repository)")


def add_hardening_args(p: argparse.ArgumentParser) -> None:
    """HTTP, its guard and gRPC TLS (docs/serving.md, "Hardening")."""
    p.add_argument("--http", action="store_true",
                   help="also serve HTTP/REST (off by default; gRPC is the product's protocol), behind a "
                        "request-size guard")
    p.add_argument("--http-max-body", type=int, default=1 << 20, metavar="BYTES",
                   help="with --http: larger request bodies get 413 before they reach Triton (default 1 MiB)")
    p.add_argument("--grpc-tls-cert", metavar="PEM", help="serve gRPC over TLS with this certificate (chain)")
    p.add_argument("--grpc-tls-key", metavar="PEM", help="the private key of --grpc-tls-cert")


def hardening_options(args) -> dict:
    """Server(...) keyword arguments from add_hardening_args' options."""
    from fewstep.serving.launcher import TLS

    if bool(args.grpc_tls_cert) != bool(args.grpc_tls_key):
        raise UserError("--grpc-tls-cert and --grpc-tls-key go together")
    if args.http_max_body < 1:
        raise UserError("--http-max-body must be >= 1")
    tls = TLS(Path(args.grpc_tls_cert), Path(args.grpc_tls_key)) if args.grpc_tls_cert else None
    return {"http": args.http, "http_max_body": args.http_max_body, "tls": tls}


def run_serve(args) -> int:
    from fewstep.serving.launcher import find_triton
    from fewstep.serving.repository import Options, write_repository
    from fewstep.serving.session import serve_forever, served

    for port in ("grpc_port", "http_port", "metrics_port"):
        if not 0 <= getattr(args, port) <= 65535:
            raise UserError(f"--{port.replace('_', '-')} must be in [0, 65535]")
    if args.threads < 0 or args.workers < 1:
        raise UserError("--threads must be >= 0 and --workers >= 1")
    if args.grace < 0 or args.probe_interval < 0:
        raise UserError("--grace and --probe-interval must be >= 0")
    if args.jump_backend != "python" and not args.dry_run:
        raise UserError(f"--jump-backend {args.jump_backend}: the bundled tritonserver has only the Python "
                        f"backend; write the repository with --dry-run and serve it with NVIDIA's Triton "
                        f"container (deploy/Dockerfile)")
    hardening = hardening_options(args)
    opts = Options(instances=args.instances, sampler_instances=args.sampler_instances, workers=args.workers,
                   device=args.device, backend=args.backend, threads=args.threads, png=not args.no_png,
                   jump=args.jump, jump_backend=args.jump_backend, triton_container=args.triton_container)
    if args.dry_run:
        repo = Path(args.repo or "model_repository")
        _print_written(write_repository(repo, args.model, opts))
        print(f"wrote the model repository {repo}", file=sys.stderr)
        print(repo)
        return 0
    find_triton()
    server, written = served(args.model, opts, Path(args.repo) if args.repo else None, host=args.host,
                             grpc_port=args.grpc_port, http_port=args.http_port, metrics_port=args.metrics_port,
                             log_file=Path(args.log_file) if args.log_file else None, log_verbose=args.log_verbose,
                             grace_s=args.grace, **hardening)
    _print_written(written)
    server.ready_timeout = args.timeout

    def ready(s):
        print(f"ready: {', '.join(w['name'] for w in written)}", flush=True)
        print(f"  gRPC     {s.grpc_url}{' (TLS)' if s.tls else ''}", flush=True)
        print(f"  HTTP     {s.http_url or 'off (--http turns it on)'}", flush=True)
        print(f"  metrics  {s.metrics_url}", flush=True)
        print(f"  log      {s.log_file}", flush=True)
        print("Ctrl-C (SIGINT) or SIGTERM stops the server.", flush=True)

    rc = serve_forever(server, on_ready=ready, probe_interval_s=args.probe_interval)
    print("stopped", file=sys.stderr)
    return rc


def _print_written(written: list[dict]) -> None:
    for w in written:
        plan = w["plan"]
        print(f"{w['name']}: {', '.join(w['models'])} ({w['kind']}; jump {plan.jump}, {plan.instances} sampler "
              f"instance(s) x {plan.threads} thread(s)) from {w['source']}", file=sys.stderr)
        print(f"{w['name']}: the jump runs on {w['runtime']}", file=sys.stderr)


# --- generate ----------------------------------------------------------------------------------

def add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="127.0.0.1:8001", help="the server's gRPC HOST:PORT (default 127.0.0.1:8001)")
    p.add_argument("--model", required=True, help="model name (the ensemble, as `fewstep serve` printed)")
    p.add_argument("--steps", type=int,
                   help="sampler steps (default: the model's default, one of the counts it was made for)")
    p.add_argument("--seed", type=int, default=0, help="first seed; image i uses seed + i (default 0)")
    p.add_argument("--num", type=int, default=1, help="number of images (default 1)")
    p.add_argument("--class-label", type=int, help="class label (class-conditional models only; no default)")
    p.add_argument("--gamma", type=float,
                   help="sampler stochasticity in [0, 1] (default: the model's); refused where it would change "
                        "nothing: consistency models (always 1) and 1 step")
    for inp in INPUTS.values():  # the table's other inputs (serving.protocol.INPUTS): a flag each
        if inp.name not in ("seed", "steps", "class_label", "gamma"):
            p.add_argument("--" + inp.name.replace("_", "-"), type=int if inp.numpy.kind in "iu" else float,
                           help=f"{inp.what} (one value for every image)", dest=f"input_{inp.name}")
    p.add_argument("--out", required=True, help="PNG file: one image, or a grid of --num images")
    p.add_argument("--timeout", type=float, default=DEADLINE_S,
                   help=f"deadline of each request in seconds, retries included: a server that restarts "
                        f"(a few seconds) is waited for (default {DEADLINE_S:g})")
    p.add_argument("--tls", action="store_true", help="connect over TLS (the system's trusted roots)")
    p.add_argument("--tls-ca", metavar="PEM", help="connect over TLS, checking the server against this "
                                                   "CA (or self-signed) certificate")


class RetryNotice(list):
    """The retries of `fewstep generate` (serving.client's `retried`): the first one is said on
    stderr at once, so that a wait for a restarting server is not silent."""

    def __init__(self, url: str, timeout: float):
        super().__init__()
        self.url, self.timeout = url, timeout

    def append(self, err) -> None:
        if not self:
            print(f"the server at {self.url} answered {err.code} ({err.message[:100]}); retrying within the "
                  f"{self.timeout:g} s deadline (--timeout)", file=sys.stderr, flush=True)
        super().append(err)


def _other_inputs(args, n: int) -> dict:
    """The values of the table's other inputs given on the command line, for n images."""
    return {k[len("input_"):]: [v] * n for k, v in vars(args).items() if k.startswith("input_") and v is not None}


def run_generate(args) -> int:
    import numpy as np

    from fewstep.serving.client import Client, ServingError

    if args.num < 1:
        raise UserError("--num must be >= 1")
    if args.seed < 0:
        raise UserError("--seed must be >= 0")
    out = Path(args.out)
    retried = RetryNotice(args.url, args.timeout)
    try:
        # no readiness check first: a server that is restarting is waited for, within the deadline
        with Client(args.url, timeout=args.timeout, ssl=args.tls, root_certificates=args.tls_ca) as client:
            meta = client.meta(args.model, retried=retried)
            steps = meta.default_steps if args.steps is None else args.steps
            why = meta.gamma_unused(steps) if args.gamma is not None else None
            if why:
                raise UserError(f"--gamma: {why}; leave --gamma out")
            seeds = list(range(args.seed, args.seed + args.num))
            batch = max(1, meta.max_batch)
            parts = [seeds[i:i + batch] for i in range(0, len(seeds), batch)]
            labels = None if args.class_label is None else args.class_label
            t0 = time.perf_counter()
            with ThreadPoolExecutor(max_workers=min(8, len(parts))) as pool:
                results = list(pool.map(lambda s: client.generate(args.model, s, steps, retried=retried,
                                                                  class_labels=labels, gamma=args.gamma,
                                                                  **_other_inputs(args, len(s))), parts))
            latency = time.perf_counter() - t0
    except ServingError as e:
        if e.code == "UNAVAILABLE":
            raise UserError(f"no ready server at {args.url} within the {args.timeout:g} s deadline "
                            f"(--timeout): {e.message}") from None
        raise UserError(f"{args.model}: {e.message} ({e.code})") from None
    data = np.concatenate(results)
    if meta.is_image:
        from fewstep.images import grid_image, save_png
        save_png(data[0] if len(data) == 1 else grid_image(data), out)
    else:  # the plot `fewstep sample` draws of the same points
        from fewstep.plots import save_scatter, steps_title
        save_scatter(data, out, steps_title(meta.method or args.model, steps))
    print(generate_summary(meta, steps, seeds, args.class_label, args.gamma, latency, len(parts), args.url, out))
    if retried:
        codes = ", ".join(f"{c} x{n}" for c, n in Counter(e.code for e in retried).items())
        print(f"retried {len(retried)} time{'s' if len(retried) > 1 else ''} ({codes})", file=sys.stderr)
    return 0


def generate_summary(meta, steps: int, seeds: list[int], label, gamma, latency: float, requests: int, url: str,
                     out: Path) -> str:
    """What `fewstep generate` did, in one line: model, steps, seeds, latency, server, file."""
    what = f"{len(seeds)} image{'s' if len(seeds) != 1 else ''}" if meta.is_image else f"{len(seeds)} samples"
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}-{seeds[-1]}"
    extra = "".join([f", class {label}" if label is not None else "",
                     f", gamma {gamma:g}" if gamma is not None else ""])
    made = "" if steps in meta.made_for else f" (made for {', '.join(str(k) for k in meta.made_for)})"
    return (f"{meta.name} ({meta.method or '?'}): {what}, {seed_text}, {steps} step{'s' if steps != 1 else ''}{made}"
            f"{extra}, {latency * 1e3:.0f} ms in {requests} request{'s' if requests != 1 else ''} to {url} -> {out}")


# --- bench (serving/bench.py) ----------------------------------------------------------------------

def add_bench_args(p: argparse.ArgumentParser) -> None:
    from fewstep.serving.bench import add_bench_args as add

    add(p)


def run_bench(args) -> int:
    from fewstep.serving.bench import run_bench as run

    return run(args)
