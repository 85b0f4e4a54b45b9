"""The Gradio demo: a real browser (Debian chromium via Playwright, headless) on the real page
talking to a real tritonserver (the `triton_server` fixture), `gradio_client` on its API,
`fewstep demo` end to end, and the shipped default models.

The README's screenshot (docs/img/demo.png) is taken on the default models when their
export is in the cache (after `make demo` has run once); on the random-weight test model it
goes to the test's tmp dir only.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from fewstep.figures import SHIPPED_FEATURE_NETS

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOT = ROOT / "docs" / "img" / "demo.png"
T = 60_000  # ms: generous for a loaded 2-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- shipped default models -----------------------------------------------------------------------

def test_ship_and_prepare(tmp_path, monkeypatch):
    """ship_demo_models copies config + one EMA (+ eval.json); prepare_model lays out a checkpoint
    that load_model reads with that EMA, exports once, and again only when a source changes."""
    from conftest import make_test_checkpoint

    import fewstep.export.shipped as shipped
    from fewstep.training.build import load_model

    ckpt = make_test_checkpoint(tmp_path / "ck", "shipme", method="rf")
    (ckpt / "eval.json").write_text(json.dumps({"metric": "fid", "ema": "0.999", "num": 100,
                                                "results": [{"steps": 1, "fid": 99.0}]}))
    models = tmp_path / "models"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "ship_demo_models.py"), str(ckpt.parent.parent),
                        "--name", "rf_test", "--models-dir", str(models)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    src = models / "rf_test"
    info = json.loads((src / "ship.json").read_text())
    assert info["weights"] == "ema-0.999.safetensors" and info["step"] == 1
    assert info["eval"]["results"][0]["fid"] == 99.0
    assert sorted(p.name for p in src.iterdir()) == ["config.json", "ema-0.999.safetensors", "eval.json", "ship.json"]
    assert info["bytes"] < 25 * 1024 * 1024

    calls = []

    def fake_export(ck, out, ema, name, **kw):  # the real export is tested in test_export.py
        model = load_model(ck, ema=ema)             # the assembled checkpoint loads, with its EMA
        calls.append((name, model.ema))
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "manifest.json").write_text("{}")

    from fewstep.export import exporter
    monkeypatch.setattr(exporter, "export_model", fake_export)
    cache = tmp_path / "cache"
    out = shipped.prepare_model(src, cache, log=lambda m: None)
    assert out == cache / "rf_test" / "model" and calls == [("rf_test", "0.999")]
    shipped.prepare_model(src, cache, log=lambda m: None)
    assert len(calls) == 1                          # reused: same source hash
    (src / "eval.json").write_text("{}")
    shipped.prepare_model(src, cache, log=lambda m: None)
    assert len(calls) == 2                          # a changed source re-exports


def test_shipped_default_models(tmp_path, capfd):
    """The models in demo/models: intact (hashes), small, loadable by load_model with their
    checksums verified (no note about an older checkpoint), and scored by the one evaluator."""
    from fewstep.export.shipped import _checkpoint_from_shipped, read_ship, shipped_models
    from fewstep.export.manifest import sha256_file
    from fewstep.figures import EVALUATOR_VERSION
    from fewstep.files import sha256_file as digest_hex
    from fewstep.training.build import load_model

    models = shipped_models()
    if not models:
        pytest.skip("no default models shipped in demo/models yet")
    from fewstep.training.methods import method_class
    for m in models:
        info = read_ship(m)
        for f, digest in info["files"].items():
            assert sha256_file(m / f) == digest, f"{m / f} differs from ship.json"
        assert sum((m / f).stat().st_size for f in info["files"]) < 25 * 1024 * 1024
        ema = _checkpoint_from_shipped(m, tmp_path / m.name, info)
        assert method_class(info["method"]) is not None
        cfg = json.loads((m / "config.json").read_text())
        assert cfg["sha256"][info["weights"]] == digest_hex(m / info["weights"])
        model = load_model(tmp_path / m.name, ema=ema)
        assert model.method.name == info["method"] and model.ema == ema
        ev = json.loads((m / "eval.json").read_text())
        assert ev["features"]["sha256"] == SHIPPED_FEATURE_NETS["fmnist"][1] and ev["evaluator_version"] == EVALUATOR_VERSION
        assert not Path(ev["ckpt"]).is_absolute() and "/root" not in json.dumps(ev)
    assert "records no checksums" not in capfd.readouterr().err
    # the defaults the demo promises: a CUD model and a consistency model
    methods = {read_ship(m)["method"] for m in models}
    assert methods & {"cud", "cud-distill"} and methods & {"cd", "ctm"}, methods


# --- the page in a real browser -------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (test extra)")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no chromium at {CHROMIUM} (Debian package chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def _launch(url: str):
    pytest.importorskip("gradio", reason="the demo needs gradio (demo extra)")
    from fewstep.demo.app import build_app, launch

    app = build_app(url, concurrency=2)
    page_url = launch(app, port=_free_port())
    return app, page_url


TINYQ_EVAL = {"metric": "fid-classifier", "num": 1000, "evaluator_version": 2,
              "features": {"sha256": SHIPPED_FEATURE_NETS["fmnist"][1]},   # figures the page shows
              "results": [{"steps": 1, "fid": 90.0}, {"steps": 2, "fid": 40.0}, {"steps": 4, "fid": 60.0}]}


@pytest.fixture(scope="module")
def demo_server(served_model_dirs, tmp_path_factory):
    """A real tritonserver with `tiny` (a random-weight rf model as exported: no eval figures,
    made for its default 8 steps) and `tinyq`: the same jump under a manifest that records eval
    figures (results keyed `fid`, as `fewstep eval` writes them) and recommended steps [1, 2]."""
    pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[grpc] (the serve extra)")
    from types import SimpleNamespace

    from fewstep.export.manifest import write_manifest
    from fewstep.errors import UserError
    from fewstep.serving.launcher import Server, find_triton
    from fewstep.serving.repository import Options, write_repository

    try:
        find_triton()
    except UserError as e:
        pytest.skip(f"no tritonserver: {e}")
    root = tmp_path_factory.mktemp("demo")
    tinyq = root / "tinyq"
    shutil.copytree(served_model_dirs["tiny"], tinyq)
    manifest = json.loads((tinyq / "manifest.json").read_text())
    manifest.update(name="tinyq", recommended_steps=[1, 2], eval=TINYQ_EVAL)
    manifest["sampler"]["default_steps"] = 2
    write_manifest(tinyq, manifest)
    written = write_repository(root / "repo", [str(served_model_dirs["tiny"]), str(tinyq)],
                               Options(device="cpu", threads=1))
    server = Server(root / "repo", grpc_port=0, http_port=0, metrics_port=0,
                    models=[n for w in written for n in w["models"]], log_file=root / "tritonserver.log")
    server.start(timeout=240)
    try:
        yield SimpleNamespace(url=server.grpc_url, server=server)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def page_app(demo_server):
    app, page_url = _launch(demo_server.url)
    try:
        yield page_url
    finally:
        app.close()


def _set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")
    box.blur()


def _gallery_images(page, elem_id: str) -> list[np.ndarray]:
    """The gallery's images, fetched from the page's own URLs and decoded."""
    from PIL import Image

    srcs = page.eval_on_selector_all(f"#{elem_id} img", "els => els.map(e => e.src)")
    out = []
    for src in dict.fromkeys(srcs):  # a gallery may show a thumbnail twice
        with urllib.request.urlopen(src, timeout=30) as r:
            out.append(np.asarray(Image.open(io.BytesIO(r.read())).convert("L"), dtype=np.float32))
    return out


def _generate(page, steps: int, num: int, preview: bool) -> str:
    _set_number(page, "fewstep-steps", steps)
    _set_number(page, "fewstep-num", num)
    box = page.locator("#fewstep-preview input[type=checkbox]")
    if box.is_checked() != preview:
        box.click()
    page.click("#fewstep-generate")
    want = f"at {steps} step{'s' if steps > 1 else ''}"
    page.wait_for_function(f"(document.querySelector('#fewstep-latency')?.innerText || '').includes({want!r})"
                           f" && document.querySelectorAll('#fewstep-gallery img').length >= {num}", timeout=T)
    return page.inner_text("#fewstep-latency")


def _open(page, page_url: str, model: str = "tiny") -> None:
    page.goto(page_url)
    _wait_text(page, "fewstep-model-info", f"{model} — method")


def _wait_text(page, elem_id: str, text: str) -> None:
    page.wait_for_function(f"(document.querySelector('#{elem_id}')?.innerText || '').includes({text!r})", timeout=T)


def _select_model(page, name: str) -> None:
    page.locator("#fewstep-model input").click()
    page.get_by_role("option", name=name, exact=True).click()
    _wait_text(page, "fewstep-model-info", f"{name} — method")


def _images_shown(page, elem_id: str) -> int:
    return page.eval_on_selector_all(f"#{elem_id} img", "els => els.length")


def _assert_images(images, n):
    assert len(images) == n
    for img in images:
        assert img.shape[0] >= 100 and img.std() > 5.0, "a blank image in the gallery"


def test_page_generate_and_compare(browser, page_app, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    try:
        _open(page, page_app)
        info = page.inner_text("#fewstep-model-info")
        assert "unconditional" in info and "steps" in info
        assert not page.locator("#fewstep-label").is_visible()  # an unconditional model: no class label

        lat = _generate(page, steps=1, num=3, preview=False)
        assert re.search(r"Latency: [\d.]+ ms", lat) and "3 images at 1 step" in lat
        one = _gallery_images(page, "fewstep-gallery")
        _assert_images(one, 3)

        lat = _generate(page, steps=4, num=5, preview=True)
        assert re.search(r"Latency: [\d.]+ ms", lat) and "5 images at 4 steps" in lat
        four = _gallery_images(page, "fewstep-gallery")
        _assert_images(four, 5)
        assert not np.array_equal(one[0], four[0])  # same seed 0, other step count: another image
        live = _gallery_images(page, "fewstep-live")  # the streamed preview ends on the final image
        assert len(live) == 1 and np.array_equal(live[0], four[0])

        page.get_by_role("tab", name="Compare steps").click()
        _set_number(page, "fewstep-compare-seed", 7)
        page.click("#fewstep-compare")
        page.wait_for_function("(document.querySelector('#fewstep-compare-table')?.innerText || '').includes('8')"
                               " && document.querySelectorAll('#fewstep-compare-gallery img').length >= 4", timeout=T)
        table = page.inner_text("#fewstep-compare-table")
        assert len(re.findall(r"[\d.]+ ms", table)) == 4
        captions = page.inner_text("#fewstep-compare-gallery")
        for k in ("1 step ·", "2 steps ·", "4 steps ·", "8 steps ·"):
            assert k in captions
        _assert_images(_gallery_images(page, "fewstep-compare-gallery"), 4)
        page.get_by_role("tab", name="Generate").click()
        page.screenshot(path=str(tmp_path / "demo-tiny.png"), full_page=True)
    finally:
        page.close()


def test_page_model_switch_quality_and_steps(browser, page_app):
    """Page items 1-3: a model switch clears the old model's results; the model line shows the
    manifest's FID per step count; the steps box defaults to a count the model was made for;
    the compare view shows those counts with their FID; another count is annotated."""
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    try:
        _open(page, page_app)
        assert "FID" not in page.inner_text("#fewstep-model-info")  # tiny has no eval figures
        assert page.input_value("#fewstep-steps input") == "8"       # its default, the count it was made for
        _generate(page, steps=1, num=2, preview=False)
        page.get_by_role("tab", name="Compare steps").click()
        page.click("#fewstep-compare")
        page.wait_for_function("document.querySelectorAll('#fewstep-compare-gallery img').length >= 4", timeout=T)
        assert "tiny" in page.inner_text("#fewstep-compare-intro")

        _select_model(page, "tinyq")  # switched on the compare tab, as the user who found it did
        page.wait_for_function("document.querySelectorAll('#fewstep-compare-gallery img').length == 0"
                               " && (document.querySelector('#fewstep-compare-table')?.innerText || '').trim() == ''",
                               timeout=T)
        info = page.inner_text("#fewstep-model-info")
        assert "made for 1 or 2 steps" in info
        assert "FID by steps (fid-classifier, 1000 samples, lower is better): 1 → 90.0 (made for) · " \
               "2 → 40.0 (made for) · 4 → 60.0" in info
        intro = page.inner_text("#fewstep-compare-intro")
        assert "tinyq at 1, 2 and 4 steps" in intro
        page.click("#fewstep-compare")
        page.wait_for_function("(document.querySelector('#fewstep-compare-table')?.innerText || '')"
                               ".includes('made for') && document.querySelectorAll('#fewstep-compare-gallery img').length >= 3", timeout=T)
        table = page.inner_text("#fewstep-compare-table")
        assert "FID (1000 samples)" in table and "90.0" in table and "60.0" in table
        captions = page.inner_text("#fewstep-compare-gallery")
        assert re.search(r"1 step · [\d.]+ ms · FID 90.0 · made for", captions)
        assert re.search(r"4 steps · [\d.]+ ms · FID 60.0(?! · made for)", captions)

        page.get_by_role("tab", name="Generate").click()
        assert _images_shown(page, "fewstep-gallery") == 0       # tiny's images went with the switch
        assert page.inner_text("#fewstep-latency").strip() == ""
        assert page.input_value("#fewstep-steps input") == "2"   # tinyq's default
        assert "made for 1 or 2 steps" in page.inner_text("#fewstep-steps-hint")
        lat = _generate(page, steps=4, num=1, preview=False)
        assert "tinyq" in lat and "FID 60.0 at 4 steps; tinyq was made for 1 or 2 steps (FID 90.0 at 1 step)" in lat
    finally:
        page.close()


def test_page_says_out_of_range_values(browser, page_app):
    """Page item 4: 1000 steps, 0 steps, 2.5 steps or 17 images are refused with a message; the box keeps
    what was typed (no clamping) and nothing is generated."""
    page = browser.new_page()
    try:
        _open(page, page_app)
        for steps, num, said in ((1000, 1, "Steps must be a whole number in [1, 64], got 1000"),
                                 (0, 1, "Steps must be a whole number in [1, 64], got 0"),
                                 (2.5, 1, "Steps must be a whole number in [1, 64], got 2.5"),
                                 (2, 17, "Number of images must be a whole number in [1, 16], got 17")):
            _set_number(page, "fewstep-steps", steps)
            _set_number(page, "fewstep-num", num)
            page.click("#fewstep-generate")
            _wait_text(page, "fewstep-status", said)
            assert "Nothing was sent to the server" in page.inner_text("#fewstep-status")
            assert page.input_value("#fewstep-steps input") == str(steps)
            assert _images_shown(page, "fewstep-gallery") == 0
        _generate(page, steps=2, num=1, preview=False)  # a good request clears the message
        assert page.inner_text("#fewstep-status").strip() == ""
    finally:
        page.close()


def test_page_preview_at_one_step(browser, page_app):
    """Page item 5 in the browser: at 1 step the live preview shows the image (the stream's one
    frame); unticked, the preview box is hidden rather than left empty."""
    page = browser.new_page()
    try:
        _open(page, page_app)
        _generate(page, steps=1, num=2, preview=True)
        page.wait_for_function("document.querySelectorAll('#fewstep-live img').length == 1", timeout=T)
        live = _gallery_images(page, "fewstep-live")
        assert len(live) == 1 and np.array_equal(live[0], _gallery_images(page, "fewstep-gallery")[0])
        page.locator("#fewstep-preview input[type=checkbox]").click()
        page.wait_for_function("!document.querySelector('#fewstep-live') || "
                               "document.querySelector('#fewstep-live').offsetParent === null", timeout=T)
    finally:
        page.close()


def test_stream_previews_are_denoised_estimates(demo_server):
    """Page item 5 at the source: `<name>_stream`'s frames are the denoised estimate at each step:
    the first is the seed's 1-step image, the last the final image, none is the noisy state."""
    from fewstep.serving.client import Client

    with Client(demo_server.url, timeout=120) as c:
        frames = list(c.stream("tiny", seed=3, steps=4))
        one, four = c.generate("tiny", [3], 1)[0], c.generate("tiny", [3], 4)[0]
    assert [k for k, _ in frames] == [1, 2, 3, 4]
    assert np.array_equal(frames[0][1], one) and np.array_equal(frames[-1][1], four)
    assert not np.array_equal(frames[1][1], frames[0][1])


@pytest.mark.slow  # a browser waits out the page's retries
def test_page_when_triton_is_down(browser):
    dead = f"127.0.0.1:{_free_port()}"  # nothing listens there
    app, page_url = _launch(dead)
    page = browser.new_page()
    try:
        page.goto(page_url)
        page.wait_for_function("(document.querySelector('#fewstep-status')?.innerText || '').includes('unreachable')",
                               timeout=T)
        text = page.inner_text("#fewstep-status")
        assert dead in text and "listing the models" in text
        page.click("#fewstep-generate")  # and a request says so again
        page.wait_for_function("(document.querySelector('#fewstep-status')?.innerText || '').includes('(generating)')",
                               timeout=T)
        assert "unreachable" in page.inner_text("#fewstep-status")
    finally:
        page.close()
        app.close()


def test_gradio_client_api(page_app, demo_server, capfd):
    """Page item 6: named, typed endpoints with plain data; no label for unconditional models;
    a refused request is a clean one-line error for the client and no traceback in the log."""
    gradio_client = pytest.importorskip("gradio_client", reason="needs gradio_client (with gradio)")
    import base64

    from PIL import Image

    from fewstep.serving.client import Client

    c = gradio_client.Client(page_app, verbose=False)
    api = c.view_api(print_info=False, return_format="dict")
    assert set(api["named_endpoints"]) == {"/models", "/generate", "/compare"} and not api["unnamed_endpoints"]
    params = {k: [p["parameter_name"] for p in v["parameters"]] for k, v in api["named_endpoints"].items()}
    assert params["/generate"] == ["model", "steps", "seed", "num_images", "class_label", "gamma"]
    assert params["/compare"] == ["model", "seed", "class_label", "gamma"]
    gen = {p["parameter_name"]: p for p in api["named_endpoints"]["/generate"]["parameters"]}
    assert gen["steps"]["type"] == {"oneOf": [{"type": "null"}, {"type": "integer"}]}
    assert gen["class_label"]["parameter_has_default"] and gen["class_label"]["parameter_default"] is None

    models = {m["name"]: m for m in c.predict(api_name="/models")}
    assert set(models) == {"tiny", "tinyq"}
    q = models["tinyq"]
    assert (q["recommended_steps"], q["default_steps"], q["max_steps"], q["num_classes"]) == ([1, 2], 2, 64, 0)
    assert q["quality"] == {"metric": "fid-classifier", "samples": 1000, "by_steps": [
        {"steps": 1, "value": 90.0}, {"steps": 2, "value": 40.0}, {"steps": 4, "value": 60.0}]}
    assert models["tiny"]["recommended_steps"] == [8] and models["tiny"]["quality"] is None

    r = c.predict("tiny", steps=2, seed=11, num_images=3, api_name="/generate")  # no class_label needed
    assert (r["model"], r["steps"], r["seeds"], r["class_label"], r["gamma"]) == ("tiny", 2, [11, 12, 13], None, None)
    assert r["latency_ms"] > 0 and r["server"] == demo_server.url and r["image_shape"] == [28, 28, 1]
    assert "was made for 8 steps" in r["note"]
    images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(i["png_base64"])))) for i in r["images"]]
    assert [i["seed"] for i in r["images"]] == [11, 12, 13]
    with Client(demo_server.url) as direct:  # the API returns what the server makes for those seeds
        ref = direct.generate("tiny", [11, 12, 13], 2)
    assert all(np.array_equal(a, b[:, :, 0]) for a, b in zip(images, ref))
    assert c.predict("tinyq", api_name="/generate")["steps"] == 2  # the model's default

    capfd.readouterr()
    for kwargs, said in (({"steps": 1000}, "steps must be a whole number in [1, 64], got 1000"),
                         ({"steps": 0}, "got 0"),
                         ({"class_label": 3}, "tiny is unconditional; send no class label"),
                         ({"steps": 1, "gamma": 0.5}, "gamma has no effect at 1 step"),
                         ({"num_images": 17}, "number of images must be a whole number in [1, 16], got 17")):
        with pytest.raises(gradio_client.exceptions.AppError) as e:
            c.predict("tiny", api_name="/generate", **kwargs)
        assert said in str(e.value) and "Traceback" not in str(e.value)
    with pytest.raises(gradio_client.exceptions.AppError, match="NOT_FOUND|unknown model|nosuch"):
        c.predict("nosuch", api_name="/generate")
    log = capfd.readouterr()
    assert "Traceback" not in log.err + log.out

    cmp = c.predict("tinyq", seed=3, api_name="/compare")
    rows = [(x["steps"], x["quality"], x["made_for"]) for x in cmp["results"]]
    assert rows == [(1, 90.0, True), (2, 40.0, True), (4, 60.0, False)] and cmp["seed"] == 3
    assert all(x["latency_ms"] > 0 and x["png_base64"] for x in cmp["results"])


def test_uploads_are_refused(page_app):
    """Issue 14 item 10: the page takes no files, so Gradio's upload route is closed: a small
    upload and a 64 MB one are refused (never stored, never served back); the page still works."""
    import http.client
    from urllib.parse import urlparse

    u = urlparse(page_app)

    def upload(size: int):
        boundary = "fewstepboundary"
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"x.bin\"\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n").encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        try:
            conn.putrequest("POST", "/gradio_api/upload")
            conn.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
            conn.putheader("Content-Length", str(len(head) + size + len(tail)))
            conn.endheaders()
            try:
                conn.send(head)
                chunk = b"\0" * (1 << 20)
                for lo in range(0, size, len(chunk)):
                    conn.send(chunk[:min(len(chunk), size - lo)])
                conn.send(tail)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server answered and closed before the body was all sent
            try:
                r = conn.getresponse()
                return r.status, r.read().decode(errors="replace")
            except (ConnectionResetError, http.client.RemoteDisconnected):
                return None, ""
        finally:
            conn.close()

    status, body = upload(10)
    assert status == 403 and "uploads are disabled" in body
    status, _ = upload(64 << 20)
    assert status in (403, None)  # refused: the answer, or the connection closed on the sender
    with urllib.request.urlopen(page_app, timeout=30) as r:
        assert r.status == 200


def test_rejected_request_message(demo_server):
    from fewstep.demo.backend import Backend
    from fewstep.demo.checks import describe_error
    from fewstep.serving.client import ServingError

    backend = Backend(demo_server.url)
    with pytest.raises(ServingError) as e:
        backend.generate("tiny", [0], 999)
    msg = describe_error(e.value, demo_server.url)
    assert "rejected" in msg and "steps" in msg


# --- `fewstep demo` end to end ----------------------------------------------------------------------

def _default_models_exported() -> bool:
    from fewstep.export.shipped import default_cache_dir, read_ship, shipped_models, source_hash
    models = shipped_models()
    if not models:
        return False
    for m in models:
        base = default_cache_dir() / (read_ship(m).get("name") or m.name)
        stamp = base / "source-hash"
        if not (base / "model" / "manifest.json").is_file() or not stamp.is_file() \
                or stamp.read_text().strip() != source_hash(m):
            return False
    return True


def test_fewstep_demo_cli(served_model_dirs, browser, tmp_path):
    """`fewstep demo` starts Triton and the page, prints the URL, and stops both on SIGTERM.
    On the default models (when exported) it also takes the README's screenshot."""
    pytest.importorskip("gradio", reason="the demo needs gradio (demo extra)")
    from fewstep.serving.launcher import process_group_members

    defaults = _default_models_exported()
    cmd = [sys.executable, "-m", "fewstep", "demo", "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0",
           "--port", "0", "--threads", "1"]  # port 0: a free one
    if not defaults:
        cmd += ["--model", f"tiny={served_model_dirs['tiny']}"]
    err = open(tmp_path / "demo.err", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
    try:
        page_url = None
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and page_url is None:
            line = proc.stdout.readline()
            if not line:
                break
            m = re.match(r"fewstep demo: open (http://\S+)", line)
            page_url = m.group(1) if m else None
        assert page_url, f"no URL printed; stderr:\n{(tmp_path / 'demo.err').read_text()[-3000:]}"
        # the start-up log says what runs the jump (on a host without a GPU: ONNX Runtime's CPU provider)
        from fewstep.serving.launcher import gpu_present
        said = re.findall(r"\[demo\] \w+: the jump runs on (.+)", (tmp_path / "demo.err").read_text())
        assert said and (gpu_present() or all(w == "ONNX Runtime's CPUExecutionProvider" for w in said)), said
        with urllib.request.urlopen(page_url, timeout=30) as r:
            assert r.status == 200
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        try:
            page.goto(page_url)
            page.wait_for_function("(document.querySelector('#fewstep-model-info')?.innerText || '').includes('steps')",
                                   timeout=T)
            _set_number(page, "fewstep-seed", 3)
            _generate(page, steps=4, num=8, preview=True)
            _assert_images(_gallery_images(page, "fewstep-gallery"), 8)
            # the screenshot needs the gallery painted: lazy images below the fold never load headless
            page.evaluate("document.querySelectorAll('img[loading=lazy]').forEach(i => { i.loading = 'eager'; })")
            page.wait_for_function(
                "[...document.querySelectorAll('#fewstep-gallery img')].every(i => i.complete && i.naturalWidth > 0)",
                timeout=T)
            shot = SCREENSHOT if defaults else tmp_path / "demo.png"
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
        finally:
            page.close()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
        err.close()
    out = proc.stdout.read()
    assert rc == 0
    assert process_group_members(proc.pid) == []
    grpc = re.search(r"Triton gRPC (\S+):(\d+)", out)
    if grpc:  # the server it started is gone with it
        with socket.socket() as s, pytest.raises(OSError):
            s.settimeout(2)
            s.connect((grpc.group(1), int(grpc.group(2))))
