"""What `fewstep bench` makes of its measurements: the summary (serving figures, the mix),
bench.csv, bench.json, the plots and the console table. The measuring is serving/bench_measure.py."""
from __future__ import annotations

import csv
import json
import os
import platform
from pathlib import Path

import numpy as np

from fewstep.serving.bench_plan import Plan, read_quality

# bench.csv: perf_analyzer's column names where one exists (its latencies are in usec)
CSV_COLUMNS = [
    "Source", "Steps", "Concurrency", "Batch", "Requests", "Errors", "Retries", "Inferences/Second", "Requests/Second",
    "Avg latency", "p50 latency", "p90 latency", "p95 latency", "p99 latency", "Min latency", "Max latency",
    "Server Queue", "Server Compute Input", "Server Compute Infer", "Server Compute Output",
    "Sampler Queue", "Sampler Compute", "Jump Queue", "Jump Compute", "Jump Executions", "Jump Avg Batch",
    "CPU per Request", "Quality", "Mix", "Jump Calls per Image-Step", "Sampler Avg Jump Batch",
]


def build_report(bench, url: str, seconds: float, load0, load1) -> dict:
    """bench.json's content: the run's settings, the server, the machine, every row and the summary."""
    args, plan, meta = bench.args, bench.plan, bench.meta
    rows = [c.row() for c in bench.cells]
    quality = read_quality(args.quality) if args.quality else None
    if quality:
        for r in rows:
            r["quality"] = quality["values"].get(r["steps"])
    try:
        import onnxruntime
        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    return {
        "model": bench.model, "url": url, "server_version": bench.server_version,
        "meta": {"shape": list(meta.shape), "num_classes": meta.num_classes, "max_steps": meta.max_steps,
                 "max_batch": meta.max_batch, "default_steps": meta.default_steps, "gamma": meta.gamma},
        "jump": {"instances": bench.jump_instances, "kind": bench.jump_kind,
                 "threads": bench.sampler_params.get("threads") or bench.jump_params.get("threads"),
                 "backend": bench.jump_params.get("backend"),
                 "mode": bench.sampler_params.get("jump_mode", "bls")},
        "sampler": {"instances": bench.sampler_params.get("instances"),
                    "workers": bench.sampler_params.get("workers")},
        "metrics_url": bench.metrics_url,
        "settings": {"steps": plan.steps, "mix": plan.mix, "concurrency": plan.concurrency, "batch": plan.batch,
                     "requests": plan.requests, "duration": plan.duration, "warmup": plan.warmup,
                     "seed": args.seed, "gamma": args.gamma, "served_by_bench": bool(args.serve),
                     "baselines_paired_with_concurrency_1": bool(bench.baselines) and 1 in plan.concurrency},
        "baselines": bench.baseline_info,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "onnxruntime": ort_version,
                    "load_avg_start": list(load0), "load_avg_end": list(load1)},
        "seconds": seconds,
        "quality": quality,
        "results": rows,
        "summary": summarize(rows, plan, bench.first_request),
    }


# --- summary, outputs ------------------------------------------------------------------------------

def _find(rows, source, steps, conc=None):
    for r in rows:
        if r["source"] == source and r["steps"] == steps and (conc is None or r["concurrency"] == conc) \
                and not r.get("mix"):
            return r
    return None


def _slope(xs, ys) -> float | None:
    """Theil-Sen slope (the median of the pairwise slopes): one disturbed point on a busy
    host does not tilt it, as it would a least-squares line."""
    pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
    if len(pts) < 2:
        return None
    slopes = [(y2 - y1) / (x2 - x1) for i, (x1, y1) in enumerate(pts) for x2, y2 in pts[i + 1:] if x2 != x1]
    return float(np.median(slopes)) if slopes else None


def _intercept(overhead: dict, per_step: float) -> float | None:
    """The part of an overhead {steps: ms} that does not grow with the steps, given its part
    per step: the median over the step counts of overhead - per_step * steps (with two step
    counts, the intercept of the line through them)."""
    vals = [v - per_step * k for k, v in overhead.items() if v is not None]
    return float(np.median(vals)) if vals else None


def summarize(rows: list[dict], plan: Plan, first_request: dict | None = None) -> dict:
    """The serving figures: Triton against the in-process sampler, per-step overhead, scaling."""
    out: dict = {}
    c_lo, c_hi = min(plan.concurrency), max(plan.concurrency)
    if first_request and first_request.get("ms") is not None:
        same = _find(rows, "triton", first_request["steps"], c_lo) or {}
        out["first_request"] = dict(first_request, p50_ms=same.get("p50_ms"),
                                    vs_p50=first_request["ms"] / same["p50_ms"] if same.get("p50_ms") else None)
    for source in ("onnxruntime", "pytorch"):
        ratios = {}
        for steps in plan.steps:
            tri, base = _find(rows, "triton", steps, c_lo), _find(rows, source, steps)
            if tri and base and tri["p50_ms"] and base["p50_ms"]:
                ratios[steps] = tri["p50_ms"] / base["p50_ms"]
        if ratios:
            out[f"p50_ratio_triton_vs_{source}"] = ratios
    # CPU time per request (client + server processes, with --serve): robust on a busy host
    cpu_ratio = {}
    for steps in plan.steps:
        tri, base = _find(rows, "triton", steps, c_lo), _find(rows, "onnxruntime", steps)
        if tri and base and tri.get("cpu_ms_per_request") and base.get("cpu_ms_per_request"):
            cpu_ratio[steps] = tri["cpu_ms_per_request"] / base["cpu_ms_per_request"]
    if cpu_ratio:
        out["cpu_ratio_triton_vs_onnxruntime"] = cpu_ratio
        ks = sorted(cpu_ratio)
        cpu_over = {k: _find(rows, "triton", k, c_lo)["cpu_ms_per_request"]
                    - _find(rows, "onnxruntime", k)["cpu_ms_per_request"] for k in ks}
        out["cpu_overhead_ms"] = cpu_over
        if len(cpu_ratio) >= 2:
            tri_cpu = _slope(ks, [_find(rows, "triton", k, c_lo)["cpu_ms_per_request"] for k in ks])
            ort_cpu = _slope(ks, [_find(rows, "onnxruntime", k)["cpu_ms_per_request"] for k in ks])
            out["cpu_overhead_ms_per_step"] = tri_cpu - ort_cpu
            out["cpu_overhead_ms_per_request"] = _intercept(cpu_over, out["cpu_overhead_ms_per_step"])
    if len(plan.steps) >= 2:
        tri = [(_find(rows, "triton", s, c_lo) or {}).get("p50_ms") for s in plan.steps]
        out["triton_ms_per_step"] = _slope(plan.steps, tri)
        ort = [(_find(rows, "onnxruntime", s) or {}).get("p50_ms") for s in plan.steps]
        ort_slope = _slope(plan.steps, ort)
        if ort_slope is not None and out["triton_ms_per_step"] is not None:
            out["onnxruntime_ms_per_step"] = ort_slope
            out["serving_overhead_ms_per_step"] = out["triton_ms_per_step"] - ort_slope
            over = {k: t - o for k, t, o in zip(plan.steps, tri, ort) if t is not None and o is not None}
            out["serving_overhead_ms"] = over
            out["serving_overhead_ms_per_request"] = _intercept(over, out["serving_overhead_ms_per_step"])
        sampler = []
        for s in plan.steps:
            r = _find(rows, "triton", s, c_lo) or {}
            srv = r.get("server") or {}
            jump = next((v for k, v in srv.items() if k.endswith("_jump")), None)
            ens = next((v for k, v in srv.items() if not k.endswith(("_jump", "_sampler"))), None)
            if jump and ens and jump.get("request_ms") is not None and ens.get("request_ms") is not None \
                    and r.get("requests"):
                # server-side time of a request beyond its jump executions, per step
                jump_ms = jump["request_ms"] * jump["requests"] / r["requests"]
                sampler.append(ens["request_ms"] - jump_ms)
            else:
                sampler.append(None)
        out["server_time_beyond_jump_ms"] = dict(zip(plan.steps, sampler))
        slope = _slope(plan.steps, sampler)
        if slope is not None:
            out["bls_overhead_ms_per_step"] = slope
    if c_hi > c_lo:
        scale = {}
        for steps in plan.steps:
            lo, hi = _find(rows, "triton", steps, c_lo), _find(rows, "triton", steps, c_hi)
            if lo and hi and lo["images_per_s"] and hi["images_per_s"]:
                scale[steps] = hi["images_per_s"] / lo["images_per_s"]
        out[f"throughput_ratio_c{c_hi}_vs_c{c_lo}"] = scale
    if plan.mix:
        out["mix"] = summarize_mix(rows)
    out["errors"] = int(sum(r["errors"] for r in rows))
    return out


def summarize_mix(rows: list[dict]) -> dict:
    """Per concurrency of the mixed cells: p50 per step count (beside the same step count's
    p50 alone, where measured), images/s, jump calls per image-step, average jump batch."""
    out = {}
    for conc in sorted({r["concurrency"] for r in rows if r.get("mix")}):
        part = [r for r in rows if r.get("mix") and r["concurrency"] == conc]
        jc = part[0].get("jump_calls") or {}
        alone = {r["steps"]: (_find(rows, "triton", r["steps"], conc) or {}).get("p50_ms") for r in part}
        out[conc] = {
            "mix": part[0]["mix"],
            "p50_ms": {r["steps"]: r["p50_ms"] for r in part},
            "p50_ms_alone": {k: v for k, v in alone.items() if v is not None},
            "requests": {r["steps"]: r["requests"] for r in part},
            "images_per_s": sum(r["images_per_s"] or 0.0 for r in part),
            "jump_calls_per_image_step": jc.get("calls_per_image_step"),
            "avg_jump_batch": jc.get("avg_batch"),
            "jump_calls": jc,
        }
    return out


def _round(v, nd):
    return "" if v is None else round(v, nd)


def _us(v):
    return "" if v is None else int(round(v * 1e3))


def csv_rows(report: dict) -> list[dict]:
    out = []
    for r in report["results"]:
        srv = r.get("server") or {}
        ens = srv.get(report["model"]) or {}
        smp = srv.get(report["model"] + "_sampler") or {}
        jmp = srv.get(report["model"] + "_jump") or {}
        out.append({
            "Source": r["source"], "Steps": r["steps"], "Concurrency": r["concurrency"], "Batch": r["batch"],
            "Requests": r["requests"], "Errors": r["errors"], "Retries": r.get("retries", 0),
            "Inferences/Second": "" if r["images_per_s"] is None else round(r["images_per_s"], 3),
            "Requests/Second": "" if r["requests_per_s"] is None else round(r["requests_per_s"], 3),
            "Avg latency": _us(r["avg_ms"]), "p50 latency": _us(r["p50_ms"]), "p90 latency": _us(r["p90_ms"]),
            "p95 latency": _us(r["p95_ms"]), "p99 latency": _us(r["p99_ms"]),
            "Min latency": _us(r["min_ms"]), "Max latency": _us(r["max_ms"]),
            "Server Queue": _us(ens.get("queue_ms")), "Server Compute Input": _us(ens.get("compute_input_ms")),
            "Server Compute Infer": _us(ens.get("compute_infer_ms")),
            "Server Compute Output": _us(ens.get("compute_output_ms")),
            "Sampler Queue": _us(smp.get("queue_ms")), "Sampler Compute": _us(smp.get("compute_ms")),
            "Jump Queue": _us(jmp.get("queue_ms")), "Jump Compute": _us(jmp.get("compute_ms")),
            "Jump Executions": jmp.get("executions", ""),
            "Jump Avg Batch": "" if jmp.get("avg_batch") is None else round(jmp["avg_batch"], 3),
            "CPU per Request": _us(r.get("cpu_ms_per_request")),
            "Quality": "" if r.get("quality") is None else r["quality"],
            "Mix": r.get("mix", ""),
            "Jump Calls per Image-Step": _round((r.get("jump_calls") or {}).get("calls_per_image_step"), 4),
            "Sampler Avg Jump Batch": _round(((r.get("jump_calls") or {}).get("sampler") or {}).get("avg_batch"), 3),
        })
    return out


def write_outputs(report: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    with open(out / "bench.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows(csv_rows(report))
    paths.append(out / "bench.csv")
    (out / "bench.json").write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    paths.append(out / "bench.json")
    paths += plot(report, out)
    return paths


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def plot(report: dict, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    s = report["settings"]
    title = f"{report['model']}, batch {s['batch']}"
    paths = []

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    for conc in s["concurrency"]:
        pts = [(r["steps"], r["p50_ms"], r["p95_ms"]) for r in rows if r["source"] == "triton"
               and r["concurrency"] == conc and r["p50_ms"] is not None and not r.get("mix")]
        if pts:
            x, y, hi = zip(*pts)
            line, = ax.plot(x, y, "o-", label=f"Triton, concurrency {conc}")
            ax.fill_between(x, y, hi, color=line.get_color(), alpha=0.15)
    for source, style in (("onnxruntime", "s--"), ("pytorch", "^:")):
        pts = [(r["steps"], r["p50_ms"]) for r in rows if r["source"] == source and r["p50_ms"] is not None]
        if pts:
            x, y = zip(*pts)
            ax.plot(x, y, style, color="k" if source == "onnxruntime" else "grey",
                    label=f"in-process {'ONNX Runtime' if source == 'onnxruntime' else 'PyTorch eager'}")
    _log2_ticks(ax, s["steps"])
    ax.set_yscale("log")
    paths.append(_save(fig, ax, out / "latency_vs_steps.png", "sampling steps",
                       "latency, ms (p50; band to p95; log scale)", f"Latency against steps: {title}"))

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    for steps in s["steps"]:
        pts = [(r["concurrency"], r["images_per_s"]) for r in rows
               if r["source"] == "triton" and r["steps"] == steps and r["images_per_s"] and not r.get("mix")]
        if pts:
            x, y = zip(*pts)
            ax.plot(x, y, "o-", label=f"{steps} step{'s' if steps > 1 else ''}")
    _log2_ticks(ax, s["concurrency"])
    paths.append(_save(fig, ax, out / "throughput_vs_concurrency.png", "concurrency (requests in flight)",
                       "images / s", f"Throughput through Triton: {title}"))

    q = report.get("quality")
    if q:
        c_lo = min(s["concurrency"])
        pts = [(r["p50_ms"], r["quality"], r["steps"]) for r in rows if r["source"] == "triton"
               and r["concurrency"] == c_lo and r.get("quality") is not None and not r.get("mix")]
        fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
        if pts:
            x, y, st = zip(*pts)
            ax.plot(x, y, "o-")
            for xi, yi, k in pts:
                ax.annotate(f"{k} step{'s' if k > 1 else ''}", (xi, yi), textcoords="offset points",
                            xytext=(5, 5), fontsize=8)
        metric = str(q.get("metric") or q["key"])
        paths.append(_save(fig, ax, out / "quality_vs_latency.png",
                           f"latency through Triton, ms (p50, concurrency {c_lo})",
                           q["key"].upper() + ("" if metric == q["key"] else f" ({metric})") + ", lower is better",
                           f"Quality against latency: {title}", legend=False))
    return paths


def _log2_ticks(ax, values) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(values)
    ax.set_xticklabels([str(v) for v in values])


def _save(fig, ax, path: Path, xlabel: str, ylabel: str, title: str, legend: bool = True) -> Path:
    """Label, grid and legend, then write the figure to `path` and close it."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _f(v, nd=2):
    return "-" if v is None else f"{v:.{nd}f}"


def console_table(report: dict) -> str:
    head = ["source", "steps", "conc", "ok", "err", "retry", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "img/s",
            "jump q ms", "jump c ms", "jump batch", "calls/img-step", "cpu ms/req"]
    if report.get("quality"):
        head.append(report["quality"]["key"])
    lines = []
    for r in report["results"]:
        jmp = (r.get("server") or {}).get(report["model"] + "_jump") or {}
        jc = r.get("jump_calls") or {}
        cells = [r["source"] + (" mix" if r.get("mix") else ""), str(r["steps"]), str(r["concurrency"]),
                 str(r["requests"]), str(r["errors"]), str(r.get("retries", 0)),
                 _f(r["p50_ms"]), _f(r["p90_ms"]), _f(r["p95_ms"]), _f(r["p99_ms"]), _f(r["images_per_s"], 1),
                 _f(jmp.get("queue_ms")), _f(jmp.get("compute_ms")), _f(jc.get("avg_batch")),
                 _f(jc.get("calls_per_image_step"), 3), _f(r.get("cpu_ms_per_request"))]
        if report.get("quality"):
            cells.append(_f(r.get("quality"), 3))
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    text = [fmt.format(*head)] + [fmt.format(*c) for c in lines]
    sm = report["summary"]
    notes = []
    for key, v in sm.items():
        if key.startswith("p50_ratio_triton_vs_"):
            src = key[len("p50_ratio_triton_vs_"):]
            notes.append(f"Triton p50 / in-process {src} p50: "
                         + ", ".join(f"{k} steps {x:.2f}x" for k, x in v.items()))
        elif key.startswith("throughput_ratio_"):
            notes.append(f"images/s, {key[len('throughput_ratio_'):].replace('_', ' ')}: "
                         + ", ".join(f"{k} steps {x:.2f}x" for k, x in v.items()))
    if sm.get("triton_ms_per_step") is not None:
        line = f"per step: Triton {sm['triton_ms_per_step']:.2f} ms"
        if sm.get("onnxruntime_ms_per_step") is not None:
            line += (f", in-process {sm['onnxruntime_ms_per_step']:.2f} ms "
                     f"(serving overhead {sm['serving_overhead_ms_per_step']:+.2f} ms/step)")
        if sm.get("bls_overhead_ms_per_step") is not None:
            line += f"; server time beyond the jump {sm['bls_overhead_ms_per_step']:+.3f} ms/step"
        notes.append(line)
    if sm.get("serving_overhead_ms_per_request") is not None:
        line = (f"serving overhead (Triton - in-process): p50 {sm['serving_overhead_ms_per_request']:+.2f} ms "
                f"per request {sm['serving_overhead_ms_per_step']:+.2f} ms per step")
        if sm.get("cpu_overhead_ms_per_request") is not None:
            line += (f"; CPU {sm['cpu_overhead_ms_per_request']:+.2f} ms per request "
                     f"{sm['cpu_overhead_ms_per_step']:+.2f} ms per step")
        notes.append(line)
    if sm.get("first_request"):
        fr = sm["first_request"]
        notes.append(f"first request after start ({fr['steps']} steps): {_f(fr['ms'])} ms, "
                     f"{_f(fr.get('vs_p50'))}x the p50 of its cell")
    if sm.get("cpu_ratio_triton_vs_onnxruntime"):
        line = ("CPU per request, Triton / in-process: "
                + ", ".join(f"{k} steps {x:.2f}x" for k, x in sm["cpu_ratio_triton_vs_onnxruntime"].items()))
        if sm.get("cpu_overhead_ms_per_step") is not None:
            line += f"; CPU overhead per step {sm['cpu_overhead_ms_per_step']:+.3f} ms"
        notes.append(line)
    for conc, mx in (sm.get("mix") or {}).items():
        per = ", ".join(f"{k} steps {_f(v)}" + (f" (alone {_f(mx['p50_ms_alone'][k])})" if k in mx["p50_ms_alone"] else "")
                        for k, v in mx["p50_ms"].items())
        notes.append(f"mix {mx['mix']} at concurrency {conc}: p50 ms {per}; {_f(mx['images_per_s'], 1)} images/s; "
                     f"jump calls per image-step {_f(mx['jump_calls_per_image_step'], 3)}, "
                     f"average jump batch {_f(mx['avg_jump_batch'])}")
    m = report["machine"]
    notes.append(f"load average {m['load_avg_start'][0]:.2f} -> {m['load_avg_end'][0]:.2f} on {m['cpus']} CPUs")
    retries = sum(r.get("retries", 0) for r in report["results"])
    if retries:
        notes.append(f"RETRIES: {retries} retries after transient errors (UNAVAILABLE, a missed deadline; "
                     f"the Retries column); the latencies of those requests include them")
    if sm.get("errors"):
        notes.append(f"ERRORS: {sm['errors']} requests failed (see bench.json error_codes / error_messages)")
    return "\n".join(text + [""] + notes)


def shipped_table(reports: dict) -> str:
    """The serving figures of several models side by side ({name: bench.json's content}):
    `fewstep bench --serve` without --export, on the shipped models."""
    head = ["model", "jump ms", "p50 ratio", "overhead ms/request", "overhead ms/step", "CPU ratio",
            "CPU ms/request", "CPU ms/step", "c_hi/c_lo", "first/p50"]
    lines = []
    for name, rep in reports.items():
        sm, k = rep["summary"], min(rep["settings"]["steps"] or [1])
        scale = next((v for key, v in sm.items() if key.startswith("throughput_ratio_")), {})
        lines.append([name, _f(sm.get("onnxruntime_ms_per_step")),
                      _f((sm.get("p50_ratio_triton_vs_onnxruntime") or {}).get(k)),
                      _f(sm.get("serving_overhead_ms_per_request")), _f(sm.get("serving_overhead_ms_per_step")),
                      _f((sm.get("cpu_ratio_triton_vs_onnxruntime") or {}).get(k)),
                      _f(sm.get("cpu_overhead_ms_per_request")), _f(sm.get("cpu_overhead_ms_per_step")),
                      _f(scale.get(k)), _f((sm.get("first_request") or {}).get("vs_p50"))])
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    k = min(next(iter(reports.values()))["settings"]["steps"] or [1]) if reports else 1
    return "\n".join([f"shipped models, Triton against the in-process sampler (ratios and first/p50 at {k} "
                      f"step{'s' if k > 1 else ''}; jump ms = in-process ms per step):", fmt.format(*head)]
                     + [fmt.format(*c) for c in lines])
