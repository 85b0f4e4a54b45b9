"""The runtime versions an exported model must match, and the checks that refuse a mismatch.

A TensorRT plan loads only in the TensorRT it was built with; an ONNX file loads only in an
ONNX Runtime that reads its IR version. Serving checks both before Triton would fail on
them: `fewstep serve --dry-run --jump-backend tensorrt|onnxruntime` (and NVIDIA's container,
whose entrypoint runs it at start) against the *target container* below, and the Python
jump against the runtime installed beside it (export.runner).

The target container is one row of TRITON_CONTAINERS, picked by `--triton-container`, else
$FEWSTEP_TRITON_CONTAINER, else NVIDIA_TRITON_SERVER_VERSION (which NVIDIA's Triton image
sets to its release), else DEFAULT_CONTAINER (deploy/Dockerfile's base). A container that
is not in the table is named by its versions: "tensorrt=10.8.0,onnx-ir=10".
This module imports neither onnx, onnxruntime nor tensorrt.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from fewstep.errors import UserError


@dataclass(frozen=True)
class Container:
    name: str                # the release ("24.10") or "custom"
    tensorrt: str            # the TensorRT its tensorrt_plan backend runs (a plan must match)
    max_onnx_ir: int         # the newest ONNX IR version its onnxruntime_onnx backend reads
    onnxruntime: str = ""    # that backend's ONNX Runtime, for the messages
    triton: str = ""         # the Triton server release


# Sources: Triton 24.10's build.py (TRITON_VERSION_MAP: 2.51.0, ONNX Runtime 1.19.2) and its
# docs/introduction/compatibility.md; ONNX Runtime 1.19 is built on ONNX 1.16, whose IR
# version is 10 (onnx.helper.VERSION_TABLE); the 24.10 container's TensorRT is 10.5.0.
# A release is added here only with all of its versions known.
TRITON_CONTAINERS = {
    "24.10": Container("24.10", tensorrt="10.5.0", max_onnx_ir=10, onnxruntime="1.19.2", triton="2.51.0"),
}
DEFAULT_CONTAINER = "24.10"
CONTAINER_ENV = "FEWSTEP_TRITON_CONTAINER"
NVIDIA_RELEASE_ENV = "NVIDIA_TRITON_SERVER_VERSION"  # set in NVIDIA's tritonserver images


def _custom(spec: str) -> Container:
    fields = {}
    for part in spec.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or key not in ("tensorrt", "onnx-ir", "name") or not value:
            raise ValueError(part)
        fields[key] = value.strip()
    if not {"tensorrt", "onnx-ir"} <= set(fields) or not re.fullmatch(r"\d+(\.\d+)*", fields["tensorrt"]):
        raise ValueError(spec)
    return Container(fields.get("name", "custom"), tensorrt=fields["tensorrt"], max_onnx_ir=int(fields["onnx-ir"]))


def target_container(spec: str | None = None, environ=None) -> Container:
    """The container a repository is written for (see the module's docstring)."""
    env = os.environ if environ is None else environ
    where = "--triton-container"
    if not spec:
        spec, where = env.get(CONTAINER_ENV), f"${CONTAINER_ENV}"
    if not spec:
        spec, where = env.get(NVIDIA_RELEASE_ENV), f"${NVIDIA_RELEASE_ENV} (this container's release)"
    if not spec:
        return TRITON_CONTAINERS[DEFAULT_CONTAINER]
    spec = spec.strip()
    if spec in TRITON_CONTAINERS:
        return TRITON_CONTAINERS[spec]
    if "=" in spec:
        try:
            return _custom(spec)
        except ValueError:
            pass
    raise UserError(f"{where}: Triton container {spec!r} is not in fewstep's table ({', '.join(TRITON_CONTAINERS)}); "
                    f"name its versions instead, e.g. {CONTAINER_ENV}=tensorrt=10.8.0,onnx-ir=10")


def describe(c: Container) -> str:
    return f"Triton container {c.name}" if c.name in TRITON_CONTAINERS else f"the target container ({c.name})"


# --- TensorRT ----------------------------------------------------------------------------------

def trt_release(version: str) -> tuple[int, ...]:
    """'10.5.0.18' -> (10, 5, 0): a plan is tied to TensorRT's major.minor.patch."""
    parts = re.findall(r"\d+", str(version))[:3]
    return tuple(int(p) for p in parts) + (0,) * (3 - len(parts))


def plan_refusal(engine: dict, tensorrt: str, where: str) -> str | None:
    """Why `engine` (a manifest engines entry) cannot load in `tensorrt`, or None."""
    built = engine["tensorrt"]
    if trt_release(built) == trt_release(tensorrt):
        return None
    want = ".".join(str(p) for p in trt_release(tensorrt))
    return (f"TensorRT plan {engine['file']} was built with TensorRT {built}, {where} runs TensorRT {tensorrt}: "
            f"rebuild it with TensorRT {want} (pip install 'tensorrt=={want}'; `fewstep export --format onnx,tensorrt`)")


def check_plan(engine: dict, target: Container) -> None:
    why = plan_refusal(engine, target.tensorrt, describe(target))
    if why:
        raise UserError(why)


# --- ONNX IR -----------------------------------------------------------------------------------

def _varint(f) -> int | None:
    shift = value = 0
    while True:
        b = f.read(1)
        if not b:
            return None
        value |= (b[0] & 0x7F) << shift
        if b[0] < 0x80:
            return value
        shift += 7


def onnx_ir_version(path) -> int:
    """ModelProto.ir_version (field 1) of an ONNX file, read by walking its top-level
    protobuf fields (no onnx package; the graph is skipped, not read)."""
    with open(path, "rb") as f:
        while True:
            key = _varint(f)
            if key is None:
                break
            field, wire = key >> 3, key & 7
            if wire == 0:
                value = _varint(f)
                if value is None:
                    break
                if field == 1:
                    return value
            elif wire == 2:
                n = _varint(f)
                if n is None:
                    break
                f.seek(n, os.SEEK_CUR)
            elif wire in (1, 5):
                f.seek(8 if wire == 1 else 4, os.SEEK_CUR)
            else:
                break
    raise UserError(f"{path}: not an ONNX model (no ir_version)")


def ir_refusal(path, ir: int, max_ir: int, who: str) -> str | None:
    if ir <= max_ir:
        return None
    return (f"{Path(path).name} is ONNX IR version {ir}, {who} reads IR <= {max_ir}: re-export with a "
            f"torch/onnx that writes IR {max_ir}, or serve with a newer container")


def check_onnx(path, target: Container) -> int:
    """The file's IR version; UserError when the target's onnxruntime cannot read it."""
    ir = onnx_ir_version(path)
    who = f"{describe(target)}'s onnxruntime" + (f" {target.onnxruntime}" if target.onnxruntime else "")
    why = ir_refusal(path, ir, target.max_onnx_ir, who)
    if why:
        raise UserError(why)
    return ir


def container_notes(onnx_path, engines: list[dict]) -> list[str]:
    """What `fewstep export` says when its files would not load in the target container
    (the export itself may be meant for another machine: a note, not a refusal)."""
    try:
        target = target_container()
    except UserError as e:
        return [str(e)]
    notes = [ir_refusal(onnx_path, onnx_ir_version(onnx_path), target.max_onnx_ir, f"{describe(target)}'s onnxruntime")]
    notes += [plan_refusal(e, target.tensorrt, describe(target)) for e in engines]
    return [n for n in notes if n]
