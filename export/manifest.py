"""manifest.json: what serving needs to know about an exported model, and its checks.

The manifest is a contract with the serving stack (see docs/export.md); its JSON Schema
is `export/manifest.schema.json`. `fewstep export` validates what it writes and
`read_manifest` validates what it reads. Fields may be added, never removed or renamed.
This module imports neither torch nor onnxruntime.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

from fewstep import jump
from fewstep.errors import UserError
from fewstep.figures import features_sha, is_shipped_network
from fewstep.files import sha256_file as file_sha256

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ONNX_FILE = "jump.onnx"
SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")
FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}$")  # = files' propertyNames in the schema


class ManifestError(UserError):
    """A manifest (or the model dir it describes) is missing, malformed or inconsistent."""


@lru_cache(maxsize=1)
def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def sanitize_name(text: str) -> str:
    """A model name clients can use: [A-Za-z0-9_]+ (anything else becomes '_')."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", str(text)).strip("_")
    return name or "model"


def sha256_file(path) -> str:
    """A file's digest as the manifest records it: "sha256:<hex>"."""
    return "sha256:" + file_sha256(path)


def model_file(model_dir, fname: str) -> Path:
    """The path of a file the manifest names, refused unless it is a plain file directly
    inside model_dir: no path separators, no '..', no symbolic link (a model dir must
    never make serving read or write outside its own folder)."""
    if not FILE_NAME.match(fname):
        raise ManifestError(f"{model_dir}: the manifest names {fname!r}: only plain file names "
                            f"inside the model dir are allowed")
    path = Path(model_dir) / fname
    if path.is_symlink():
        raise ManifestError(f"{model_dir}: {fname} is a symbolic link; a model dir holds plain files only")
    if path.exists() and not path.is_file():
        raise ManifestError(f"{model_dir}: {fname} is not a plain file")
    return path


def validate(manifest: dict) -> None:
    """Schema plus the cross-field rules a schema cannot say; raises ManifestError."""
    import jsonschema

    files = manifest.get("files") if isinstance(manifest, dict) else None
    for fname in files if isinstance(files, dict) else ():
        if not FILE_NAME.match(fname):  # said plainly here; the schema says the same
            raise ManifestError(f"manifest field files: {fname!r}: only plain file names inside the model dir "
                                f"are allowed")
    try:
        jsonschema.validate(manifest, schema())
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise ManifestError(f"manifest field {where}: {e.message}") from None
    image = manifest["image"]
    if len(image["shape"]) == 3 and image["channels"] != image["shape"][0]:
        raise ManifestError(f"manifest: image.channels {image['channels']} != shape[0] {image['shape'][0]}")
    lo, hi = image["value_range"]
    if not lo < hi:
        raise ManifestError(f"manifest: image.value_range {image['value_range']} is empty")
    why = jump.manifest_mismatch(manifest)  # the jump contract is fewstep.jump's, not the schema's
    if why:
        raise ManifestError(f"manifest: {why}")
    spec = manifest["sampler"]
    if spec["default_steps"] > spec["max_steps"]:
        raise ManifestError("manifest: sampler.default_steps > sampler.max_steps")
    if "recommended_steps" in manifest:
        check_recommended_steps(manifest["recommended_steps"], spec)
    for eng in manifest["engines"]:
        if not eng["min_batch"] <= eng["opt_batch"] <= eng["max_batch"]:
            raise ManifestError(f"manifest: engine {eng['file']}: needs min_batch <= opt_batch <= max_batch")
        if eng["file"] not in manifest["files"]:
            raise ManifestError(f"manifest: engine {eng['file']} has no hash in files")


def check_recommended_steps(steps, spec: dict) -> list[int]:
    """The step counts a model was made for: ascending, within [1, max_steps], and holding the
    default step count (clients default to it). Returns them as a list; raises ManifestError."""
    steps = list(steps)
    if not steps or any(isinstance(k, bool) or not isinstance(k, int) for k in steps):
        raise ManifestError(f"manifest: recommended_steps must be a non-empty list of integers, got {steps!r}")
    if steps != sorted(set(steps)):
        raise ManifestError(f"manifest: recommended_steps must be ascending without repeats, got {steps}")
    if not 1 <= steps[0] or steps[-1] > spec["max_steps"]:
        raise ManifestError(f"manifest: recommended_steps must lie in [1, {spec['max_steps']}] "
                            f"(sampler.max_steps), got {steps}")
    if spec["default_steps"] not in steps:
        raise ManifestError(f"manifest: recommended_steps {steps} must include sampler.default_steps "
                            f"({spec['default_steps']})")
    return steps


def recommended_steps(manifest: dict) -> list[int]:
    """The step counts the model was made for ([sampler.default_steps] for older manifests)."""
    return list(manifest.get("recommended_steps") or [int(manifest["sampler"]["default_steps"])])


def step_quality(manifest: dict) -> dict | None:
    """The manifest's eval figures by step count: {"metric", "num", "by_steps": {steps: value}}
    (lower is better: FID for images, sliced Wasserstein for 2-D), or None without figures.

    `fewstep eval` names the metric by its features ("fid-classifier", "fid-inception") and keys
    each result by the quantity ("fid"); 2-D reports use "swd" for both. A classifier FID counts
    only when measured on a shipped feature network (fewstep/figures.py): figures of another
    network, or of the evaluators before it, are not shown beside the project's.
    """
    ev = manifest.get("eval")
    if not isinstance(ev, dict) or not isinstance(ev.get("results"), list):
        return None
    metric = str(ev.get("metric") or "fid")
    sha = features_sha(ev)
    if metric == "fid-classifier" and not is_shipped_network(sha):
        return None
    key = "swd" if metric == "swd" else "fid"
    by_steps = {}
    for r in ev["results"]:
        if isinstance(r, dict) and isinstance(r.get("steps"), int) and isinstance(r.get(key), (int, float)) \
                and not isinstance(r.get(key), bool):
            by_steps[int(r["steps"])] = float(r[key])
    if not by_steps:
        return None
    return {"metric": metric, "num": ev.get("num"), "features": sha, "by_steps": dict(sorted(by_steps.items()))}


def write_manifest(model_dir, manifest: dict) -> Path:
    validate(manifest)
    path = Path(model_dir) / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def read_manifest(model_dir, verify_files: bool = True) -> dict:
    """Read and validate `<model_dir>/manifest.json`.

    verify_files: also check that every file it lists exists with the hash it records.
    """
    path = model_file(model_dir, MANIFEST)
    if not path.is_file():
        raise ManifestError(f"{model_dir} is not an exported model dir (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: unreadable JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path}: not a JSON object")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ManifestError(f"{path}: format_version {manifest.get('format_version')!r} is not supported "
                            f"(this fewstep reads {FORMAT_VERSION})")
    validate(manifest)
    if verify_files:
        for fname, digest in manifest["files"].items():
            fpath = model_file(model_dir, fname)
            if not fpath.is_file():
                raise ManifestError(f"{model_dir}: {fname} is listed in the manifest but missing")
            if sha256_file(fpath) != digest:
                raise ManifestError(f"{model_dir}: {fname} does not match its hash in the manifest (corrupt or replaced)")
    return manifest
