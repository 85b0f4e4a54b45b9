"""`fewstep bench` end to end against a real tritonserver (the `triton_stack` fixture), and its errors."""
from __future__ import annotations

import asyncio
import csv
import json

import numpy as np
import pytest

from fewstep.cli import main
from fewstep.serving import bench
from conftest import running_server

STEPS = (1, 2)
CONC = (1, 2)
REQUESTS = 6


def _run(argv, capsys):
    rc = main(["bench", "--no-progress", *argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture(scope="module")
def bench_run(triton_stack, tmp_path_factory):
    """One benchmark run on the tiny model: both baselines, a quality report, two step counts."""
    out = tmp_path_factory.mktemp("bench")
    quality = out / "eval.json"
    quality.write_text(json.dumps({"metric": "fid-classifier",
                                   "results": [{"steps": 1, "fid": 80.5}, {"steps": 2, "fid": 41.25},
                                               {"steps": 4, "fid": 20.0}]}))
    argv = ["bench", "--no-progress", "--url", triton_stack.url, "--model", "tiny",
            "--steps", ",".join(map(str, STEPS)), "--concurrency", ",".join(map(str, CONC)),
            "--requests", str(REQUESTS), "--warmup", "2", "--batch", "2",
            "--export", str(triton_stack.dirs["tiny"]), "--ckpt", str(triton_stack.dirs["ckpt"] / "run-tiny"),
            "--threads", "1", "--quality", str(quality), "--out", str(out / "res"),
            "--metrics-url", triton_stack.server.metrics_url]
    assert main(argv) == 0
    return out / "res"


def test_writes_every_output(bench_run):
    for name in ("bench.csv", "bench.json", "latency_vs_steps.png", "throughput_vs_concurrency.png",
                 "quality_vs_latency.png"):
        p = bench_run / name
        assert p.is_file() and p.stat().st_size > 0, name
    assert (bench_run / "latency_vs_steps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_numbers_are_consistent(bench_run):
    report = json.loads((bench_run / "bench.json").read_text())
    rows = report["results"]
    # one Triton row per (steps, concurrency), one row per baseline per step count
    assert sorted((r["steps"], r["concurrency"]) for r in rows if r["source"] == "triton") == \
        sorted((s, c) for s in STEPS for c in CONC)
    for source in ("onnxruntime", "pytorch"):
        assert sorted(r["steps"] for r in rows if r["source"] == source) == list(STEPS)
    for r in rows:
        assert r["errors"] == 0 and r["requests"] == REQUESTS, r
        assert r["images"] == REQUESTS * 2
        assert r["min_ms"] <= r["p50_ms"] <= r["p90_ms"] <= r["p95_ms"] <= r["p99_ms"] <= r["max_ms"]
        assert r["min_ms"] > 0
        assert r["images_per_s"] == pytest.approx(r["images"] / r["wall_s"])
        assert r["wall_s"] * 1e3 >= r["max_ms"]
        if r["concurrency"] == 1:
            # one request at a time: the wall time is at least the sum of the latencies
            assert r["wall_s"] * 1e3 >= r["avg_ms"] * r["requests"] - 1e-6
        assert r["quality"] == {1: 80.5, 2: 41.25}[r["steps"]]
    for r in (r for r in rows if r["source"] == "triton"):
        srv = r["server"]
        # Triton counted exactly the measured requests (warm-up excluded) ...
        assert srv["tiny"]["requests"] == REQUESTS and srv["tiny"]["failed"] == 0
        assert srv["tiny_sampler"]["inferences"] == REQUESTS * 2
        # ... and the samplers' schedulers advanced every image once per step (the jump runs
        # inside the sampler: the jump model sees no traffic), two images per call at least
        jc = r["jump_calls"]["sampler"]
        assert jc["image_steps"] == REQUESTS * 2 * r["steps"] and srv["tiny_jump"]["inferences"] == 0
        assert 1 <= jc["calls"] <= REQUESTS * r["steps"] and jc["avg_batch"] >= 2
        assert r["jump_calls"]["calls_per_image_step"] == pytest.approx(jc["calls"] / jc["image_steps"])
        # the server's time is what a client waited, at most (plus the lag from the sampler's
        # answer to Triton releasing the request, which it counts)
        assert srv["tiny"]["request_ms"] <= r["max_ms"] + 5
    sm = report["summary"]
    assert {int(k) for k in sm["p50_ratio_triton_vs_onnxruntime"]} == set(STEPS)
    assert sm["errors"] == 0
    assert np.isfinite(sm["triton_ms_per_step"]) and "bls_overhead_ms_per_step" not in sm  # no BLS: inline
    assert {int(k) for k in sm["throughput_ratio_c2_vs_c1"]} == set(STEPS)
    assert report["jump"]["threads"] == "1" and report["machine"]["cpus"] >= 1


def test_csv_matches_json(bench_run):
    report = json.loads((bench_run / "bench.json").read_text())
    with open(bench_run / "bench.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == bench.CSV_COLUMNS
    assert len(rows) == len(report["results"])
    for c, j in zip(rows, report["results"]):
        assert (c["Source"], int(c["Steps"]), int(c["Concurrency"])) == (j["source"], j["steps"], j["concurrency"])
        assert int(c["Requests"]) == j["requests"] and int(c["Errors"]) == 0
        # perf_analyzer's units: latencies in microseconds
        assert int(c["p50 latency"]) == round(j["p50_ms"] * 1e3)
        assert int(c["p50 latency"]) <= int(c["p90 latency"]) <= int(c["p95 latency"]) <= int(c["p99 latency"])
        assert float(c["Inferences/Second"]) == pytest.approx(j["images_per_s"], rel=1e-3, abs=1e-3)
        if j["source"] == "triton":
            assert int(c["Jump Executions"]) == j["server"]["tiny_jump"]["executions"]


def test_console_table(triton_stack, tmp_path, capsys):
    rc, out, err = _run(["--url", triton_stack.url, "--model", "tiny", "--steps", "1", "--concurrency", "1",
                         "--requests", "3", "--warmup", "0", "--out", str(tmp_path)], capsys)
    assert rc == 0, err
    head, row = out.splitlines()[:2]
    assert head.split()[:5] == ["source", "steps", "conc", "ok", "err"]
    assert row.split()[:5] == ["triton", "1", "1", "3", "0"]
    assert "bench.csv" in err


def test_class_conditional_2d_model(triton_stack, tmp_path, capsys):
    rc, out, err = _run(["--url", triton_stack.url, "--model", "toyc", "--steps", "2", "--concurrency", "2",
                         "--requests", "4", "--warmup", "1", "--export", str(triton_stack.dirs["toyc"]),
                         "--out", str(tmp_path)], capsys)
    assert rc == 0, err
    rows = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert [(r["source"], r["requests"], r["errors"]) for r in rows] == [("onnxruntime", 4, 0), ("triton", 4, 0)]


@pytest.mark.parametrize("argv, message", [
    (["--model", "tiny", "--steps", "1,65"], "--steps: 65 is above the model's max_steps (64)"),
    (["--model", "nosuch"], "--model nosuch: model: unknown model 'nosuch' (this server has: tiny, toyc)"),
    (["--model", "tiny", "--batch", "17"], "--batch: 17 is above the model's max batch (16)"),
    (["--model", "tiny", "--export", "{toyc}"], "is not the served model"),
])
def test_bad_arguments_against_the_server(triton_stack, tmp_path, capsys, argv, message):
    argv = [a.replace("{toyc}", str(triton_stack.dirs["toyc"])) for a in argv]
    rc, out, err = _run(["--url", triton_stack.url, "--requests", "1", "--out", str(tmp_path / "o"), *argv], capsys)
    assert rc == 2
    assert message in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow  # the client's retries run out its deadline (about 2 minutes here)
def test_unreachable_server(tmp_path, capsys):
    pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[grpc] (the serve extra)")
    from fewstep.serving.launcher import free_port

    url = f"127.0.0.1:{free_port()}"
    rc, out, err = _run(["--url", url, "--model", "tiny", "--out", str(tmp_path / "o")], capsys)
    assert rc == 2
    assert f"cannot reach a Triton server at {url}" in err


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0,1"], "--steps: values must be >= 1, got 0"),
    (["--steps", "1,x"], "--steps: expected comma-separated integers"),
    (["--concurrency", ""], "--concurrency: expected at least one value"),
    (["--requests", "0"], "--requests must be >= 1"),
    (["--duration", "-1"], "--duration must be > 0"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--serve"], "--serve without --export benchmarks the shipped models: --model and --ckpt need --export DIR"),
    (["--quality", "/nonexistent/eval.json"], "--quality /nonexistent/eval.json: cannot read it"),
    (["--export", "/nonexistent"], "--export /nonexistent: not a directory"),
])
def test_bad_arguments(tmp_path, capsys, argv, message):
    rc, out, err = _run(["--url", "127.0.0.1:1", "--model", "tiny", *argv], capsys)
    assert rc == 2
    assert message in err


def test_quality_report_is_checked(tmp_path):
    p = tmp_path / "eval.json"
    p.write_text(json.dumps({"results": [{"steps": 1, "seconds": 2.0}]}))
    with pytest.raises(bench.UserError, match="every result needs 'steps' and 'fid'"):
        bench.read_quality(p)
    p.write_text(json.dumps({"metric": "swd", "results": [{"steps": 2, "swd": 0.5}]}))
    assert bench.read_quality(p)["values"] == {2: 0.5}


def test_stats_delta_and_summary():
    before = {"m": {"inference_count": 2, "execution_count": 2, "success_count": 2, "success_ns": 4_000_000,
                    "fail_count": 0, "fail_ns": 0, "queue_count": 2, "queue_ns": 0, "compute_input_count": 2,
                    "compute_input_ns": 0, "compute_infer_count": 2, "compute_infer_ns": 2_000_000,
                    "compute_output_count": 2, "compute_output_ns": 0}}
    after = {"m": dict(before["m"], inference_count=10, execution_count=4, success_count=6,
                       success_ns=12_000_000, queue_ns=400_000, compute_infer_ns=6_000_000)}
    d = bench.stats_delta(before, after, ["m", "absent"])["m"]
    assert d["requests"] == 4 and d["inferences"] == 8 and d["executions"] == 2 and d["avg_batch"] == 4
    assert d["request_ms"] == pytest.approx(2.0) and d["queue_ms"] == pytest.approx(0.1)
    assert d["compute_ms"] == pytest.approx(1.0)
    js = {"model_stats": [{"name": "m", "inference_count": "3", "execution_count": "1",
                           "inference_stats": {"success": {"count": "1", "ns": "5"}}}]}
    assert bench.parse_stats(js)["m"]["success_ns"] == 5 and bench.parse_stats(js)["m"]["queue_ns"] == 0


# --- the serving speed options the benchmark measures --------------------------------------------

@pytest.fixture(scope="module")
def bls_server(triton_stack, tmp_path_factory):
    """The tiny model served with `--jump bls` (each step a BLS request to tiny_jump); the
    session server runs the default, the jump inside the sampler (inline)."""
    from fewstep.serving.repository import Options, write_repository

    repo = tmp_path_factory.mktemp("bls") / "repo"
    written = write_repository(repo, [str(triton_stack.dirs["tiny"])], Options(device="cpu", threads=1, jump="bls"))
    cfg = (repo / "tiny_sampler" / "config.pbtxt").read_text()
    assert '"jump_mode" value { string_value: "bls" }' in cfg
    assert '"jump_mode" value { string_value: "inline" }' in (triton_stack.repo / "tiny_sampler" / "config.pbtxt").read_text()
    with running_server(repo, written) as server:
        yield server


def test_both_jump_modes_give_the_same_images(triton_stack, bls_server):
    from fewstep.serving.client import Client

    with Client(bls_server.grpc_url) as bls, Client(triton_stack.url) as inline:
        for steps in (1, 3):
            seeds = list(range(10, 14))
            a = bls.infer("tiny", seeds, steps, outputs=("image", "sample"))
            b = inline.infer("tiny", seeds, steps, outputs=("image", "sample"))
            np.testing.assert_allclose(a["sample"], b["sample"], atol=1e-5)
            assert (a["image"] == b["image"]).mean() > 0.999
        previews = [step for step, _ in bls.stream("tiny", seed=3, steps=3)]
        assert previews == [1, 2, 3]
        alone = {(seed, steps): inline.generate("tiny", [seed], steps)[0] for seed in range(8) for steps in (1, 2)}

    async def together():
        from fewstep.serving.client import AsyncClient

        async with AsyncClient(bls_server.grpc_url) as c:
            keys = [(seed, steps) for seed in range(8) for steps in (1, 2)]
            outs = await asyncio.gather(*(c.generate("tiny", [seed], steps) for seed, steps in keys))
            return dict(zip(keys, (o[0] for o in outs)))

    # 16 requests at once: 1- and 2-step samples share jump calls, the images do not change
    for key, img in asyncio.run(together()).items():
        assert np.abs(img.astype(int) - alone[key].astype(int)).max() <= 1, key


def test_bench_against_bls_server(bls_server, tmp_path, capsys):
    rc, out, err = _run(["--url", bls_server.grpc_url, "--metrics-url", bls_server.metrics_url, "--model", "tiny",
                         "--steps", "1,3", "--concurrency", "1,3", "--requests", "4", "--warmup", "1",
                         "--out", str(tmp_path)], capsys)
    assert rc == 0, err
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["jump"]["mode"] == "bls"
    for r in report["results"]:
        assert r["requests"] == 4 and r["errors"] == 0
        # every sampler tick is one BLS request to the jump model
        assert r["server"]["tiny"]["requests"] == 4
        jc = r["jump_calls"]
        assert jc["sampler"]["calls"] == r["server"]["tiny_jump"]["requests"] > 0
        assert jc["jump_model"]["image_steps"] == jc["sampler"]["image_steps"] >= 4 * r["steps"]


def test_bench_serve_starts_its_own_server(triton_stack, tmp_path, capsys):
    rc, out, err = _run(["--serve", "--export", str(triton_stack.dirs["tiny"]), "--jump", "inline", "--steps", "2",
                         "--concurrency", "2", "--requests", "3", "--warmup", "0", "--threads", "1",
                         "--out", str(tmp_path)], capsys)
    assert rc == 0, err
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["model"] == "tiny" and report["settings"]["served_by_bench"] is True
    assert report["jump"]["mode"] == "inline" and report["jump"]["threads"] == "1"
    [tri] = [r for r in report["results"] if r["source"] == "triton"]
    assert tri["requests"] == 3 and tri["errors"] == 0
    # with its own server, the CPU time of the server's processes is counted
    assert tri["cpu_ms_per_request"] > 0
    # the first request of the fresh server is timed on its own (its models warmed before ready)
    fr = report["summary"]["first_request"]
    assert fr["steps"] == 2 and fr["ms"] > 0 and fr["vs_p50"] == pytest.approx(fr["ms"] / tri["p50_ms"])


def test_slope_ignores_one_disturbed_point():
    assert bench._slope([1, 2, 4, 8], [3.0, 5.0, 9.0, 17.0]) == pytest.approx(2.0)
    # the 16-step point hit a busy moment: a least-squares line would tilt up
    assert bench._slope([1, 2, 4, 8, 16], [3.0, 5.0, 9.0, 17.0, 80.0]) == pytest.approx(2.0)
    assert bench._slope([1], [3.0]) is None


def test_mix_end_to_end(triton_stack, tmp_path, capsys):
    """--mix on the tiny model: per step count latency, jump calls per image-step from the
    sampler's counters, the 1-step p50 under the mix beside the 1-step p50 alone."""
    rc, out, err = _run(["--url", triton_stack.url, "--metrics-url", triton_stack.server.metrics_url, "--model", "tiny",
                         "--steps", "1", "--mix", "1:1,8:1", "--concurrency", "1,4", "--requests", "12",
                         "--warmup", "2", "--out", str(tmp_path)], capsys)
    assert rc == 0, err
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["settings"]["mix"] == [[1, 0.5], [8, 0.5]]
    rows = report["results"]
    plain = [r for r in rows if not r.get("mix")]
    assert sorted((r["steps"], r["concurrency"]) for r in plain) == [(1, 1), (1, 4)]
    for conc in (1, 4):
        mixed = [r for r in rows if r.get("mix") == "1:0.5,8:0.5" and r["concurrency"] == conc]
        assert sorted(r["steps"] for r in mixed) == [1, 8]
        assert sum(r["requests"] for r in mixed) == 12 and all(r["errors"] == 0 for r in mixed)
        assert all(r["requests"] > 0 for r in mixed)  # both step counts drawn (seeded)
        jc = mixed[0]["jump_calls"]
        # the sampler advanced exactly the image-steps the cell asked for, in fewer (or as many) calls
        assert jc["from"] == "sampler"
        assert jc["sampler"]["image_steps"] == sum(r["requests"] * r["steps"] for r in mixed)
        assert 0 < jc["calls_per_image_step"] <= 1 and jc["avg_batch"] == pytest.approx(1 / jc["calls_per_image_step"])
        sm = report["summary"]["mix"][str(conc)]
        assert set(sm["p50_ms"]) == {"1", "8"} and "1" in sm["p50_ms_alone"]
        assert sm["p50_ms"]["8"] > sm["p50_ms"]["1"]
    # the plain cells report the counters too
    assert all(r["jump_calls"]["sampler"]["image_steps"] == 12 for r in plain)
    assert "mix 1:0.5,8:0.5 at concurrency 4" in out and "triton mix" in out
    with open(tmp_path / "bench.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert sorted(r["Mix"] for r in csv_rows) == ["", ""] + ["1:0.5,8:0.5"] * 4


@pytest.mark.parametrize("mix, message", [
    ("1:0.5,8", "--mix: expected STEPS:WEIGHT"), ("0:1", "steps >= 1"), ("1:0", "weight > 0"),
    ("1:1,1:2", "once"), ("2:x", "--mix: expected"),
])
def test_bad_mix(tmp_path, capsys, mix, message):
    rc, out, err = _run(["--url", "127.0.0.1:1", "--model", "m", "--mix", mix, "--out", str(tmp_path)], capsys)
    assert rc == 2 and message in err, err


def test_jump_calls_from_counters_and_statistics():
    server = {"m_jump": {"executions": 5, "inferences": 20}}
    jc = bench.jump_calls({"calls": 10, "image_steps": 30}, {"calls": 14, "image_steps": 50}, server, "m")
    assert jc["sampler"] == {"calls": 4, "image_steps": 20, "calls_per_image_step": 0.2, "avg_batch": 5.0}
    assert jc["jump_model"]["avg_batch"] == 4.0 and jc["from"] == "sampler" and jc["calls_per_image_step"] == 0.2
    old = bench.jump_calls(None, None, server, "m")  # a server without the counters (grouping sampler)
    assert old["from"] == "jump_model" and old["calls_per_image_step"] == 0.25
    text = ('fewstep_sampler_jump_calls{instance="m_sampler_0_0",model="m_sampler"} 3\n'
            'fewstep_sampler_jump_calls{instance="m_sampler_0_1",model="m_sampler"} 4\n'
            'fewstep_sampler_image_steps{instance="m_sampler_0_0",model="m_sampler"} 9\n'
            'fewstep_sampler_image_steps{instance="m_sampler_0_1",model="m_sampler"} 1\n'
            'fewstep_sampler_jump_calls{instance="x_sampler_0_0",model="x_sampler"} 100\n')
    assert bench.parse_jump_counters(text, "m") == {"calls": 7, "image_steps": 10}
    assert bench.parse_jump_counters(text, "y") is None


def test_summary_splits_the_overhead_per_request_and_per_step():
    """The arithmetic of the serving overhead: Triton - in-process at each step count; its part
    per step is the difference of the two slopes, its part per request what is left (the
    intercept), for the p50 latency and for the CPU per request."""
    from fewstep.serving.bench_plan import Plan

    tri = {1: (5.0, 6.0), 2: (8.5, 9.6), 4: (15.5, 16.8)}    # p50 ms, CPU ms: 1.5 + 3.5 k, 2.4 + 3.6 k
    ort = {1: (3.2, 4.0), 2: (6.4, 7.2), 4: (12.8, 13.6)}    # 3.2 k, 0.8 + 3.2 k
    rows = [{"source": src, "steps": k, "concurrency": 1, "requests": 10, "errors": 0, "p50_ms": p50,
             "p90_ms": p50, "p95_ms": p50, "p99_ms": p50, "cpu_ms_per_request": cpu, "images_per_s": 1000 / p50}
            for src, table in (("triton", tri), ("onnxruntime", ort)) for k, (p50, cpu) in table.items()]
    sm = bench.summarize(rows, Plan([1, 2, 4], [1], 1, 10, None, 0))
    assert sm["p50_ratio_triton_vs_onnxruntime"][1] == pytest.approx(5.0 / 3.2)
    assert sm["serving_overhead_ms"] == pytest.approx({1: 1.8, 2: 2.1, 4: 2.7})
    assert sm["serving_overhead_ms_per_step"] == pytest.approx(0.3)
    assert sm["serving_overhead_ms_per_request"] == pytest.approx(1.5)
    assert sm["cpu_ratio_triton_vs_onnxruntime"][1] == pytest.approx(1.5)
    assert sm["cpu_overhead_ms"] == pytest.approx({1: 2.0, 2: 2.4, 4: 3.2})
    assert sm["cpu_overhead_ms_per_step"] == pytest.approx(0.4)
    assert sm["cpu_overhead_ms_per_request"] == pytest.approx(1.6)
    report = {"results": rows, "summary": sm, "model": "m", "settings": {"steps": [1, 2, 4]},
              "machine": {"load_avg_start": [1.0], "load_avg_end": [1.0], "cpus": 2}}
    text = bench.console_table(report)
    assert "serving overhead (Triton - in-process): p50 +1.50 ms per request +0.30 ms per step; " \
           "CPU +1.60 ms per request +0.40 ms per step" in text
    side = bench.shipped_table({"big": report, "small": report}).splitlines()
    assert side[1].split()[:4] == ["model", "jump", "ms", "p50"]
    assert side[2].split() == ["big", "3.20", "1.56", "1.50", "0.30", "1.50", "1.60", "0.40", "-", "-"]


def test_bench_serve_without_export_runs_every_shipped_model(triton_stack, tmp_path, capsys, monkeypatch):
    """`bench --serve` with no --export: each shipped model on its own server, one after the
    other (here two stand-ins for cd_fmnist and cud_fmnist: the tiny export under two names,
    one with an eval report), outputs per model and the figures side by side."""
    import fewstep.export.shipped as shipped

    srcs = []
    for name in ("big", "small"):
        src = tmp_path / "shipped" / name
        src.mkdir(parents=True)
        srcs.append(src)
    (srcs[1] / "eval.json").write_text(json.dumps({"metric": "fid-classifier", "results": [{"steps": 1, "fid": 99.5}]}))
    monkeypatch.setattr(shipped, "shipped_models", lambda root=None: srcs)
    monkeypatch.setattr(shipped, "prepare_all", lambda root=None, cache_dir=None, log=print:
                        [triton_stack.dirs["tiny"]] * 2)
    out = tmp_path / "res"
    rc, text, err = _run(["--serve", "--steps", "1,2", "--concurrency", "1", "--requests", "3", "--warmup", "0",
                          "--threads", "1", "--out", str(out)], capsys)
    assert rc == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["big", "small"]
    for name in ("big", "small"):
        report = json.loads((out / name / "bench.json").read_text())
        assert report["settings"]["served_by_bench"] and report["summary"]["errors"] == 0
        assert summary[name]["summary"] == report["summary"]
        assert report["summary"]["serving_overhead_ms_per_request"] is not None
    assert json.loads((out / "small" / "bench.json").read_text())["quality"]["values"] == {"1": 99.5}
    table = text[text.index("shipped models"):].splitlines()
    assert [line.split()[0] for line in table[2:]] == ["big", "small"]
