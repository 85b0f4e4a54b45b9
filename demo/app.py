"""The Gradio page of `fewstep demo`: a client of Triton over gRPC, and nothing else.

No model code runs in this process: every image comes from the server through
`serving.client` (the `<name>` ensemble for batches, `<name>_stream` for live previews).

    from fewstep.demo.app import build_app
    app = build_app("127.0.0.1:8001")          # gr.Blocks, queued
    app.launch(server_name="127.0.0.1", server_port=7860)

Programs use the typed API endpoints of `demo/api.py` (`/models`, `/generate`, `/compare`,
plain data, through `gradio_client`); the page's own events are not API endpoints. The page
accepts no file uploads.
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

import dataclasses  # noqa: E402
import queue  # noqa: E402
import random  # noqa: E402
import threading  # noqa: E402

from fewstep.demo.api import add_api  # noqa: E402
from fewstep.demo.backend import Backend, retry_note, retrying_note  # noqa: E402,F401  (retry_note: shown text)
from fewstep.demo.checks import (MAX_IMAGES, SEED_MAX, Request, check_request, class_names, extra_inputs,  # noqa: E402
                                 compare_steps, counts_text, describe_error, display_images, figure_text,
                                 format_latency, gamma_applies, gamma_value, metric_name, model_info, steps_note,
                                 steps_text)
from fewstep.serving.client import DEADLINE_S, ModelMeta  # noqa: E402
from fewstep.serving.launcher import free_port  # noqa: E402

CSS = """
#fewstep-status:empty { display: none; }
#fewstep-status p { margin: 0.2em 0; }
#fewstep-latency p { font-size: 1.05em; }
"""
UPLOAD_LIMIT = "1kb"  # the page takes no files; uploads are refused outright (NoUploads), this is a second fence


def steps_hint(meta: ModelMeta) -> str:
    return (f"{meta.name} was made for **{counts_text(meta.made_for)}** (default {meta.default_steps}); "
            f"it accepts 1–{meta.max_steps}.")


def compare_intro(meta: ModelMeta | None) -> str:
    if meta is None:
        return "One seed at several step counts, side by side; each is its own request, timed alone."
    what = "the counts it was made for"
    if meta.quality:
        what += f" and those its {metric_name(meta)} was measured at"
    return (f"One seed of **{meta.name}** at {counts_text(compare_steps(meta)).replace(' or ', ' and ')} ({what}), "
            f"side by side; each is its own request, timed alone.")


def compare_table(meta: ModelMeta, rows) -> str:
    """Markdown: per step count its latency, the manifest's quality figure, and whether the model was made for it."""
    if not rows:
        return ""
    q = (meta.quality or {}).get("by_steps") or {}
    head = "| steps | " + " | ".join(str(k) for k, _ in rows) + " |\n" + "|---|" + "---|" * len(rows) + "\n"
    lines = ["| latency | " + " | ".join(format_latency(dt) for _, dt in rows) + " |"]
    if q:
        lines.append(f"| {metric_name(meta)} ({meta.quality.get('num', '?')} samples) | "
                     + " | ".join(figure_text(q[k]) if k in q else "–" for k, _ in rows) + " |")
    lines.append("| made for | " + " | ".join("✓" if k in meta.made_for else "" for k, _ in rows) + " |")
    return head + "\n".join(lines)


def build_app(url: str, manifests: dict | None = None, concurrency: int = 4, timeout: float = DEADLINE_S,
              title: str = "fewstep: few-step image generation"):
    """The Gradio Blocks app (queued) talking to the Triton server at gRPC `url`."""
    import gradio as gr

    backend = Backend(url, dict(manifests or {}), timeout)
    cleared = ([], None, "", [], "")  # gallery, live preview, latency, compare gallery, compare table

    def _controls(meta: ModelMeta | None):
        """Updates of (steps, steps hint, gamma, class label, compare gamma, compare label, compare intro, info)."""
        if meta is None:
            hidden = gr.update(visible=False)
            return (gr.update(), "", hidden, hidden, hidden, hidden, compare_intro(None), "")
        names = class_names(meta, backend.manifests.get(meta.name))
        choices = [(f"{i}: {n}", i) for i, n in enumerate(names)]
        g = gamma_applies(meta)
        label = gr.update(visible=bool(meta.num_classes), choices=choices, value=0 if meta.num_classes else None)
        return (gr.update(value=meta.default_steps), steps_hint(meta), gr.update(visible=g, value=meta.gamma), label,
                gr.update(visible=g, value=meta.gamma), label, compare_intro(meta), model_info(meta))

    def _page_request(meta: ModelMeta, steps, seed, randomize, num, gamma, label, values=None) -> Request:
        """check_request for the page: a gamma is sent where the model's sampler uses it; values:
        the number boxes of the table's other inputs (the Generate tab's; Compare sends none)."""
        if randomize:
            seed = random.randint(0, SEED_MAX)
        req = check_request(meta, steps, seed, num, label if meta.num_classes else None, **(values or {}))
        if gamma_applies(meta) and meta.gamma_unused(req.steps) is None:
            req = dataclasses.replace(req, gamma=gamma_value(gamma))
        return req

    # -- handlers --
    def list_models():
        """The image models the server offers (its repository index; 2-D models are left out)."""
        try:
            metas, skipped = backend.models()
        except Exception as e:  # unreachable, or a broken server
            return (gr.update(choices=[], value=None), describe_error(e, url, "listing the models"),
                    *_controls(None), *cleared)
        if not metas:
            msg = f"⚠️ **The server at `{url}` serves no image model.**"
            return (gr.update(choices=[], value=None), msg, *_controls(None), *cleared)
        names = [m.name for m in metas]
        msg = ""
        if skipped:
            msg = f"2-D models on this server ({', '.join(skipped)}) are not shown: use `fewstep generate`."
        return (gr.update(choices=names, value=names[0]), msg, *_controls(metas[0]), *cleared)

    def select_model(name):
        """A model switch: its controls, and none of the previous model's results."""
        if not name:
            return ("", *_controls(None), *cleared)
        try:
            return ("", *_controls(backend.meta(name)), *cleared)
        except Exception as e:
            return (describe_error(e, url), *_controls(None), *cleared)

    def no_model(doing: str) -> str:
        try:
            names = [m.name for m in backend.models()[0]]
        except Exception as e:
            return describe_error(e, url, doing)
        return "⚠️ **No model selected.** " + (f"This server has: {', '.join(names)} (press ↻)." if names
                                                else f"The server at `{url}` serves no image model.")

    def generate(model, steps, seed, randomize, num, gamma, label, preview, *extra):
        """Generate `num` images (seeds seed .. seed+num-1) with `steps` sampler steps; extra:
        the values of the number boxes of the table's other inputs (`extra_inputs`).

        Yields (gallery, preview image, latency text, status, seed used)."""
        skip = gr.update()
        if not model:
            yield [], None, "", no_model("generating"), skip
            return
        try:
            meta = backend.meta(model)
            values = {inp.name: v for inp, v in zip(extras, extra)}
            req = _page_request(meta, steps, seed, randomize, num, gamma, label, values)
        except Exception as e:  # unreachable, or a value out of range: said, nothing sent
            yield [], None, "", describe_error(e, url, "generating"), skip
            return
        s0, n, steps = req.seeds[0], len(req.seeds), req.steps
        result: dict = {}
        retried: list = []

        def run():
            try:
                result["images"], result["latency"] = backend.generate(model, req.seeds, steps, req.label, req.gamma,
                                                                       retried, **req.values)
            except Exception as e:
                result["error"] = e

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        if preview:
            # live previews of the first image through <name>_stream while the batch runs: the
            # denoised estimate after each step (at 1 step, the image itself)
            q: queue.Queue = queue.Queue()

            def previews():
                try:
                    for step, img in backend.stream(model, s0, steps, req.label, req.gamma, **req.values):
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
                yield (skip, display_images(img)[0], f"preview: step {step} of {steps} …", "", s0)
        said = 0
        while worker.is_alive():  # the request may be riding through a restart: say so while it waits
            worker.join(0.5)
            if len(retried) > said:
                said = len(retried)
                yield skip, skip, "", retrying_note(retried, url, backend.timeout), s0
        if "error" in result:
            yield [], None, "", describe_error(result["error"], url, "generating"), s0
            return
        shown = display_images(result["images"])
        gallery = [(img, f"seed {s}") for img, s in zip(shown, req.seeds)]
        lat = (f"**{model}** · **Latency: {format_latency(result['latency'])}** for {n} image{'s' if n > 1 else ''} "
               f"at **{steps_text(steps)}** (seeds {s0}…{s0 + n - 1}, one gRPC request)")
        note = steps_note(meta, steps)
        if note:
            lat += f"  \n{note}"
        if preview:
            lat += "  \n(the live preview stream ran alongside; untick it for a clean latency)"
        if retried:
            lat += "  \n" + retry_note(retried)
        yield gallery, (shown[0] if preview else None), lat, "", s0

    def compare(model, seed, randomize, gamma, label):
        """One seed at the step counts of compare_steps, each request timed alone.

        Yields (gallery with captions, table, status, seed used)."""
        if not model:
            yield [], "", no_model("comparing"), gr.update()
            return
        try:
            meta = backend.meta(model)
            req = _page_request(meta, None, seed, randomize, 1, gamma, label)
            gam = gamma_value(gamma) if gamma_applies(meta) else None
        except Exception as e:
            yield [], "", describe_error(e, url, "comparing"), gr.update()
            return
        s0 = req.seeds[0]
        q = (meta.quality or {}).get("by_steps") or {}
        gallery, rows = [], []
        for k in compare_steps(meta):
            retried: list = []
            try:
                images, dt = backend.generate(model, req.seeds, k, req.label,
                                              gam if meta.gamma_unused(k) is None else None, retried)
            except Exception as e:
                yield gallery, compare_table(meta, rows), describe_error(e, url, "comparing"), s0
                return
            caption = (f"{steps_text(k)} · {format_latency(dt)}"
                       + (f" · {metric_name(meta)} {figure_text(q[k])}" if k in q else "")
                       + (" · made for" if k in meta.made_for else "")
                       + (f" · retried {len(retried)}x" if retried else ""))
            gallery.append((display_images(images)[0], caption))
            rows.append((k, dt))
            yield gallery, compare_table(meta, rows), "", s0

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
                        # number boxes, not sliders: a value out of range is said, never clamped
                        steps = gr.Number(value=1, step=1, label="Steps", elem_id="fewstep-steps")
                        steps_hint_md = gr.Markdown("", elem_id="fewstep-steps-hint")
                        with gr.Row():
                            seed = gr.Number(value=0, step=1, label="Seed", elem_id="fewstep-seed")
                            randomize = gr.Checkbox(value=False, label="Randomize seed", elem_id="fewstep-randomize")
                        num = gr.Number(value=4, step=1, label=f"Number of images (1–{MAX_IMAGES})",
                                        elem_id="fewstep-num")
                        gamma = gr.Number(value=0.0, step=0.05, visible=False, elem_id="fewstep-gamma",
                                          label="Gamma in [0, 1] (stochasticity: 0 = deterministic)")
                        label = gr.Dropdown(choices=[], value=None, visible=False, label="Class label",
                                            elem_id="fewstep-label")
                        extras = extra_inputs()  # the table's other inputs: a number box each
                        extra_boxes = [gr.Number(value=None, label=f"{inp.name}: {inp.what}",
                                                 elem_id=f"fewstep-input-{inp.name}") for inp in extras]
                        preview = gr.Checkbox(value=True, label="Live previews (the streaming model: the denoised "
                                                                "estimate after each step)", elem_id="fewstep-preview")
                        go = gr.Button("Generate", variant="primary", elem_id="fewstep-generate")
                        live = gr.Image(label="Live preview", type="numpy", format="png", height=180,
                                        interactive=False, elem_id="fewstep-live")
                    with gr.Column(scale=2):
                        latency = gr.Markdown("", elem_id="fewstep-latency")
                        gallery = gr.Gallery(label="Images", columns=4, format="png", object_fit="contain",
                                             height="auto", elem_id="fewstep-gallery", interactive=False)
            with gr.Tab("Compare steps", id="compare"):
                c_intro = gr.Markdown(compare_intro(None), elem_id="fewstep-compare-intro")
                with gr.Row():
                    c_seed = gr.Number(value=0, step=1, label="Seed", elem_id="fewstep-compare-seed")
                    c_randomize = gr.Checkbox(value=False, label="Randomize seed")
                    c_gamma = gr.Number(value=0.0, step=0.05, visible=False, label="Gamma in [0, 1]")
                    c_label = gr.Dropdown(choices=[], value=None, visible=False, label="Class label")
                c_go = gr.Button("Compare", variant="primary", elem_id="fewstep-compare")
                c_table = gr.Markdown("", elem_id="fewstep-compare-table")
                c_gallery = gr.Gallery(label="Steps compared", columns=4, format="png", object_fit="contain",
                                       height="auto", elem_id="fewstep-compare-gallery", interactive=False)

        # the page's own events (not API endpoints: programs use the typed ones of demo/api.py)
        private = {"api_visibility": "private"}
        controls = [steps, steps_hint_md, gamma, label, c_gamma, c_label, c_intro, info]
        results = [gallery, live, latency, c_gallery, c_table]
        gen_event = go.click(generate, [model, steps, seed, randomize, num, gamma, label, preview, *extra_boxes],
                             [gallery, live, latency, status, seed], api_name="page_generate", **private)
        cmp_event = c_go.click(compare, [model, c_seed, c_randomize, c_gamma, c_label],
                               [c_gallery, c_table, status, c_seed], api_name="page_compare", **private)
        running = [gen_event, cmp_event]  # a model switch stops them: no results of one model under another's name
        app.load(list_models, None, [model, status, *controls, *results], api_name="page_models", **private)
        refresh.click(list_models, None, [model, status, *controls, *results], cancels=running, **private)
        model.input(select_model, model, [status, *controls, *results], cancels=running, **private)
        preview.change(lambda on: gr.update(visible=bool(on)), preview, live, queue=False, **private)
        add_api(backend)
    app.queue(default_concurrency_limit=concurrency, max_size=64)
    app._fewstep_backend = backend
    return app


class NoUploads:
    """ASGI middleware: refuse Gradio's file-upload route before reading a byte of the body.
    The page takes no files, and an open upload route would store and serve back anything."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].rstrip("/").endswith("/upload"):
            body = b"uploads are disabled: this page takes no files\n"
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode()),
                                    (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def launch(app, host: str = "127.0.0.1", port: int | None = 7860, quiet: bool = True):
    """Start the page without blocking; returns its local URL. port 0: a free one (as for the
    server's ports; gradio would bind port 0 and then fail to reach its own page)."""
    import gradio as gr  # noqa: F401
    from starlette.middleware import Middleware

    if port == 0:
        port = free_port(host)

    app.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=True, quiet=quiet,
               show_error=True, ssr_mode=False, inbrowser=False, css=CSS, footer_links=["api"],
               max_file_size=UPLOAD_LIMIT, app_kwargs={"middleware": [Middleware(NoUploads)]})
    return app.local_url
