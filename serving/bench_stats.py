"""What the server says about a benchmark cell: Triton's inference statistics (per composing
model, as the difference of two snapshots) and the sampler's jump counters (Prometheus)."""
from __future__ import annotations


STAT_PARTS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


def parse_stats(js: dict) -> dict:
    """GetInferenceStatistics JSON -> {model: {inference_count, execution_count, <part>_count, <part>_ns}}."""
    out = {}
    for m in js.get("model_stats", []):
        inf = m.get("inference_stats", {}) or {}
        d = {"inference_count": int(m.get("inference_count", 0) or 0),
             "execution_count": int(m.get("execution_count", 0) or 0)}
        for part in STAT_PARTS:
            v = inf.get(part, {}) or {}
            d[f"{part}_count"] = int(v.get("count", 0) or 0)
            d[f"{part}_ns"] = int(v.get("ns", 0) or 0)
        out[m["name"]] = d
    return out


def stats_delta(before: dict, after: dict, names: list[str]) -> dict:
    """Per composing model, what happened between two snapshots; times in ms per request."""
    out = {}
    for name in names:
        a, b = after.get(name), before.get(name, {})
        if a is None:
            continue
        d = {k: a[k] - b.get(k, 0) for k in a}
        req = d["success_count"]
        per = (lambda ns: ns / req / 1e6) if req else (lambda ns: None)
        out[name] = {
            "requests": req, "failed": d["fail_count"], "inferences": d["inference_count"],
            "executions": d["execution_count"],
            "avg_batch": d["inference_count"] / d["execution_count"] if d["execution_count"] else None,
            "request_ms": per(d["success_ns"]), "queue_ms": per(d["queue_ns"]),
            "compute_input_ms": per(d["compute_input_ns"]), "compute_infer_ms": per(d["compute_infer_ns"]),
            "compute_output_ms": per(d["compute_output_ns"]),
            "compute_ms": per(d["compute_input_ns"] + d["compute_infer_ns"] + d["compute_output_ns"]),
        }
    return out


COUNTER_NAMES = {"fewstep_sampler_jump_calls": "calls", "fewstep_sampler_image_steps": "image_steps"}


def parse_jump_counters(text: str, model: str) -> dict | None:
    """Prometheus text -> {"calls", "image_steps"} of `<model>_sampler`, summed over its
    instances (the sampler's scheduler counts them: serving.models.common.JumpCounters)."""
    out = {}
    want = f'model="{model}_sampler"'
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        key = COUNTER_NAMES.get(name.strip().removesuffix("_total"))
        if key is None or want not in rest:
            continue
        out[key] = out.get(key, 0) + int(float(line.rsplit(" ", 1)[1]))
    return out if len(out) == 2 else None


def read_jump_counters(metrics_url: str | None, model: str, timeout: float = 5.0) -> dict | None:
    """The sampler's jump counters from Triton's metrics endpoint (None when not there)."""
    import urllib.error
    import urllib.request

    if not metrics_url:
        return None
    try:
        with urllib.request.urlopen(metrics_url, timeout=timeout) as r:
            return parse_jump_counters(r.read().decode("utf-8", "replace"), model)
    except (urllib.error.URLError, OSError, ValueError):
        return None


def jump_calls(before: dict | None, after: dict | None, server: dict | None, model: str) -> dict:
    """Jump calls per image-step and the average jump batch of a cell: from the sampler's
    counters ("sampler": the calls its schedulers made) and, when the jump runs as its own
    model (bls), from Triton's statistics of `<model>_jump` ("jump_model": its executions,
    where calls of several samplers may meet). The headline figures take the sampler's."""
    out = {}
    if before is not None and after is not None:
        calls, steps = after["calls"] - before["calls"], after["image_steps"] - before["image_steps"]
        out["sampler"] = {"calls": calls, "image_steps": steps}
    jump = (server or {}).get(model + "_jump") or {}
    if jump.get("inferences"):
        out["jump_model"] = {"calls": jump["executions"], "image_steps": jump["inferences"]}
    for part in out.values():
        part["calls_per_image_step"] = part["calls"] / part["image_steps"] if part["image_steps"] else None
        part["avg_batch"] = part["image_steps"] / part["calls"] if part["calls"] else None
    head = out.get("sampler") or out.get("jump_model")
    if head and head["image_steps"]:
        out["calls_per_image_step"] = head["calls_per_image_step"]
        out["avg_batch"] = head["avg_batch"]
        out["from"] = "sampler" if "sampler" in out else "jump_model"
    return out
