"""`fewstep demo`: Triton with the default models (or a running server) and the Gradio page."""
from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path

from fewstep.errors import UserError


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="attach to a running server at this gRPC HOST:PORT instead of starting one")
    p.add_argument("--host", default="127.0.0.1", help="address the page (and the server it starts) bind to")
    p.add_argument("--port", type=int, default=None,
                   help="the page's port (default 7860, or the next free one up to 7959; 0: any free one)")
    p.add_argument("--model", action="append", metavar="[NAME=]DIR",
                   help="serve these exported model dirs (repeatable) instead of the default models")
    p.add_argument("--models-dir", help="shipped default models (default: demo/models)")
    p.add_argument("--cache-dir", help="where the default models are exported (default: $FEWSTEP_CACHE/demo-models, "
                                       "$FEWSTEP_CACHE defaulting to ~/.cache/fewstep)")
    g = p.add_argument_group("the server it starts (as in `fewstep serve`)")
    g.add_argument("--grpc-port", type=int, default=None, help="default 8001, or a free port when 8001 is taken")
    g.add_argument("--http-port", type=int, default=None, help="default 8000, or a free port when 8000 is taken")
    g.add_argument("--metrics-port", type=int, default=None, help="default 8002, or a free port when taken")
    g.add_argument("--instances", type=int, default=0,
                   help="instances that run the jump (0 = auto: instances x threads = cores on the CPU)")
    g.add_argument("--threads", type=int, default=0, help="intra-op threads per jump instance (0 = default)")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"),
                   help="where the jump runs: auto = the GPU when one and a CUDA runtime (pip install -e '.[gpu]') "
                        "are present; gpu = refuse to start without them")
    g.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the server to be ready")
    g.add_argument("--log-file", help="tritonserver log (default: a file in a temporary dir)")
    p.add_argument("--concurrency", type=int, default=4, help="requests the page runs at once (its queue's limit)")


def _port(host: str, wanted: int | None, default: int, what: str) -> int:
    """The port asked for; or the default when it is free; or any free one (said so)."""
    if wanted is not None:
        if not 0 <= wanted <= 65535:
            raise UserError(f"--{what} must be in [0, 65535]")
        return wanted
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, default))
            return default
        except OSError:
            pass
    print(f"[demo] port {default} is taken; the server's {what.replace('-port', '')} endpoint uses a free port",
          file=sys.stderr)
    return 0


def _log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def _model_dirs(args) -> list[str]:
    if args.model:
        return list(args.model)
    from fewstep.export.shipped import prepare_all
    t0 = time.time()
    dirs = prepare_all(Path(args.models_dir) if args.models_dir else None,
                       Path(args.cache_dir) if args.cache_dir else None, log=_log)
    _log(f"default models ready ({', '.join(d.parent.name for d in dirs)}) in {time.time() - t0:.1f} s")
    return [str(d) for d in dirs]


def run_demo(args) -> int:
    if args.port is not None and not 0 <= args.port <= 65535:
        raise UserError("--port must be in [0, 65535]")
    if args.concurrency < 1:
        raise UserError("--concurrency must be >= 1")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserError("the demo needs gradio: pip install -e '.[demo]'") from None
    dirs = None
    if not args.url:
        from fewstep.serving.launcher import find_triton, gpu_present
        find_triton()
        if args.device == "gpu" and not gpu_present():  # said before any export
            raise UserError("--device gpu: no NVIDIA GPU is visible on this host")
        dirs = _model_dirs(args)  # before our signal handlers: Ctrl-C stops an export at once

    from fewstep.serving.session import StopSignals, served, watch

    server = None
    app = None
    with StopSignals() as stop:
        try:
            manifests = {}
            if args.url:
                url = args.url
            else:
                from fewstep.serving.repository import Options, read_manifest

                server, written = served(dirs, Options(instances=args.instances, threads=args.threads,
                                                       device=args.device), host=args.host,
                                         grpc_port=_port(args.host, args.grpc_port, 8001, "grpc-port"),
                                         http_port=_port(args.host, args.http_port, 8000, "http-port"),
                                         metrics_port=_port(args.host, args.metrics_port, 8002, "metrics-port"),
                                         log_file=Path(args.log_file) if args.log_file else None)
                manifests = {w["name"]: read_manifest(Path(w["source"])) for w in written}
                for w in written:
                    _log(f"{w['name']}: the jump runs on {w['runtime']}")
                server.abort = stop.requested
                _log(f"starting tritonserver with {', '.join(manifests)} ...")
                t0 = time.time()
                try:
                    server.start(timeout=args.timeout)
                except KeyboardInterrupt:
                    return 130
                url = server.grpc_url
                http = f", HTTP {server.http_url}" if server.http_url else ""
                _log(f"tritonserver ready in {time.time() - t0:.1f} s: gRPC {url}{http}")

            from fewstep.demo.app import build_app, launch
            app = build_app(url, manifests=manifests, concurrency=args.concurrency)
            page = launch(app, host=args.host, port=args.port)
            print(f"fewstep demo: open {page}", flush=True)
            print(f"  Triton gRPC {url}" + ("" if server else " (attached)"), flush=True)
            print("Ctrl-C (SIGINT) or SIGTERM stops it.", flush=True)
            return watch(server, stop, who="fewstep demo: ")
        finally:
            if app is not None:
                try:
                    app.close()
                except Exception:
                    pass
            if server is not None:
                server.close()
            if stop.requested():
                print("stopped", file=sys.stderr)
