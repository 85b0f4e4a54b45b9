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
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

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


# --- unit: what the page shows --------------------------------------------------------------------

def test_display_images_scale_and_grey():
    from demo.app import display_images

    imgs = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28, 1)
    out = display_images(imgs)
    assert len(out) == 2 and out[0].shape == (168, 168)          # 6x nearest neighbour, >= 160
    assert np.array_equal(out[1][::6, ::6], imgs[1, :, :, 0])
    rgb = display_images(np.zeros((1, 32, 32, 3), np.uint8))
    assert rgb[0].shape == (160, 160, 3)


def test_messages_and_controls():
    from demo.app import class_names, describe_error, gamma_applies, model_info
    from serving.client import ModelMeta, ServingError

    down = ServingError("UNAVAILABLE", "failed to connect to all addresses")
    assert "unreachable at `h:1`" in describe_error(down, "h:1")
    bad = ServingError("INVALID_ARGUMENT", "steps: must be an integer in [1, 64], got 99")
    assert "rejected" in describe_error(bad, "h:1") and "got 99" in describe_error(bad, "h:1")
    meta = ModelMeta("m", (1, 28, 28), 10, 16, 4, 16, 0.0, ("image",), method="ctm", jump_lands="s")
    assert gamma_applies(meta)
    assert not gamma_applies(ModelMeta("c", (1, 28, 28), 0, 16, 4, 16, 1.0, ("image",), "cd", "end"))
    assert not gamma_applies(ModelMeta("f", (1, 28, 28), 0, 64, 8, 16, 0.0, ("image",), "cud", "s"))
    manifest = {"training": {"config": {"data": {"name": "fmnist"}}},
                "eval": {"metric": "fid", "num": 1000, "results": [{"steps": 1, "fid": 12.5}, {"steps": 4, "fid": 8.25}]}}
    assert class_names(meta, manifest)[9] == "Ankle boot"
    assert class_names(meta, None)[3] == "class 3"
    text = model_info(meta, manifest)
    assert "10 classes" in text and "1–16 steps" in text and "1 step: 12.50" in text and "4 steps: 8.25" in text


# --- shipped default models -----------------------------------------------------------------------

def test_ship_and_prepare(tmp_path, monkeypatch):
    """ship_demo_models copies config + one EMA (+ eval.json); prepare_model lays out a checkpoint
    that load_model reads with that EMA, exports once, and again only when a source changes."""
    from conftest import make_test_checkpoint

    import demo.shipped as shipped
    from training.build import load_model

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

    import export.cli
    monkeypatch.setattr(export.cli, "export_model", fake_export)
    cache = tmp_path / "cache"
    out = shipped.prepare_model(src, cache, log=lambda m: None)
    assert out == cache / "rf_test" / "model" and calls == [("rf_test", "0.999")]
    shipped.prepare_model(src, cache, log=lambda m: None)
    assert len(calls) == 1                          # reused: same source hash
    (src / "eval.json").write_text("{}")
    shipped.prepare_model(src, cache, log=lambda m: None)
    assert len(calls) == 2                          # a changed source re-exports


def test_shipped_default_models(tmp_path):
    """The models in demo/models: intact (hashes), small, and loadable by load_model."""
    from demo.shipped import _checkpoint_from_shipped, read_ship, shipped_models
    from export.manifest import sha256_file
    from training.build import load_model

    models = shipped_models()
    if not models:
        pytest.skip("no default models shipped in demo/models yet")
    from training.methods import method_class
    for m in models:
        info = read_ship(m)
        for f, digest in info["files"].items():
            assert sha256_file(m / f) == digest, f"{m / f} differs from ship.json"
        assert sum((m / f).stat().st_size for f in info["files"]) < 25 * 1024 * 1024
        ema = _checkpoint_from_shipped(m, tmp_path / m.name, info)
        assert method_class(info["method"]) is not None
        model = load_model(tmp_path / m.name, ema=ema)
        assert model.method.name == info["method"] and model.ema == ema
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
    from demo.app import build_app, launch

    app = build_app(url, concurrency=2)
    page_url = launch(app, port=_free_port())
    return app, page_url


@pytest.fixture(scope="module")
def page_app(triton_server):
    url, _, _ = triton_server
    app, page_url = _launch(url)
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


def _assert_images(images, n):
    assert len(images) == n
    for img in images:
        assert img.shape[0] >= 100 and img.std() > 5.0, "a blank image in the gallery"


def test_page_generate_and_compare(browser, page_app, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    try:
        page.goto(page_app)
        page.wait_for_function("(document.querySelector('#fewstep-model-info')?.innerText || '').includes('tiny')", timeout=T)
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


def test_gradio_client_api(page_app, triton_server):
    gradio_client = pytest.importorskip("gradio_client", reason="needs gradio_client (with gradio)")
    from PIL import Image

    c = gradio_client.Client(page_app, verbose=False)
    api = c.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/generate", "/compare", "/models"} <= set(api)
    gallery, _, latency, status, seed = c.predict("tiny", 2, 11, False, 3, 0.0, None, False, api_name="/generate")
    assert status == "" and seed == 11 and "3 images at 2 steps" in latency.replace("**", "")
    assert [g["caption"] for g in gallery] == ["seed 11", "seed 12", "seed 13"]
    images = [np.asarray(Image.open(g["image"]).convert("L"), np.float32) for g in gallery]
    _assert_images(images, 3)
    # the page shows what the server returns for those seeds (nothing is computed in the UI process)
    from demo.app import display_images
    from serving.client import Client
    with Client(triton_server[0]) as direct:
        ref = display_images(direct.generate("tiny", [11, 12, 13], 2))
    assert all(np.array_equal(a, b) for a, b in zip(images, ref))
    compared, table, status, _ = c.predict("tiny", 3, False, 0.0, None, api_name="/compare")
    assert status == "" and len(compared) == 4 and table.count("ms") == 4


def test_rejected_request_message(triton_server):
    from demo.app import Backend, describe_error
    from serving.client import ServingError

    backend = Backend(triton_server[0])
    with pytest.raises(ServingError) as e:
        backend.generate("tiny", [0], 999)
    msg = describe_error(e.value, triton_server[0])
    assert "rejected" in msg and "steps" in msg


# --- `fewstep demo` end to end ----------------------------------------------------------------------

def _default_models_exported() -> bool:
    from demo.shipped import default_cache_dir, read_ship, shipped_models, source_hash
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
    from serving.launcher import process_group_members

    defaults = _default_models_exported()
    cmd = [sys.executable, "-m", "fewstep", "demo", "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0",
           "--port", str(_free_port()), "--threads", "1"]
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
