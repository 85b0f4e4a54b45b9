"""The Gradio page of `fewstep demo`: a client of Triton over gRPC, and nothing else.

No model code runs in this process: every image comes from the server through
`serving.client` (the `<name>` ensemble for batches, `<name>_stream` for live previews).

    from demo.app import build_app
    app = build_app("127.0.0.1:8001")          # gr.Blocks, queued
    app.launch(server_name="127.0.0.1", server_port=7860)

API endpoints (for `gradio_client`): `/generate`, `/compare`, `/models`.
"""
from __future__ import annotations

import os

# before gradio is imported: no telemetry, no version check, no share link, nothing fetched
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_SSR_MODE", "False")
for _var in ("NO_PROXY", "no_proxy"):  # the page's own calls to localhost never go through a proxy
    os.environ[_var] = ",".join(x for x in (os.environ.get(_var, ""), "127.0.0.1", "localhost", "::1") if x)

import queue  # noqa: E402
import random  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import numpy as np  # noqa: E402

from serving.client import Client, ModelMeta, ServingError  # noqa: E402

MAX_IMAGES = 16
COMPARE_STEPS = (1, 2, 4, 8)
DISPLAY_MIN = 160  # images are scaled up (nearest neighbour, integer factor) to at least this size
SEED_MAX = 2**31 - 1

FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MNIST_CLASSES = tuple(str(i) for i in range(10))
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_CLASS_NAMES = {"fmnist": FMNIST_CLASSES, "mnist": MNIST_CLASSES, "cifar10": CIFAR10_CLASSES}


# --- what the page shows, as plain functions (unit-tested without a browser) ---------------------

def is_unreachable(err: Exception) -> bool:
    text = f"{getattr(err, 'code', '')} {getattr(err, 'message', err)}".lower()
    return any(k in text for k in ("unavailable", "failed to connect", "connection refused", "deadline_exceeded",
                                   "socket closed", "connect failed", "no ready server"))


def describe_error(err: Exception, url: str, doing: str = "") -> str:
    """A one-paragraph Markdown message for the page (`doing`: what the page was doing)."""
    if is_unreachable(err):
        return (f"⚠️ **Triton is unreachable at `{url}`**{f' ({doing})' if doing else ''}. Is the server running? "
                f"(`fewstep serve`, or `fewstep demo` without `--url` starts one.) Details: "
                f"{getattr(err, 'message', str(err))[:300]}")
    if isinstance(err, ServingError):
        if err.code in ("INVALID_ARGUMENT", "NOT_FOUND"):
            return f"⚠️ **The server rejected the request** ({err.code}): {err.message}"
        return f"⚠️ **The request failed** ({err.code}): {err.message[:500]}"
    return f"⚠️ **The request failed**: {str(err)[:500]}"


def format_latency(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.0f} ms" if ms >= 10 else f"{ms:.1f} ms"


def display_images(images: np.ndarray, min_size: int = DISPLAY_MIN) -> list[np.ndarray]:
    """uint8 [K, H, W, C] -> K arrays for the gallery: grey as [H, W], scaled up by an integer factor."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    k, h, w, c = images.shape
    f = max(1, int(np.ceil(min_size / max(h, w))))
    out = []
    for img in images:
        if f > 1:
            img = img.repeat(f, axis=0).repeat(f, axis=1)
        out.append(np.ascontiguousarray(img[:, :, 0] if c == 1 else img))
    return out


def class_names(meta: ModelMeta, manifest: dict | None) -> list[str]:
    data = (((manifest or {}).get("training") or {}).get("config") or {}).get("data") or {}
    names = _CLASS_NAMES.get(data.get("name"))
    if names and len(names) == meta.num_classes:
        return list(names)
    return [f"class {i}" for i in range(meta.num_classes)]


def gamma_applies(meta: ModelMeta) -> bool:
    """Show the gamma control for stochastic samplers: CTM's gamma-sampling, or a model whose
    default gamma is not 0. Consistency models (jump lands at the end) always re-noise."""
    return meta.jump_lands != "end" and (meta.method == "ctm" or meta.gamma > 0)


def _eval_line(manifest: dict | None) -> str:
    ev = (manifest or {}).get("eval")
    if not isinstance(ev, dict):
        return ""
    rows = ev.get("results") if isinstance(ev.get("results"), list) else []
    metric = ev.get("metric") or "fid"
    parts = [f"{r['steps']} step{'s' if r['steps'] != 1 else ''}: {r[metric]:.2f}"
             for r in rows if isinstance(r, dict) and "steps" in r and isinstance(r.get(metric), (int, float))]
    return f"{metric.upper()} ({ev.get('num', '?')} samples) — " + ", ".join(parts) if parts else ""


def model_info(meta: ModelMeta, manifest: dict | None = None) -> str:
    shape = "×".join(str(d) for d in meta.shape)
    cond = f"{meta.num_classes} classes" if meta.num_classes else "unconditional"
    sampler = ("consistency sampling (re-noises after every jump)" if meta.jump_lands == "end"
               else f"gamma-sampling (default γ = {meta.gamma:g})" if gamma_applies(meta) else "deterministic sampler")
    line = (f"**{meta.name}** — method `{meta.method or '?'}` · {shape} · {cond} · 1–{meta.max_steps} steps "
            f"(default {meta.default_steps}) · {sampler} · up to {meta.max_batch} images per request")
    ev = _eval_line(manifest)
    return line + (f"  \n{ev}" if ev else "")


# --- the backend: Triton over gRPC --------------------------------------------------------------

@dataclass
class Backend:
    """Every call the page makes to Triton (through serving.client only)."""
    url: str
    manifests: dict = field(default_factory=dict)  # name -> manifest.json of the models we serve
    timeout: float = 120.0

    def __post_init__(self):
        self._lock = threading.Lock()
        self._client: Client | None = None

    def client(self) -> Client:
        with self._lock:
            if self._client is None:
                self._client = Client(self.url, timeout=self.timeout)
            return self._client

    def reset(self) -> None:
        with self._lock:
            old, self._client = self._client, None
        if old is not None:
            try:
                old.close()
            except Exception:
                pass

    def models(self) -> tuple[list[ModelMeta], list[str]]:
        """(image models, names left out: 2-D models) from the server's repository index."""
        self.reset()  # a fresh connection and fresh metadata: the server may have changed
        c = self.client()
        metas, skipped = [], []
        for name in c.models():
            m = c.meta(name)
            (metas if m.is_image else skipped).append(m if m.is_image else name)
        return metas, skipped

    def meta(self, name: str) -> ModelMeta:
        return self.client().meta(name)

    def generate(self, name, seeds, steps, label=None, gamma=None) -> tuple[np.ndarray, float]:
        c = self.client()
        t0 = time.perf_counter()
        images = c.generate(name, seeds, steps, label, gamma)
        return images, time.perf_counter() - t0

    def stream(self, name, seed, steps, label=None, gamma=None):
        return self.client().stream(name, seed, steps, label, gamma)


# --- the page -----------------------------------------------------------------------------------

CSS = """
#fewstep-status:empty { display: none; }
#fewstep-status p { margin: 0.2em 0; }
#fewstep-latency p { font-size: 1.05em; }
"""


def build_app(url: str, manifests: dict | None = None, concurrency: int = 4, timeout: float = 120.0,
              title: str = "fewstep: few-step image generation"):
    """The Gradio Blocks app (queued) talking to the Triton server at gRPC `url`."""
    import gradio as gr

    backend = Backend(url, dict(manifests or {}), timeout)

    def _label(meta: ModelMeta, label):
        if not meta.num_classes:
            return None
        return int(label) if label not in (None, "") else 0

    def _gamma(meta: ModelMeta, gamma):
        return float(gamma) if gamma_applies(meta) and gamma is not None else None

    def _seed(seed, randomize) -> int:
        if randomize or seed is None:
            return random.randint(0, SEED_MAX)
        return int(seed)

    def _controls(meta: ModelMeta | None):
        """Updates of (steps, gamma, class label, compare gamma, compare label, info)."""
        if meta is None:
            return (gr.update(), gr.update(visible=False), gr.update(visible=False),
                    gr.update(visible=False), gr.update(visible=False), "")
        names = class_names(meta, backend.manifests.get(meta.name))
        choices = [(f"{i}: {n}", i) for i, n in enumerate(names)]
        g = gamma_applies(meta)
        return (gr.update(minimum=1, maximum=meta.max_steps, value=min(meta.default_steps, meta.max_steps)),
                gr.update(visible=g, value=meta.gamma),
                gr.update(visible=bool(meta.num_classes), choices=choices, value=0 if meta.num_classes else None),
                gr.update(visible=g, value=meta.gamma),
                gr.update(visible=bool(meta.num_classes), choices=choices, value=0 if meta.num_classes else None),
                model_info(meta, backend.manifests.get(meta.name)))

    # -- handlers --
    def list_models():
        """The image models the server offers (its repository index; 2-D models are left out)."""
        try:
            metas, skipped = backend.models()
        except Exception as e:  # unreachable, or a broken server
            return (gr.update(choices=[], value=None), describe_error(e, url, "listing the models"),
                    *_controls(None))
        if not metas:
            msg = f"⚠️ **The server at `{url}` serves no image model.**"
            return (gr.update(choices=[], value=None), msg, *_controls(None))
        names = [m.name for m in metas]
        msg = ""
        if skipped:
            msg = f"2-D models on this server ({', '.join(skipped)}) are not shown: use `fewstep generate`."
        return (gr.update(choices=names, value=names[0]), msg, *_controls(metas[0]))

    def select_model(name):
        if not name:
            return ("", *_controls(None))
        try:
            return ("", *_controls(backend.meta(name)))
        except Exception as e:
            return (describe_error(e, url), *_controls(None))

    def no_model(doing: str) -> str:
        try:
            names = [m.name for m in backend.models()[0]]
        except Exception as e:
            return describe_error(e, url, doing)
        return "⚠️ **No model selected.** " + (f"This server has: {', '.join(names)} (press ↻)." if names
                                                else f"The server at `{url}` serves no image model.")

    def generate(model, steps, seed, randomize, num, gamma, label, preview):
        """Generate `num` images (seeds seed .. seed+num-1) with `steps` sampler steps.

        Yields (gallery, preview image, latency text, status, seed used)."""
        skip = gr.update()
        if not model:
            yield skip, skip, "", no_model("generating"), skip
            return
        try:
            meta = backend.meta(model)
        except Exception as e:
            yield [], None, "", describe_error(e, url, "generating"), skip
            return
        s0 = _seed(seed, randomize)
        n = int(num)
        if not 1 <= n <= MAX_IMAGES:
            yield skip, skip, "", f"⚠️ **Number of images must be in [1, {MAX_IMAGES}], got {num}**", s0
            return
        steps = int(steps)
        seeds = list(range(s0, s0 + n))
        lab, gam = _label(meta, label), _gamma(meta, gamma)
        result: dict = {}

        def run():
            try:
                result["images"], result["latency"] = backend.generate(model, seeds, steps, lab, gam)
            except Exception as e:
                result["error"] = e

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        streamed = False
        if preview and steps > 1:
            # live previews of the first image through <name>_stream, while the batch runs
            q: queue.Queue = queue.Queue()

            def previews():
                try:
                    for step, img in backend.stream(model, s0, steps, lab, gam):
                        q.put((step, img))
                except Exception as e:
                    q.put(e)
                q.put(None)

            threading.Thread(target=previews, daemon=True).start()
            while True:
                item = q.get()
                if item is None or isinstance(item, Exception):
                    break
                step, img = item
                streamed = True
                yield (skip, display_images(img)[0], f"preview: step {step} of {steps} …", "", s0)
        worker.join()
        if "error" in result:
            yield [], skip, "", describe_error(result["error"], url, "generating"), s0
            return
        shown = display_images(result["images"])
        gallery = [(img, f"seed {s}") for img, s in zip(shown, seeds)]
        lat = (f"**Latency: {format_latency(result['latency'])}** for {n} image{'s' if n > 1 else ''} "
               f"at **{steps} step{'s' if steps > 1 else ''}** (seeds {s0}…{s0 + n - 1}, one gRPC request)")
        if streamed:
            lat += "  \n(the live preview stream ran alongside; untick it for a clean latency)"
        yield gallery, (shown[0] if streamed else None), lat, "", s0

    def compare(model, seed, randomize, gamma, label):
        """One seed at 1, 2, 4 and 8 steps (those the model allows), each request timed alone.

        Yields (gallery with captions, table, status, seed used)."""
        if not model:
            yield [], "", no_model("comparing"), gr.update()
            return
        try:
            meta = backend.meta(model)
        except Exception as e:
            yield [], "", describe_error(e, url, "comparing"), gr.update()
            return
        s0 = _seed(seed, randomize)
        lab, gam = _label(meta, label), _gamma(meta, gamma)
        gallery, rows = [], []
        for k in [k for k in COMPARE_STEPS if k <= meta.max_steps]:
            try:
                images, dt = backend.generate(model, [s0], k, lab, gam)
            except Exception as e:
                yield gallery, _table(rows), describe_error(e, url, "comparing"), s0
                return
            gallery.append((display_images(images)[0], f"{k} step{'s' if k > 1 else ''} · {format_latency(dt)}"))
            rows.append((k, dt))
            yield gallery, _table(rows), "", s0

    def _table(rows) -> str:
        if not rows:
            return ""
        head = "| steps | " + " | ".join(str(k) for k, _ in rows) + " |\n"
        sep = "|---|" + "---|" * len(rows) + "\n"
        return head + sep + "| latency | " + " | ".join(format_latency(dt) for _, dt in rows) + " |"

    try:
        initial = [m.name for m in backend.models()[0]]
    except Exception:  # unreachable now: the page says so when it loads
        initial = []

    # -- layout --
    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"## {title}\nEvery image is generated by NVIDIA Triton Inference Server at `{url}` over gRPC "
                    f"(the model's `_jump` / `_sampler` / `_stream` models); this page only shows them.")
        status = gr.Markdown("", elem_id="fewstep-status")
        with gr.Row():
            # choices: what the server had when the app was built (each page load asks again);
            # any name is accepted (API callers), the server answers for an unknown one
            model = gr.Dropdown(label="Model", choices=initial, value=initial[0] if initial else None,
                                elem_id="fewstep-model", scale=3, allow_custom_value=True)
            refresh = gr.Button("↻ Reconnect / refresh models", elem_id="fewstep-refresh", scale=1)
        info = gr.Markdown("", elem_id="fewstep-model-info")
        with gr.Tabs():
            with gr.Tab("Generate", id="generate"):
                with gr.Row():
                    with gr.Column(scale=1, min_width=280):
                        steps = gr.Slider(1, 64, value=4, step=1, label="Steps", elem_id="fewstep-steps")
                        with gr.Row():
                            seed = gr.Number(value=0, precision=0, minimum=0, maximum=SEED_MAX, label="Seed",
                                             elem_id="fewstep-seed")
                            randomize = gr.Checkbox(value=False, label="Randomize seed", elem_id="fewstep-randomize")
                        num = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="Number of images",
                                        elem_id="fewstep-num")
                        gamma = gr.Slider(0.0, 1.0, value=0.0, step=0.05, visible=False,
                                          label="Gamma (stochasticity: 0 = deterministic)", elem_id="fewstep-gamma")
                        label = gr.Dropdown(choices=[], value=None, visible=False, label="Class label",
                                            elem_id="fewstep-label")
                        preview = gr.Checkbox(value=True, label="Live previews (the streaming model)",
                                              elem_id="fewstep-preview")
                        go = gr.Button("Generate", variant="primary", elem_id="fewstep-generate")
                        live = gr.Image(label="Live preview", type="numpy", format="png", height=180,
                                        interactive=False, elem_id="fewstep-live")
                    with gr.Column(scale=2):
                        latency = gr.Markdown("", elem_id="fewstep-latency")
                        gallery = gr.Gallery(label="Images", columns=4, format="png", object_fit="contain",
                                             height="auto", elem_id="fewstep-gallery", interactive=False)
            with gr.Tab("Compare steps", id="compare"):
                gr.Markdown("One seed at 1, 2, 4 and 8 steps, side by side; each is its own request, timed alone.")
                with gr.Row():
                    c_seed = gr.Number(value=0, precision=0, minimum=0, maximum=SEED_MAX, label="Seed",
                                       elem_id="fewstep-compare-seed")
                    c_randomize = gr.Checkbox(value=False, label="Randomize seed")
                    c_gamma = gr.Slider(0.0, 1.0, value=0.0, step=0.05, visible=False, label="Gamma")
                    c_label = gr.Dropdown(choices=[], value=None, visible=False, label="Class label")
                c_go = gr.Button("Compare", variant="primary", elem_id="fewstep-compare")
                c_table = gr.Markdown("", elem_id="fewstep-compare-table")
                c_gallery = gr.Gallery(label="1, 2, 4, 8 steps", columns=4, format="png", object_fit="contain",
                                       height="auto", elem_id="fewstep-compare-gallery", interactive=False)

        controls = [steps, gamma, label, c_gamma, c_label, info]
        app.load(list_models, None, [model, status, *controls], api_name="models")
        refresh.click(list_models, None, [model, status, *controls], api_visibility="private")
        model.input(select_model, model, [status, *controls], api_visibility="private")
        go.click(generate, [model, steps, seed, randomize, num, gamma, label, preview],
                 [gallery, live, latency, status, seed], api_name="generate")
        c_go.click(compare, [model, c_seed, c_randomize, c_gamma, c_label], [c_gallery, c_table, status, c_seed],
                   api_name="compare")
    app.queue(default_concurrency_limit=concurrency, max_size=64)
    app._fewstep_backend = backend
    return app


def launch(app, host: str = "127.0.0.1", port: int | None = 7860, quiet: bool = True):
    """Start the page without blocking; returns its local URL."""
    import gradio as gr  # noqa: F401

    app.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=True, quiet=quiet,
               show_error=True, ssr_mode=False, inbrowser=False, css=CSS, footer_links=["api"])
    return app.local_url
