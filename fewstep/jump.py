"""The jump contract, written once: x_s = jump(x, t, s[, class_label]).

Every model's jump takes a batch of samples x at times t and moves each to its time s <= t;
a class-conditional model also takes its class labels. The ONNX graph and the TensorRT plan
(export), the runners (export.runner), the Triton configs of `<name>_jump` (serving.repository,
for the Python and the native backends alike), the jump model and the sampler's BLS calls
(serving/models/) all read their names, dtypes and shapes from here, and `manifest.json`
records the names (`jump.inputs`, `jump.output`): serving refuses a manifest that names others
(`check_manifest`). Plain numpy: serving imports it without torch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class JumpTensor:
    name: str
    dtype: str          # numpy's name: float32, int64
    per_sample: bool    # one value per sample ([B] in the graph, [B, 1] in Triton's configs); else the sample's shape
    what: str           # the config's comment

    @property
    def numpy(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def config_type(self) -> str:
        """Triton's type name: TYPE_FP32, TYPE_INT64."""
        return "TYPE_" + {"float32": "FP32", "int64": "INT64"}[self.dtype]

    def dims(self, sample_shape) -> list[int]:
        """Its dims in a Triton config (without the batch)."""
        return [1] if self.per_sample else [int(d) for d in sample_shape]

    def shape(self, sample_shape) -> tuple:
        """Its per-sample shape in the graph (without the batch): () for a per-sample value."""
        return () if self.per_sample else tuple(int(d) for d in sample_shape)


X = JumpTensor("x", "float32", False, "x_t: the sample at time t")
T = JumpTensor("t", "float32", True, "the time of x (per sample)")
S = JumpTensor("s", "float32", True, "the time to jump to, s <= t (per sample)")
CLASS_LABEL = JumpTensor("class_label", "int64", True, "the class (class-conditional models only)")
OUTPUT = JumpTensor("x_s", "float32", False, "the sample at time s")


def inputs(num_classes: int) -> tuple[JumpTensor, ...]:
    """The jump's inputs, in the graph's order: class_label exactly when the model has classes."""
    return (X, T, S) + ((CLASS_LABEL,) if num_classes > 0 else ())


def input_names(num_classes: int) -> list[str]:
    return [i.name for i in inputs(num_classes)]


def feeds(x, t, s, labels=None, per_sample_shape=(-1,)) -> dict:
    """{input name: contiguous array of its dtype} of one call; t, s (and labels) reshaped to
    `per_sample_shape` ((-1,) for the graph, (-1, 1) for a Triton request)."""
    values = {X.name: x, T.name: t, S.name: s}
    if labels is not None:
        values[CLASS_LABEL.name] = labels
    out = {}
    for tensor in (X, T, S, CLASS_LABEL):
        if tensor.name in values:
            a = np.ascontiguousarray(values[tensor.name], dtype=tensor.numpy)
            out[tensor.name] = a.reshape(per_sample_shape) if tensor.per_sample else a
    return out


def args(feeds: dict) -> tuple:
    """(x, t, s, labels or None) of a feeds dict: the positional call of a jump."""
    return tuple(feeds.get(i.name) for i in (X, T, S, CLASS_LABEL))


def manifest_mismatch(manifest: dict) -> str | None:
    """Why a manifest's jump (`jump.inputs`, `jump.output`) speaks another contract than this
    one, in one line; None when it speaks this one. export.manifest.validate refuses such a
    manifest, so neither serving nor a runner ever loads it."""
    jump = manifest.get("jump") or {}
    want = input_names(int(manifest.get("num_classes", 0)))
    got, out = list(jump.get("inputs") or []), jump.get("output")
    if got == want and out == OUTPUT.name:
        return None
    return (f"its jump takes ({', '.join(map(str, got))}) -> {out}, but this fewstep speaks "
            f"({', '.join(want)}) -> {OUTPUT.name} for a model with {int(manifest.get('num_classes', 0))} classes")
