"""Clients of a fewstep Triton server, on `tritonclient.grpc` (sync) and its asyncio twin.

    from serving.client import Client
    with Client("127.0.0.1:8001") as c:
        images = c.generate("fmnist", seeds=[0, 1, 2], steps=4)      # uint8 [3, H, W, C]
        for step, preview in c.stream("fmnist", seed=0, steps=4):   # one preview per step
            ...

    from serving.client import AsyncClient
    async with AsyncClient("127.0.0.1:8001") as c:
        images = await c.generate("fmnist", seeds=[0], steps=1)

TLS: `Client("host:8001", ssl=True, root_certificates="ca.pem")` (the CA, or the
self-signed server certificate, that the server's certificate is checked against;
without it, the system's trusted roots).

Every failure is a `ServingError` with the gRPC status (`code`, e.g. "INVALID_ARGUMENT")
and the server's message, which names the bad field and its allowed range.
"""
from __future__ import annotations

import json
import queue
from dataclasses import dataclass

import numpy as np

STATUS_PREFIX = "StatusCode."


class ServingError(Exception):
    """A request the server refused or could not serve."""

    def __init__(self, code: str, message: str):
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message


def _wrap(e) -> ServingError:
    status = (e.status() if hasattr(e, "status") else None) or "UNKNOWN"
    code = str(status)
    if code.startswith(STATUS_PREFIX):
        code = code[len(STATUS_PREFIX):]
    msg = e.message() if hasattr(e, "message") else str(e)
    return ServingError(code, str(msg))


def _tls_kwargs(ssl: bool, root_certificates) -> dict:
    """InferenceServerClient keyword arguments for TLS (root_certificates implies ssl)."""
    if root_certificates is not None:
        from pathlib import Path

        if not Path(root_certificates).is_file():
            raise ServingError("INVALID_ARGUMENT", f"TLS root certificate {root_certificates}: no such file")
        return {"ssl": True, "root_certificates": str(root_certificates)}
    return {"ssl": True} if ssl else {}


def admin_headers_for(url: str) -> dict:
    """The admin key of a server this user launched on this host (serving.launcher keeps it
    in a 0600 file): it unlocks the restricted model-repository protocol for models()."""
    from serving.launcher import GRPC_ADMIN_HEADER, read_admin_key

    host, _, port = url.rpartition(":")
    if not port.isdigit() or host.strip("[]") not in ("127.0.0.1", "localhost", "::1", "0.0.0.0", ""):
        return {}
    key = read_admin_key(int(port))
    return {GRPC_ADMIN_HEADER: key} if key else {}


def _unknown(model: str, err: ServingError, names: list[str]) -> ServingError:
    return ServingError(err.code, f"model: unknown model '{model}' (this server has: {', '.join(names) or 'none'})")


@dataclass(frozen=True)
class ModelMeta:
    """What a client needs to know about a served model (from its ensemble's config)."""
    name: str
    shape: tuple            # [C, H, W] or [D]
    num_classes: int
    max_steps: int
    default_steps: int
    max_batch: int
    gamma: float
    outputs: tuple
    method: str = ""        # the method that trained it (manifest), e.g. "cud"
    jump_lands: str = "s"   # "end": a consistency model, which re-noises after every jump
    recommended_steps: tuple = ()  # the step counts it was made for (manifest); () = (default_steps,)
    quality: dict | None = None    # {"metric", "num", "by_steps": {steps: value}}: eval figures, lower is better

    @property
    def is_image(self) -> bool:
        return len(self.shape) == 3

    @property
    def made_for(self) -> tuple:
        """The step counts the model was made for (its default step count when the server does not say)."""
        return tuple(self.recommended_steps) or (self.default_steps,)

    def gamma_unused(self, steps: int) -> str | None:
        """Why a gamma sent with `steps` steps would change nothing (None when it is used)."""
        if self.jump_lands == "end":
            return (f"{self.name} is a consistency model: its sampler always re-noises after a jump "
                    f"(gamma is 1), so gamma does not apply")
        if steps == 1:
            return "gamma has no effect at 1 step (the one jump lands at the end; nothing is re-noised)"
        return None

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelMeta":
        p = {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
        if "image_shape" not in p:
            raise ServingError("INVALID_ARGUMENT", f"model '{cfg.get('name')}' is not a fewstep model "
                                                   f"(call the ensemble, not its parts)")
        return cls(name=cfg["name"], shape=tuple(json.loads(p["image_shape"])), num_classes=int(p["num_classes"]),
                   max_steps=int(p["max_steps"]), default_steps=int(p["default_steps"]),
                   max_batch=int(cfg.get("max_batch_size", 0)), gamma=float(p.get("gamma", 0.0)),
                   outputs=tuple(o["name"] for o in cfg.get("output", [])),
                   method=p.get("method", ""), jump_lands=p.get("jump_lands", "s") or "s",
                   recommended_steps=tuple(int(k) for k in json.loads(p.get("recommended_steps") or "[]")),
                   quality=_quality(p.get("quality")))


def _quality(text: str | None) -> dict | None:
    """The `quality` config parameter (JSON; step counts are object keys, so strings there)."""
    q = json.loads(text) if text else None
    if not isinstance(q, dict) or not isinstance(q.get("by_steps"), dict):
        return None
    return {**q, "by_steps": {int(k): float(v) for k, v in q["by_steps"].items()}}


def _as_list(v, n: int, name: str):
    if v is None:
        return None
    if np.isscalar(v):
        return [v] * n
    v = list(v)
    if len(v) != n:
        raise ValueError(f"{name}: {len(v)} values for {n} seeds")
    return v


def build_inputs(grpc, seeds, steps, class_labels=None, gamma=None, batched: bool = True) -> list:
    """InferInputs for `<name>` (batched: [K, 1] each) or `<name>_stream` ([1])."""
    seeds = [int(s) for s in (seeds if not np.isscalar(seeds) else [seeds])]
    n = len(seeds)
    from serving.protocol import INPUTS

    cols = {"seed": seeds, "steps": _as_list(steps, n, "steps")}
    if class_labels is not None:
        cols["class_label"] = _as_list(class_labels, n, "class_label")
    if gamma is not None:
        cols["gamma"] = _as_list(gamma, n, "gamma")
    inputs = []
    for name, values in cols.items():
        triton_dtype, np_dtype = INPUTS[name]
        arr = np.array(values, dtype=np_dtype)  # out of range raises OverflowError, never wraps
        arr = arr.reshape(n, 1) if batched else arr.reshape(1)
        inp = grpc.InferInput(name, list(arr.shape), triton_dtype[len("TYPE_"):])
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return inputs


def channel_options(extra) -> list | None:
    """gRPC channel arguments: tritonclient's defaults with `extra` ({key: value} or (key, value)
    pairs) on top, or None (tritonclient's own defaults) when there is nothing extra.
    tritonclient drops its defaults (message size limits, keepalive) as soon as any argument
    is given, hence the merge. Example: {"grpc.lb_policy_name": "round_robin"} with a
    `dns:///<headless service>:8001` url spreads requests over every pod (docs/deploy.md)."""
    if not extra:
        return None
    import tritonclient.grpc as grpc

    ka = grpc.KeepAliveOptions()
    opts = {"grpc.max_send_message_length": grpc.MAX_GRPC_MESSAGE_SIZE,
            "grpc.max_receive_message_length": grpc.MAX_GRPC_MESSAGE_SIZE,
            "grpc.keepalive_time_ms": ka.keepalive_time_ms,
            "grpc.keepalive_timeout_ms": ka.keepalive_timeout_ms,
            "grpc.keepalive_permit_without_calls": ka.keepalive_permit_without_calls,
            "grpc.http2.max_pings_without_data": ka.http2_max_pings_without_data}
    opts.update(dict(extra))
    return list(opts.items())


def _outputs(grpc, names):
    return [grpc.InferRequestedOutput(n) for n in names]


def _result(result, names) -> dict:
    out = {}
    for n in names:
        arr = result.as_numpy(n)
        if arr is None:
            continue
        if n == "png":
            arr = [bytes(b) for b in arr.reshape(-1)]
        out[n] = arr
    return out


def _stream_error(e) -> ServingError:
    """gRPC streaming carries an error message but no status code: the sampler's own
    validation messages ("<input>: must be ...") are recognised as INVALID_ARGUMENT."""
    err = _wrap(e)
    if err.code in ("UNKNOWN", "None"):
        head = err.message.split(":", 1)[0].strip()
        if head.split(" ")[-1] in ("seed", "steps", "class_label", "gamma") or "inference input" in err.message:
            return ServingError("INVALID_ARGUMENT", err.message)
    return err


def _is_final(result) -> bool:
    params = result.get_response().parameters
    return "triton_final_response" in params and params["triton_final_response"].bool_param


def _stream_item(result):
    step = result.as_numpy("step")
    if step is None:
        return None
    img = result.as_numpy("image")
    return int(step.reshape(-1)[0]), (img if img is not None else result.as_numpy("sample"))


class Client:
    """Synchronous client (thread-safe for generate(); stream() opens its own connection).
    channel_args: extra gRPC channel arguments (see `channel_options`)."""

    def __init__(self, url: str = "127.0.0.1:8001", timeout: float | None = 120.0, ssl: bool = False,
                 root_certificates=None, channel_args=None):
        import tritonclient.grpc as grpc

        self._grpc = grpc
        self.url = url
        self.timeout = timeout
        self._tls = _tls_kwargs(ssl, root_certificates)
        self.admin_headers = admin_headers_for(url)
        self.channel_args = channel_options(channel_args)
        self._client = grpc.InferenceServerClient(url, channel_args=self.channel_args, **self._tls)
        self._meta: dict[str, ModelMeta] = {}

    def close(self) -> None:
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- server and models ---------------------------------------------------------------------
    def ready(self, model: str | None = None) -> bool:
        try:
            if model is None:
                return bool(self._client.is_server_ready())
            return bool(self._client.is_model_ready(model))
        except self._grpc_error() as e:
            if "unavailable" in str(e).lower() or "failed to connect" in str(e).lower():
                return False
            raise _wrap(e) from None

    def _grpc_error(self):
        from tritonclient.utils import InferenceServerException
        return InferenceServerException

    def models(self) -> list[str]:
        """Names clients can call: the ensembles (each has `<name>_sampler` beside it)."""
        try:
            index = self._client.get_model_repository_index(headers=self.admin_headers,
                                                            as_json=True).get("models", [])
        except self._grpc_error() as e:
            raise _wrap(e) from None
        names = {m["name"] for m in index}
        return sorted(n for n in names if n + "_sampler" in names)

    def meta(self, model: str) -> ModelMeta:
        if model not in self._meta:
            try:
                cfg = self._client.get_model_config(model, as_json=True)["config"]
            except self._grpc_error() as e:
                err = _wrap(e)
                if "unknown model" in err.message.lower() or err.code == "NOT_FOUND":
                    raise _unknown(model, err, self.models()) from None
                raise err from None
            self._meta[model] = ModelMeta.from_config(cfg)
        return self._meta[model]

    # --- inference ------------------------------------------------------------------------------
    def infer(self, model: str, seeds, steps, class_labels=None, gamma=None, outputs=("image",)) -> dict:
        """One request of len(seeds) images; returns {output name: array} (png: list of bytes)."""
        inputs = build_inputs(self._grpc, seeds, steps, class_labels, gamma)
        try:
            result = self._client.infer(model, inputs, outputs=_outputs(self._grpc, outputs),
                                        client_timeout=self.timeout)
        except self._grpc_error() as e:
            err = _wrap(e)
            if err.code == "NOT_FOUND":
                raise _unknown(model, err, self.models()) from None
            raise err from None
        return _result(result, outputs)

    def generate(self, model: str, seeds, steps=None, class_labels=None, gamma=None) -> np.ndarray:
        """uint8 images [K, H, W, C] (float samples [K, D] for 2-D models), K = len(seeds)."""
        meta = self.meta(model)
        steps = meta.default_steps if steps is None else steps
        out = "image" if meta.is_image else "sample"
        return self.infer(model, seeds, steps, class_labels, gamma, outputs=(out,))[out]

    def generate_png(self, model: str, seeds, steps=None, class_labels=None, gamma=None) -> list[bytes]:
        steps = self.meta(model).default_steps if steps is None else steps
        return self.infer(model, seeds, steps, class_labels, gamma, outputs=("png",))["png"]

    def stream(self, model: str, seed: int, steps=None, class_label=None, gamma=None):
        """Yields (step, preview) after every sampler step; the last one is the final image."""
        steps = self.meta(model).default_steps if steps is None else steps
        name = model + "_stream"
        inputs = build_inputs(self._grpc, [seed], steps, None if class_label is None else [class_label],
                              None if gamma is None else [gamma], batched=False)
        q: queue.Queue = queue.Queue()
        client = self._grpc.InferenceServerClient(self.url, channel_args=self.channel_args, **self._tls)
        try:
            client.start_stream(callback=lambda result, error: q.put((result, error)),
                                stream_timeout=self.timeout)
            client.async_stream_infer(name, inputs, enable_empty_final_response=True)
            while True:
                try:
                    result, error = q.get(timeout=self.timeout)
                except queue.Empty:
                    raise ServingError("DEADLINE_EXCEEDED", f"{name}: no response in {self.timeout} s") from None
                if error is not None:
                    raise _stream_error(error)
                item = _stream_item(result)
                if item is not None:
                    yield item
                if _is_final(result):
                    return
        finally:
            client.stop_stream(cancel_requests=True)
            client.close()


class AsyncClient:
    """asyncio client (tritonclient.grpc.aio): the same calls, awaited. channel_args as for Client."""

    def __init__(self, url: str = "127.0.0.1:8001", timeout: float | None = 120.0, ssl: bool = False,
                 root_certificates=None, channel_args=None):
        import tritonclient.grpc.aio as aio

        self._grpc = aio
        self.url = url
        self.timeout = timeout
        self.channel_args = channel_options(channel_args)
        self._client = aio.InferenceServerClient(url, channel_args=self.channel_args,
                                                 **_tls_kwargs(ssl, root_certificates))
        self.admin_headers = admin_headers_for(url)
        self._meta: dict[str, ModelMeta] = {}

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    @staticmethod
    def _error():
        from tritonclient.utils import InferenceServerException
        return InferenceServerException

    async def ready(self, model: str | None = None) -> bool:
        try:
            if model is None:
                return bool(await self._client.is_server_ready())
            return bool(await self._client.is_model_ready(model))
        except self._error():
            return False

    async def models(self) -> list[str]:
        try:
            index = (await self._client.get_model_repository_index(headers=self.admin_headers,
                                                                   as_json=True)).get("models", [])
        except self._error() as e:
            raise _wrap(e) from None
        names = {m["name"] for m in index}
        return sorted(n for n in names if n + "_sampler" in names)

    async def meta(self, model: str) -> ModelMeta:
        if model not in self._meta:
            try:
                cfg = (await self._client.get_model_config(model, as_json=True))["config"]
            except self._error() as e:
                err = _wrap(e)
                if "unknown model" in err.message.lower() or err.code == "NOT_FOUND":
                    raise _unknown(model, err, await self.models()) from None
                raise err from None
            self._meta[model] = ModelMeta.from_config(cfg)
        return self._meta[model]

    async def infer(self, model: str, seeds, steps, class_labels=None, gamma=None, outputs=("image",)) -> dict:
        inputs = build_inputs(self._grpc, seeds, steps, class_labels, gamma)
        try:
            result = await self._client.infer(model, inputs, outputs=_outputs(self._grpc, outputs),
                                              client_timeout=self.timeout)
        except self._error() as e:
            err = _wrap(e)
            if err.code == "NOT_FOUND":
                raise _unknown(model, err, await self.models()) from None
            raise err from None
        return _result(result, outputs)

    async def generate(self, model: str, seeds, steps=None, class_labels=None, gamma=None) -> np.ndarray:
        meta = await self.meta(model)
        steps = meta.default_steps if steps is None else steps
        out = "image" if meta.is_image else "sample"
        return (await self.infer(model, seeds, steps, class_labels, gamma, outputs=(out,)))[out]

    async def stream(self, model: str, seed: int, steps=None, class_label=None, gamma=None):
        """Async iterator of (step, preview); the last one is the final image."""
        steps = (await self.meta(model)).default_steps if steps is None else steps
        name = model + "_stream"
        inputs = build_inputs(self._grpc, [seed], steps, None if class_label is None else [class_label],
                              None if gamma is None else [gamma], batched=False)

        async def requests():
            yield {"model_name": name, "inputs": inputs, "enable_empty_final_response": True}

        responses = self._client.stream_infer(requests(), stream_timeout=self.timeout)
        try:
            async for result, error in responses:
                if error is not None:
                    raise _stream_error(error)
                item = _stream_item(result)
                if item is not None:
                    yield item
                if _is_final(result):
                    return
        finally:
            if hasattr(responses, "cancel"):
                responses.cancel()
