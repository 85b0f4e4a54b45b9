"""Serving behind the real tritonserver: repository, launcher, sampler, stream, client, CLI.

The server tests share one session server (tests/conftest.py: `triton_stack`) with two
tiny exported models: `tiny` (1x28x28 images, unconditional) and `toyc` (2-D, 4 classes).
"""
from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from fewstep.serving.protocol import InvalidInput, ModelInfo, parse_request, run_group
from fewstep import sampling

pytest.importorskip("tritonclient.grpc", reason="serving tests need tritonclient[grpc] (the serve extra)")

from tritonclient.utils import InferenceServerException  # noqa: E402

from fewstep.serving.client import AsyncClient, Client, ServingError  # noqa: E402
from conftest import raw_infer, start_serve, stop_serve  # noqa: E402

FEWSTEP = [sys.executable, "-m", "fewstep.cli"]


def _manifest(model_dir) -> dict:
    return json.loads((Path(model_dir) / "manifest.json").read_text())


def _runner(model_dir):
    from fewstep.export.runner import load_runner
    return load_runner(model_dir, threads=1)


# --- without a server ----------------------------------------------------------------------------

def test_repository_configs_are_valid_triton_configs(served_model_dirs, tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from fewstep.serving.repository import Options, write_repository

    written = write_repository(tmp_path, [str(served_model_dirs["tiny"]), f"other={served_model_dirs['toyc']}"],
                               Options(instances=3, device="cpu", jump="bls"))
    assert [w["name"] for w in written] == ["tiny", "other"]
    cfgs = {}
    for d in sorted(tmp_path.iterdir()):
        cfgs[d.name] = text_format.Parse((d / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert cfgs[d.name].name == d.name
    assert set(cfgs) == {"tiny", "tiny_jump", "tiny_sampler", "tiny_stream",
                         "other", "other_jump", "other_sampler", "other_stream"}
    jump = cfgs["tiny_jump"]
    assert jump.backend == "python" and jump.max_batch_size == 16
    assert jump.dynamic_batching.max_queue_delay_microseconds == 0
    assert jump.instance_group[0].count == 3 and jump.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    # the jump runs once before Triton marks it ready (t and s from its warmup/ files)
    [warm] = jump.model_warmup
    assert warm.batch_size == 1 and warm.inputs["t"].input_data_file == "t_max"
    assert np.frombuffer((tmp_path / "tiny_jump" / "warmup" / "t_max").read_bytes(), np.float32).tolist() == [1.0]
    assert cfgs["tiny_sampler"].instance_group[0].count == 3
    assert cfgs["tiny_sampler"].parameters["jump_mode"].string_value == "bls"
    assert (tmp_path / "tiny_jump" / "1" / "model.py").is_file()
    assert (tmp_path / "tiny_jump" / "1" / "model" / "jump.onnx").is_file()
    ens = cfgs["tiny"]
    assert ens.platform == "ensemble" and ens.max_batch_size == 16
    inputs = {i.name: i for i in ens.input}
    assert [inputs[n].data_type for n in ("seed", "steps", "class_label", "gamma")] == [
        model_config_pb2.TYPE_INT64, model_config_pb2.TYPE_INT64, model_config_pb2.TYPE_INT64, model_config_pb2.TYPE_FP32]
    assert not inputs["seed"].optional and inputs["steps"].optional  # steps: the manifest's default_steps when left out
    assert inputs["class_label"].optional and inputs["gamma"].optional
    outs = {o.name: list(o.dims) for o in ens.output}
    assert outs["image"] == [28, 28, 1] and outs["png"] == [1] and outs["sample"] == [1, 28, 28]
    assert ens.ensemble_scheduling.step[0].model_name == "tiny_sampler"
    assert cfgs["tiny_stream"].model_transaction_policy.decoupled
    assert "image" not in {o.name for o in cfgs["other"].output}  # 2-D: float samples only
    assert cfgs["other"].parameters["num_classes"].string_value == "4"


def test_serve_dry_run_cli(served_model_dirs, tmp_path):
    repo = tmp_path / "repo"
    out = subprocess.run(FEWSTEP + ["serve", "--model", str(served_model_dirs["toyc"]), "--repo", str(repo),
                                    "--dry-run"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in repo.iterdir()) == ["toyc", "toyc_jump", "toyc_sampler", "toyc_stream"]
    bad = subprocess.run(FEWSTEP + ["serve", "--model", str(tmp_path / "missing"), "--dry-run"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert bad.returncode == 2 and "not a directory" in bad.stderr


def test_parse_request_rejects_each_bad_input():
    info = ModelInfo("m", (1, 4, 4), 3, sampling.flow_spec(max_steps=8), max_batch=4)
    ok = {"seed": np.array([[1], [2]], np.int64), "steps": np.array([[2], [3]], np.int64),
          "class_label": np.array([[0], [2]], np.int64)}
    items = parse_request(info, ok)
    assert [(i.seed, i.steps, i.label) for i in items] == [(1, 2, 0), (2, 3, 2)]
    cases = [
        (dict(steps=np.array([[0], [1]], np.int64)), "steps", "[1, 8]"),
        (dict(steps=np.array([[9], [1]], np.int64)), "steps", "[1, 8]"),
        (dict(steps=np.array([[2], [-3]], np.int64)), "steps", "[1, 8]"),
        (dict(steps=np.array([[2], [3]], np.int32)), "steps", "int64"),
        (dict(seed=np.array([[1], [-2]], np.int64)), "seed", "[0,"),
        (dict(seed=np.array([1, 2, 3], np.int64).reshape(1, 3)), "seed", "shape"),
        (dict(seed=np.arange(5, dtype=np.int64).reshape(5, 1), steps=np.ones((5, 1), np.int64),
              class_label=np.zeros((5, 1), np.int64)), "seed", "maximum batch is 4"),
        (dict(class_label=np.array([[0], [3]], np.int64)), "class_label", "[0, 2]"),
        (dict(class_label=None), "class_label", "[0, 2]"),
        (dict(gamma=np.array([[0.5], [np.nan]], np.float32)), "gamma", "[0, 1]"),
        (dict(gamma=np.array([[1.5], [0]], np.float32)), "gamma", "[0, 1]"),
        (dict(seed=None), "seed", "missing"),
    ]
    for change, field, allowed in cases:
        with pytest.raises(InvalidInput) as e:
            parse_request(info, {**ok, **change})
        assert str(e.value).startswith(field + ":") and allowed in str(e.value), str(e.value)
    # steps is optional: the server applies the manifest's default_steps
    assert [i.steps for i in parse_request(info, {**ok, "steps": None})] == [info.default_steps] * 2 == [4, 4]
    uncond = ModelInfo("u", (2,), 0, sampling.flow_spec(), max_batch=4)
    with pytest.raises(InvalidInput, match="class_label: model 'u' is unconditional"):
        parse_request(uncond, {"seed": np.array([[0]], np.int64), "steps": np.array([[1]], np.int64),
                               "class_label": np.array([[0]], np.int64)})


def test_one_step_fast_path_equals_the_loop(served_model_dirs):
    runner = _runner(served_model_dirs["tiny"])
    info = ModelInfo.from_manifest(runner.manifest)
    items = parse_request(info, {"seed": np.array([[3], [4]], np.int64), "steps": np.array([[1], [1]], np.int64)})
    fast = run_group(lambda x, t, s, labels: runner(x, t, s, labels), info, items)
    loop = sampling.sample(lambda x, t, s: runner(x, t, s), info.spec, 1, [3, 4], info.shape)
    np.testing.assert_array_equal(fast, loop)


def test_launcher_reports_a_server_that_fails_to_start(tmp_path):
    from fewstep.errors import UserError
    from fewstep.serving.launcher import Server, find_triton, process_group_members

    try:
        find_triton()
    except UserError as e:
        pytest.skip(f"no tritonserver: {e}")
    (tmp_path / "repo" / "broken" / "1").mkdir(parents=True)
    (tmp_path / "repo" / "broken" / "config.pbtxt").write_text('name: "broken"\nbackend: "python"\nmax_batch_size: oops\n')
    server = Server(tmp_path / "repo", grpc_port=0, http_port=0, metrics_port=0, models=["broken"],
                    log_file=tmp_path / "log.txt")
    with pytest.raises(UserError, match="exited with code"):
        server.start(timeout=60)
    assert server.proc is None
    assert "broken" in (tmp_path / "log.txt").read_text()


# --- through the server ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(triton_stack):
    with Client(triton_stack.url, timeout=60) as c:
        yield c


def test_ready(triton_stack, client):
    assert client.ready()
    for name in triton_stack.models:
        assert client.ready(name), name
    assert client.models() == ["tiny", "toyc"]
    meta = client.meta("tiny")
    assert meta.shape == (1, 28, 28) and meta.num_classes == 0 and meta.max_batch == 16
    assert client.meta("toyc").num_classes == 4
    assert len(triton_stack.server.pids()) >= 7  # the server and its 6 Python stubs


def _torch_samples(ckpt_run, steps, seeds, labels=None, gamma=None) -> np.ndarray:
    import torch

    from fewstep.training.build import load_model

    model = load_model(ckpt_run)
    lab = None if labels is None else torch.tensor(labels)
    return model.sample(steps, seeds, labels=lab, gamma=gamma).numpy()


@pytest.mark.parametrize("steps,gamma", [(1, None), (3, None), (4, 0.5)])
def test_image_parity_with_pytorch(triton_stack, client, steps, gamma):
    seeds = [0, 7, 123456789]
    got = client.infer("tiny", seeds, steps, gamma=None if gamma is None else [gamma] * 3,
                       outputs=("image", "sample", "png"))
    ref = _torch_samples(triton_stack.dirs["ckpt"] / "run-tiny", steps, seeds, gamma=gamma)
    assert got["sample"].shape == ref.shape == (3, 1, 28, 28)
    np.testing.assert_allclose(got["sample"], ref, atol=2e-4, rtol=0)
    # the uint8 image is the quantised sample; quantising the torch sample agrees up to rounding ties
    np.testing.assert_array_equal(got["image"], sampling.to_uint8(got["sample"]))
    assert np.abs(got["image"].astype(int) - sampling.to_uint8(ref).astype(int)).max() <= 1
    from PIL import Image
    for b, png in enumerate(got["png"]):
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), got["image"][b, :, :, 0])


@pytest.mark.smoke  # the fast lane's real-server test: gRPC, class labels, the re-noising loop
def test_conditional_consistency_2d_parity_with_pytorch(triton_stack, client):
    # toyc is a consistency model: every jump lands at t_end and the loop re-noises from the seed
    assert client.meta("toyc").gamma == 1.0
    seeds, labels = [5, 6, 7, 8], [0, 1, 2, 3]
    got = client.generate("toyc", seeds, 3, class_labels=labels)
    ref = _torch_samples(triton_stack.dirs["ckpt"] / "run-toyc", 3, seeds, labels=labels)
    np.testing.assert_allclose(got, ref, atol=2e-4, rtol=0)
    other = client.generate("toyc", seeds, 3, class_labels=[3, 2, 1, 0])
    assert not np.allclose(other, got)  # the label matters


def test_64_concurrent_mixed_requests_are_correct_and_deterministic(triton_stack, client):
    runner = _runner(triton_stack.dirs["tiny"])
    spec = runner.manifest["sampler"]
    rng = np.random.default_rng(0)
    reqs = []
    for i in range(64):
        k = int(rng.integers(1, 4))                       # 1..3 images per request
        seeds = [int(s) for s in rng.integers(0, 1000, k)]
        steps = [int(rng.choice([1, 2, 4, 6]))] * k
        if i % 5 == 0 and k > 1:
            steps[-1] = 3                                  # mixed step counts inside one request
        reqs.append((seeds, steps))

    def fire():
        with ThreadPoolExecutor(max_workers=64) as pool:
            return list(pool.map(lambda r: client.infer("tiny", r[0], r[1], outputs=("image", "sample")), reqs))

    def jump_stats():
        from fewstep.serving.bench import read_jump_counters

        last = None
        while True:  # the samplers flush their counters 50 ms after they go idle
            now = read_jump_counters(triton_stack.server.metrics_url, "tiny")
            if now == last:
                return now["image_steps"], now["calls"]
            last = now
            time.sleep(0.15)

    inf0, ex0 = jump_stats()
    first = fire()
    inf1, ex1 = jump_stats()
    second = fire()
    # concurrent requests share the schedulers' jump calls: far fewer calls than image-steps
    assert inf1 - inf0 >= 1.5 * (ex1 - ex0) > 0, (inf1 - inf0, ex1 - ex0)
    # every image equals the in-process ONNX Runtime sampler run for its seed alone
    for (seeds, steps), res in zip(reqs, first):
        for b, (seed, n) in enumerate(zip(seeds, steps)):
            ref = sampling.sample(lambda x, t, s: runner(x, t, s), spec, n, [seed], runner.manifest["image"]["shape"])
            np.testing.assert_allclose(res["sample"][b], ref[0], atol=1e-5, rtol=0)
    # and the bytes do not depend on what else shared the batch: run alone, then concurrently again
    for (seeds, steps), a, b in zip(reqs[:8], first[:8], second[:8]):
        alone = client.infer("tiny", seeds, steps, outputs=("image",))["image"]
        assert alone.tobytes() == a["image"].tobytes() == b["image"].tobytes()
    for a, b in zip(first, second):
        assert a["image"].tobytes() == b["image"].tobytes()


def _raw(url, model, inputs, outputs=("image",)):
    return raw_infer(url, model, inputs, outputs)


def test_every_bad_input_is_refused_and_the_server_keeps_serving(triton_stack, client):
    url = triton_stack.url
    good = client.generate("tiny", [1], 2)
    s1 = ("seed", np.array([[1]], np.int64), "INT64")
    st2 = ("steps", np.array([[2]], np.int64), "INT64")
    cases = [  # (model, inputs, code, words the message must contain)
        ("tiny", [s1, ("steps", np.array([[0]], np.int64), "INT64")], "steps", "[1, 64]"),
        ("tiny", [s1, ("steps", np.array([[-4]], np.int64), "INT64")], "steps", "[1, 64]"),
        ("tiny", [s1, ("steps", np.array([[65]], np.int64), "INT64")], "steps", "[1, 64]"),
        ("tiny", [("seed", np.array([[1]], np.int32), "INT32"), st2], "seed", "INT64"),
        ("tiny", [s1, ("steps", np.array([[2]], np.int32), "INT32")], "steps", "INT64"),
        ("tiny", [s1, ("steps", np.array([[2.0]], np.float32), "FP32")], "steps", "INT64"),
        ("tiny", [("seed", np.array([[1, 2]], np.int64), "INT64"), st2], "seed", "[-1,1]"),
        ("tiny", [], "seed", "missing required input"),
        ("tiny", [s1, st2, ("class_label", np.array([[1]], np.int64), "INT64")], "class_label", "unconditional"),
        ("toyc", [s1, st2, ("class_label", np.array([[4]], np.int64), "INT64")], "class_label", "[0, 3]"),
        ("toyc", [s1, st2, ("class_label", np.array([[-1]], np.int64), "INT64")], "class_label", "[0, 3]"),
        ("toyc", [s1, st2], "class_label", "[0, 3]"),
        ("tiny", [s1, st2, ("gamma", np.array([[np.nan]], np.float32), "FP32")], "gamma", "[0, 1]"),
        ("tiny", [s1, st2, ("gamma", np.array([[1.5]], np.float32), "FP32")], "gamma", "[0, 1]"),
        ("tiny", [s1, st2, ("gamma", np.array([[-0.1]], np.float32), "FP32")], "gamma", "[0, 1]"),
        ("tiny", [("seed", np.array([[-1]], np.int64), "INT64"), st2], "seed", "[0,"),
        ("tiny", [("seed", np.arange(17, dtype=np.int64).reshape(17, 1), "INT64"),
                  ("steps", np.full((17, 1), 2, np.int64), "INT64")], "batch-size", "16"),
    ]
    for model, inputs, field, allowed in cases:
        out = ("sample",) if model == "toyc" else ("image",)
        with pytest.raises(InferenceServerException) as e:
            _raw(url, model, inputs, out)
        msg = e.value.message()
        assert "INVALID_ARGUMENT" in str(e.value.status()), (field, e.value)
        assert field in msg and allowed in msg, msg
        # the next good request succeeds, with the same bytes as before
        assert client.generate("tiny", [1], 2).tobytes() == good.tobytes()
    # an unknown model: Triton answers NOT_FOUND naming it; the client lists the models there are
    with pytest.raises(ServingError) as e:
        client.generate("nope", [1], 2)
    assert e.value.code == "NOT_FOUND" and "'nope'" in e.value.message and "tiny, toyc" in e.value.message
    assert client.generate("tiny", [1], 2).tobytes() == good.tobytes()
    # nothing leaked: the same processes serve on
    assert triton_stack.server.proc.poll() is None


def test_steps_left_out_are_the_models_default(triton_stack, client):
    """A request without steps gets the manifest's default_steps, applied by the server: the
    same bytes as a request that sends it, through the ensemble and the stream."""
    default = client.meta("tiny").default_steps
    sent = client.generate("tiny", [5, 6], default)
    without = _raw(triton_stack.url, "tiny", [("seed", np.array([[5], [6]], np.int64), "INT64")], ("image",))
    assert without.as_numpy("image").tobytes() == sent.tobytes()
    assert client.generate("tiny", [5, 6]).tobytes() == sent.tobytes()  # the client sends no steps
    previews = list(client.stream("tiny", seed=5))
    assert len(previews) == default and previews[-1][1].tobytes() == sent[0].tobytes()
    assert client.generate_png("tiny", [5])[0].startswith(b"\x89PNG")


def test_stream_yields_one_preview_per_step_and_the_final_image(client):
    final = client.generate("tiny", [11], 4)[0]
    previews = list(client.stream("tiny", seed=11, steps=4))
    assert [s for s, _ in previews] == [1, 2, 3, 4]
    assert all(img.shape == (28, 28, 1) and img.dtype == np.uint8 for _, img in previews)
    assert previews[-1][1].tobytes() == final.tobytes()
    assert previews[0][1].tobytes() != final.tobytes()
    with pytest.raises(ServingError) as e:
        list(client.stream("tiny", seed=11, steps=0))
    assert e.value.code == "INVALID_ARGUMENT" and "steps" in e.value.message
    assert [s for s, _ in client.stream("tiny", seed=1, steps=1)] == [1]


def test_async_client(triton_stack, client):
    expect = client.generate("tiny", [2, 3], 2)

    async def go():
        async with AsyncClient(triton_stack.url, timeout=60) as ac:
            assert await ac.models() == ["tiny", "toyc"]
            many = await asyncio.gather(*[ac.generate("tiny", [2, 3], 2) for _ in range(4)])
            steps = [s async for s, _ in ac.stream("tiny", seed=2, steps=3)]
            with pytest.raises(ServingError) as e:
                await ac.generate("tiny", [2], 99)
            return many, steps, e.value

    many, steps, err = asyncio.run(go())
    assert all(m.tobytes() == expect.tobytes() for m in many)
    assert steps == [1, 2, 3]
    assert err.code == "INVALID_ARGUMENT" and "[1, 64]" in err.message


def test_generate_cli(triton_stack, client, tmp_path):
    from PIL import Image

    out = tmp_path / "one.png"
    r = subprocess.run(FEWSTEP + ["generate", "--url", triton_stack.url, "--model", "tiny", "--steps", "2",
                                  "--seed", "5", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(np.asarray(Image.open(out)), client.generate("tiny", [5], 2)[0, :, :, 0])
    grid = tmp_path / "grid.png"
    r = subprocess.run(FEWSTEP + ["generate", "--url", triton_stack.url, "--model", "tiny", "--steps", "1",
                                  "--num", "20", "--out", str(grid)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert Image.open(grid).size == (5 * 30 + 2, 4 * 30 + 2)  # 20 images > max batch 16: two requests
    r = subprocess.run(FEWSTEP + ["generate", "--url", triton_stack.url, "--model", "tiny", "--steps", "0",
                                  "--out", str(tmp_path / "x.png")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "steps: must be an integer in [1, 64]" in r.stderr


def test_serve_cli_shuts_down_cleanly_on_sigterm_and_sigint(served_model_dirs, tmp_path):
    from fewstep.serving.launcher import free_port, process_group_members

    for sig in (signal.SIGTERM, signal.SIGINT):
        port = free_port()
        proc, text = start_serve(["--model", str(served_model_dirs["toyc"]), "--grpc-port", str(port),
                                  "--http-port", str(free_port()), "--metrics-port", str(free_port()), "--threads", "1"])
        try:
            assert f"gRPC     127.0.0.1:{port}" in text, text
            # the start-up line says what runs the jump (this host: no GPU, the CPU build of ONNX Runtime)
            assert "toyc: the jump runs on ONNX Runtime's CPUExecutionProvider" in text, text
            with Client(f"127.0.0.1:{port}") as c:
                assert c.generate("toyc", [1], 2, class_labels=[1]).shape == (1, 2)
            server_pid = [p for p in _children(proc.pid) if _comm(p) == "tritonserver"]
            assert len(server_pid) == 1, server_pid
            triton = process_group_members(server_pid[0])  # tritonserver and its stubs: their own group
            assert len(triton) >= 4 and server_pid[0] in triton
            proc.send_signal(sig)
            assert proc.wait(60) == 0
            time.sleep(0.5)
            left = [p for p in triton if os.path.exists(f"/proc/{p}") and _state(p) != "Z"]
            assert left == [], f"processes left after {sig!r}: {left}"
            assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"fewstep_{proc.pid}_")]
        finally:
            stop_serve(proc)


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                out.append(int(d.name))
    return out


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "gone"
    return stat[stat.rindex(")") + 2:].split()[0]
