"""The page's API for programs (`gradio_client`): named, typed endpoints returning plain data.

    from gradio_client import Client
    c = Client("http://127.0.0.1:7860/")
    c.predict(api_name="/models")                        # [{"name": "cud_fmnist", ...}, ...]
    r = c.predict("cud_fmnist", steps=1, seed=0, num_images=4, api_name="/generate")
    r["images"][0]["png_base64"]                         # the image as PNG bytes, base64
    c.predict("cd_fmnist", seed=7, api_name="/compare")  # one seed at the counts the page compares

Arguments are checked before anything is sent (`demo.checks.check_request`): a class label only
for class-conditional models, a gamma only where the sampler uses it, nothing rounded or
clamped. A refused or failed request raises `gradio_client.exceptions.AppError` with a
one-line message; the page's log gets no traceback for it.

No `from __future__ import annotations` here: Gradio reads the return types from the live
annotations to type the endpoints.
"""
import base64
import time

from fewstep.demo.backend import Backend
from fewstep.demo.checks import (MAX_IMAGES, BadInput, check_request, class_names, compare_steps, describe_error,
                                 gamma_applies, gamma_value, steps_note)
from fewstep.serving.client import ModelMeta
from fewstep.serving.protocol import encode_png


def model_data(meta: ModelMeta, manifest: dict | None = None) -> dict:
    """A served model as plain data."""
    q = meta.quality
    return {
        "name": meta.name,
        "method": meta.method,
        "shape": list(meta.shape),
        "num_classes": meta.num_classes,
        "class_names": class_names(meta, manifest) if meta.num_classes else [],
        "max_steps": meta.max_steps,
        "default_steps": meta.default_steps,
        "recommended_steps": list(meta.made_for),
        "max_images": min(MAX_IMAGES, meta.max_batch),
        "sampler": ("consistency" if meta.jump_lands == "end" else "gamma" if gamma_applies(meta)
                    else "deterministic"),
        "default_gamma": meta.gamma,
        "quality": None if not q else {
            "metric": q.get("metric"), "samples": q.get("num"),
            "by_steps": [{"steps": k, "value": v} for k, v in q["by_steps"].items()]},
    }


def _png(img) -> str:
    return base64.b64encode(encode_png(img)).decode("ascii")


def add_api(backend: Backend) -> None:
    """Register the endpoints on the Blocks being built (call inside its `with` block)."""
    import gradio as gr

    url = backend.url

    def fail(err: Exception, doing: str):
        # gr.Error reaches the client as AppError with this message; no traceback in the log
        raise gr.Error(describe_error(err, url, doing, markdown=False), print_exception=False)

    def meta_of(model: str, doing: str) -> ModelMeta:
        try:
            return backend.meta(model)
        except Exception as e:
            fail(e, doing)

    def models() -> list[dict]:
        """The image models the server offers (2-D models are left out): name, method, shape,
        classes, step counts (max, default, recommended), sampler kind and eval figures by steps."""
        try:
            metas, _ = backend.models()
        except Exception as e:
            fail(e, "listing the models")
        return [model_data(m, backend.manifests.get(m.name)) for m in metas]

    def generate(model: str, steps: int | None = None, seed: int = 0, num_images: int = 1,
                 class_label: int | None = None, gamma: float | None = None) -> dict:
        """Generate num_images images (seeds seed .. seed+num_images-1) in one request to the server.

        Args:
            model: a model name from /models
            steps: sampler steps (default: the model's default)
            seed: the first seed; image i uses seed + i
            num_images: how many images, 1 to 16
            class_label: class-conditional models only
            gamma: sampler stochasticity in [0, 1], only for samplers that use it
        Returns:
            model, steps, seeds, class_label, gamma, latency_ms, server, note (what the model's
            manifest says about this step count), image_shape [H, W, C], images [{seed, png_base64}]
        """
        meta = meta_of(model, "generating")
        try:
            req = check_request(meta, steps, seed, num_images, class_label, gamma)
            t0 = time.perf_counter()
            images = backend.generate(model, req.seeds, req.steps, req.label, req.gamma)[0]
            latency = time.perf_counter() - t0
        except Exception as e:
            fail(e, "generating")
        return {"model": model, "steps": req.steps, "seeds": req.seeds, "class_label": req.label,
                "gamma": req.gamma, "latency_ms": round(latency * 1e3, 3), "server": url,
                "note": steps_note(meta, req.steps), "image_shape": list(images.shape[1:]),
                "images": [{"seed": s, "png_base64": _png(img)} for s, img in zip(req.seeds, images)]}

    def compare(model: str, seed: int = 0, class_label: int | None = None, gamma: float | None = None) -> dict:
        """One seed at each step count the page compares (those the model was made for and those
        it was evaluated at), each its own request, timed alone.

        Args:
            model: a model name from /models
            seed: the seed of every image
            class_label: class-conditional models only
            gamma: sampler stochasticity in [0, 1], only for samplers that use it (sent at the
                step counts where it changes something)
        Returns:
            model, seed, server, results [{steps, latency_ms, quality, made_for, png_base64}]
        """
        meta = meta_of(model, "comparing")
        q = (meta.quality or {}).get("by_steps") or {}
        try:
            req = check_request(meta, None, seed, 1, class_label)
            if gamma is not None:
                gamma = gamma_value(gamma)
                if meta.jump_lands == "end":
                    raise BadInput(f"gamma: {meta.gamma_unused(meta.max_steps)}; send no gamma")
            results = []
            for k in compare_steps(meta):
                images, dt = backend.generate(model, req.seeds, k, req.label,
                                              gamma if meta.gamma_unused(k) is None else None)
                results.append({"steps": k, "latency_ms": round(dt * 1e3, 3), "quality": q.get(k),
                                "made_for": k in meta.made_for, "png_base64": _png(images[0])})
        except Exception as e:
            fail(e, "comparing")
        return {"model": model, "seed": req.seeds[0], "server": url, "results": results}

    gr.api(models, api_name="models")
    gr.api(generate, api_name="generate")
    gr.api(compare, api_name="compare")
