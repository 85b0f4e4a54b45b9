"""`fewstep`: one command, subcommands implemented in their own packages.

Each package's cli module exposes `add_<cmd>_args(parser)` and `run_<cmd>(args)`; a
subcommand's module is imported only when it runs, so `fewstep serve` never imports
torch's training code.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from fewstep.errors import UserError

COMMANDS = {
    "train": ("fewstep.training.cli", "train a model with one of the methods"),
    "sample": ("fewstep.training.cli", "write a PNG grid of samples from a checkpoint"),
    "eval": ("fewstep.training.cli", "FID (images) or sliced Wasserstein (2-D) at several step counts"),
    "precond": ("fewstep.training.cli", "Analytic-Precond: fit teacher statistics, measure consistency gaps"),
    "features": ("fewstep.training.cli", "train the FID feature network once (the shipped one is pinned)"),
    "export": ("fewstep.export.cli", "export a checkpoint to ONNX (+ TensorRT) with a manifest"),
    "serve": ("fewstep.serving.cli", "serve exported models with Triton Inference Server"),
    "generate": ("fewstep.serving.cli", "generate images from a running server over gRPC"),
    "bench": ("fewstep.serving.cli", "benchmark latency against sampling steps over gRPC"),
    "demo": ("fewstep.demo.cli", "the Gradio demo page, talking to Triton"),
}


def _available(module: str, cmd: str) -> bool:
    try:
        return hasattr(importlib.import_module(module), f"add_{cmd}_args")
    except ImportError:
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fewstep", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd, (_, help_) in COMMANDS.items():
        sub.add_parser(cmd, help=help_, add_help=False)
    return parser


def command_parser(cmd: str) -> argparse.ArgumentParser:
    module, help_ = COMMANDS[cmd]
    p = argparse.ArgumentParser(prog=f"fewstep {cmd}", description=help_)
    getattr(importlib.import_module(module), f"add_{cmd}_args")(p)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = next((a for a in argv if not a.startswith("-")), None)
    if cmd not in COMMANDS:
        build_parser().parse_args(argv)  # prints help or a usage error
        return 2
    module = COMMANDS[cmd][0]
    if not _available(module, cmd):
        print(f"fewstep: error: '{cmd}' is not available in this build", file=sys.stderr)
        return 2
    rest = list(argv)
    rest.remove(cmd)
    # intermixed: KEY=VALUE overrides may stand before or after the options
    args = command_parser(cmd).parse_intermixed_args(rest)
    args.command = cmd
    mod = importlib.import_module(module)
    try:
        rc = getattr(mod, f"run_{cmd}")(args)
    except UserError as e:
        print(f"fewstep {cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fewstep {cmd}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
