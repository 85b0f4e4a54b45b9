"""Clients of a fewstep Triton server, on `tritonclient.grpc` (sync) and its asyncio twin.

    from fewstep.serving.client import Client
    with Client("127.0.0.1:8001") as c:
        images = c.generate("fmnist", seeds=[0, 1, 2], steps=4)      # uint8 [3, H, W, C]
        for step, preview in c.stream("fmnist", seed=0, steps=4):   # one preview per step
            ...

    from fewstep.serving.client import AsyncClient
    async with AsyncClient("127.0.0.1:8001") as c:
        images = await c.generate("fmnist", seeds=[0], steps=1)

TLS: `Client("host:8001", ssl=True, root_certificates="ca.pem")` (the CA, or the
self-signed server certificate, that the server's certificate is checked against;
without it, the system's trusted roots).

Every failure is a `ServingError` with the gRPC status (`code`, e.g. "INVALID_ARGUMENT")
and the server's message, which names the bad field and its allowed range.

Retries: generation is deterministic per (model, seed, steps, gamma, class label), so a call
that failed with UNAVAILABLE (a server restarting, a connection lost), with INTERNAL "stub
process is not healthy" (a dead Python stub, before the server's watchdog restarts it) or
with a missed attempt deadline is sent again, with jittered exponential backoff, until the
call's deadline (`timeout`) is spent. INVALID_ARGUMENT, NOT_FOUND and every other error are
final at once. `retried=[]` given to a call collects one `ServingError` per retry.
"""
from __future__ import annotations

import asyncio
import queue
import random
import time
from dataclasses import dataclass

import numpy as np

from fewstep.serving.admin_key import GRPC_ADMIN_HEADER, read_admin_key
from fewstep.serving.protocol import INPUTS, InvalidInput, ModelMeta, is_input_error  # noqa: F401  (ModelMeta: part of this API)

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
    host, _, port = url.rpartition(":")
    if not port.isdigit() or host.strip("[]") not in ("127.0.0.1", "localhost", "::1", "0.0.0.0", ""):
        return {}
    key = read_admin_key(int(port))
    return {GRPC_ADMIN_HEADER: key} if key else {}


def _as_list(v, n: int, name: str):
    if v is None:
        return None
    if np.isscalar(v):
        return [v] * n
    v = list(v)
    if len(v) != n:
        raise ValueError(f"{name}: {len(v)} values for {n} seeds")
    return v


def build_inputs(grpc, seeds, steps=None, batched: bool = True, **inputs) -> list:
    """InferInputs for `<name>` (batched: [K, 1] each) or `<name>_stream` ([1]): one for each
    input of the request table (serving.protocol.INPUTS) given by its keyword (`Input.keyword`:
    seeds, steps, class_labels, gamma; or its name), of the table's dtype. None or left out:
    not sent (the server's default). A keyword the table does not name is refused here, in
    one line: never dropped."""
    seeds = [int(s) for s in (seeds if not np.isscalar(seeds) else [seeds])]
    n = len(seeds)
    given = {"seeds": seeds, "steps": steps, **inputs}
    cols = {}
    for name, inp in INPUTS.items():
        by_keyword, by_name = given.pop(inp.keyword, None), given.pop(name, None) if inp.keyword != name else None
        cols[name] = _as_list(by_name if by_keyword is None else by_keyword, n, name)
    if given:
        raise ServingError("INVALID_ARGUMENT", f"{sorted(given)[0]}: unknown input (inputs are "
                                               f"{', '.join(i.keyword for i in INPUTS.values())})")
    inputs = []
    for name, values in cols.items():
        if values is None:
            continue
        arr = np.array(values, dtype=INPUTS[name].numpy)  # out of range raises OverflowError, never wraps
        arr = arr.reshape(n, 1) if batched else arr.reshape(1)
        inp = grpc.InferInput(name, list(arr.shape), INPUTS[name].dtype)
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return inputs


def channel_options(extra=None) -> list:
    """gRPC channel arguments: tritonclient's defaults, a short reconnect backoff
    (RECONNECT_ARGS), and `extra` ({key: value} or (key, value) pairs) on top.
    tritonclient drops its defaults (message size limits, keepalive) as soon as any argument
    is given, hence the merge. Example: {"grpc.lb_policy_name": "round_robin"} with a
    `dns:///<headless service>:8001` url spreads requests over every pod (docs/deploy.md)."""
    import tritonclient.grpc as grpc

    ka = grpc.KeepAliveOptions()
    opts = {"grpc.max_send_message_length": grpc.MAX_GRPC_MESSAGE_SIZE,
            "grpc.max_receive_message_length": grpc.MAX_GRPC_MESSAGE_SIZE,
            "grpc.keepalive_time_ms": ka.keepalive_time_ms,
            "grpc.keepalive_timeout_ms": ka.keepalive_timeout_ms,
            "grpc.keepalive_permit_without_calls": ka.keepalive_permit_without_calls,
            "grpc.http2.max_pings_without_data": ka.http2_max_pings_without_data, **RECONNECT_ARGS}
    opts.update(dict(extra or {}))
    return list(opts.items())


def _stream_error(e) -> ServingError:
    """gRPC streaming carries an error's message but no status code: the request's validation
    errors (serving.protocol.is_input_error) are recognised as INVALID_ARGUMENT."""
    err = _wrap(e)
    if err.code in ("UNKNOWN", "None") and is_input_error(err.message):
        return ServingError("INVALID_ARGUMENT", err.message)
    return err


def _stream_step(result, error):
    """One streamed response -> ((step, preview) or None, whether it is the last)."""
    if error is not None:
        raise _stream_error(error)
    params = result.get_response().parameters
    final = "triton_final_response" in params and params["triton_final_response"].bool_param
    step = result.as_numpy("step")
    if step is None:
        return None, final
    img = result.as_numpy("image")
    return (int(step.reshape(-1)[0]), img if img is not None else result.as_numpy("sample")), final


# the default deadline of a call, retries included (Client, `fewstep generate`, the page): many
# times a restart of the server (docs/serving.md, "One restart policy": 4-8 s measured under load)
DEADLINE_S = 120.0


@dataclass(frozen=True)
class RetryPolicy:
    """How a call is sent again: waits of base_s * 2^n (at most cap_s), each scaled by a random
    factor in [0.5, 1] so that many clients do not come back in step, until the call's deadline.
    attempt_s: the deadline of one attempt (None: whatever is left of the call's deadline); a
    shorter one lets a request that a hung server swallowed be sent again in time."""
    base_s: float = 0.1
    cap_s: float = 1.0
    attempt_s: float | None = None
    max_tries: int | None = None  # None: until the deadline (10 tries for a client without one)

    def delay(self, retry: int, rng: random.Random) -> float:
        return min(self.cap_s, self.base_s * 2 ** retry) * rng.uniform(0.5, 1.0)


NO_RETRY = RetryPolicy(max_tries=1)


def retryable(err: ServingError) -> bool:
    """Transient failures, safe to send again (the answer is deterministic)."""
    if err.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
        return True
    return err.code == "INTERNAL" and "is not healthy" in err.message  # a dead stub, restart pending


# gRPC's channel reconnects after a lost server with its own backoff (1 s growing to 120 s by
# default): kept short, a restarted server is found again within a second
RECONNECT_ARGS = {"grpc.initial_reconnect_backoff_ms": 100, "grpc.max_reconnect_backoff_ms": 1000}


@dataclass(frozen=True)
class _Sleep:
    """What an operation yields to wait (time.sleep in Client, asyncio.sleep in AsyncClient)."""
    seconds: float


def _unreachable(err: ServingError) -> bool:
    text = f"{err.code} {err.message}".lower()
    return any(k in text for k in ("unavailable", "failed to connect", "deadline"))


# --- the core: every call once, as a generator of server calls ------------------------------------
# An operation yields zero-argument callables (one call of tritonclient's client each) and gets
# back their values, or their exception thrown in, and `_Sleep`s; `Client` runs them in order,
# `AsyncClient` awaits them. Error handling, retries, metadata and defaults live here only.

class _Core:
    def __init__(self, grpc, url: str, timeout: float | None, ssl: bool, root_certificates, channel_args,
                 retry: RetryPolicy | None = None):
        from tritonclient.utils import InferenceServerException

        self.grpc = grpc
        self.error = InferenceServerException
        self.url = url
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.rng = random.Random()
        self.tls = _tls_kwargs(ssl, root_certificates)
        self.admin_headers = admin_headers_for(url)
        self.channel_args = channel_options(channel_args)
        self.client = self.new_client()
        self.meta: dict[str, ModelMeta] = {}
        self.retries = 0  # every retry of this client, all calls together

    def new_client(self):
        return self.grpc.InferenceServerClient(self.url, channel_args=self.channel_args, **self.tls)

    def call_once(self, fn, *args, **kw):
        """A server call whose InferenceServerException comes back as a ServingError."""
        try:
            return (yield lambda: fn(*args, **kw))
        except self.error as e:
            raise _wrap(e) from None

    def call(self, fn, *args, timeout: float | None = -1.0, retried: list | None = None, **kw):
        """A server call, sent again after a transient failure (`retryable`) until its deadline
        (`timeout` s from now; -1: the client's): each attempt gets the time that is left (or
        the policy's attempt_s, if shorter), and between attempts a jittered backoff."""
        timeout = self.timeout if timeout == -1.0 else timeout
        policy = self.retry
        deadline = None if timeout is None else time.monotonic() + timeout
        tries = 0
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            attempt = left
            if policy.attempt_s is not None:
                attempt = policy.attempt_s if left is None else min(policy.attempt_s, left)
            tries += 1
            try:
                return (yield from self.call_once(fn, *args, client_timeout=attempt, **kw))
            except ServingError as err:
                wait = policy.delay(tries - 1, self.rng)
                limit = policy.max_tries or (10 if deadline is None else None)
                if not retryable(err) or (limit is not None and tries >= limit):
                    raise
                if deadline is not None and time.monotonic() + wait >= deadline - 0.05:
                    raise ServingError(err.code, f"{err.message} (deadline of {timeout:g} s spent after "
                                                 f"{tries} attempt{'s' if tries > 1 else ''})") from None
                self.retries += 1
                if retried is not None:
                    retried.append(err)
                yield _Sleep(wait)

    def ready(self, model: str | None):
        """Whether the server (or a model) is ready; False also when it cannot be reached (asked
        once: the answer is about now)."""
        c = self.client
        try:
            if model is None:
                return bool((yield from self.call_once(c.is_server_ready, client_timeout=self.timeout)))
            return bool((yield from self.call_once(c.is_model_ready, model, client_timeout=self.timeout)))
        except ServingError as err:
            if _unreachable(err):
                return False
            raise

    def models(self, timeout: float | None = -1.0):
        """Names clients can call: the ensembles (each has `<name>_sampler` beside it); timeout:
        the deadline of this listing, retries included (-1: the client's)."""
        index = yield from self.call(self.client.get_model_repository_index, headers=self.admin_headers,
                                     as_json=True, timeout=timeout)
        names = {m["name"] for m in index.get("models", [])}
        return sorted(n for n in names if n + "_sampler" in names)

    def unknown(self, model: str, err: ServingError):
        """A clear NOT_FOUND error: the models this server does have."""
        if err.code != "NOT_FOUND" and "unknown model" not in err.message.lower():
            return err
        names = yield from self.models()
        return ServingError(err.code, f"model: unknown model '{model}' (this server has: {', '.join(names) or 'none'})")

    def config(self, model: str, retried: list | None = None):
        """A model's configuration (GetModelConfig, as JSON)."""
        try:
            return (yield from self.call(self.client.get_model_config, model, as_json=True,
                                         retried=retried))["config"]
        except ServingError as err:
            raise (yield from self.unknown(model, err)) from None

    def model_meta(self, model: str, retried: list | None = None):
        if model not in self.meta:
            cfg = yield from self.config(model, retried)
            try:
                self.meta[model] = ModelMeta.from_config(cfg)
            except InvalidInput as e:
                raise ServingError("INVALID_ARGUMENT", str(e)) from None
        return self.meta[model]

    def infer(self, model: str, seeds, steps=None, class_labels=None, gamma=None, outputs=("image",),
              retried: list | None = None, **values):
        """One request of len(seeds) images; {output name: array} (png: a list of bytes).
        values: the table's other inputs by keyword (`build_inputs`)."""
        inputs = build_inputs(self.grpc, seeds, steps, class_labels=class_labels, gamma=gamma, **values)
        wanted = [self.grpc.InferRequestedOutput(n) for n in outputs]
        try:
            result = yield from self.call(self.client.infer, model, inputs, outputs=wanted, retried=retried)
        except ServingError as err:
            raise (yield from self.unknown(model, err)) from None
        out = {}
        for n in outputs:
            arr = result.as_numpy(n)
            if arr is not None:
                out[n] = [bytes(b) for b in arr.reshape(-1)] if n == "png" else arr
        return out

    def generate(self, model: str, seeds, steps=None, class_labels=None, gamma=None, png: bool = False,
                 retried: list | None = None, **values):
        """uint8 images [K, H, W, C] (float samples [K, D] for 2-D models), or K PNGs."""
        meta = yield from self.model_meta(model, retried)
        out = "png" if png else "image" if meta.is_image else "sample"
        return (yield from self.infer(model, seeds, steps, class_labels, gamma, (out,), retried, **values))[out]

    def statistics(self):
        """GetInferenceStatistics of every model, as JSON."""
        return (yield from self.call(self.client.get_inference_statistics, "", as_json=True, timeout=30))

    def server_version(self):
        return (yield from self.call(self.client.get_server_metadata, as_json=True)).get("version")

    def stream_inputs(self, model: str, seed: int, steps, **values) -> tuple:
        """One image's inputs for `<name>_stream`: each input by its name (class_label=, gamma=)."""
        return model + "_stream", build_inputs(self.grpc, [seed], steps, batched=False,
                                               **{k: None if v is None else [v] for k, v in values.items()})


class _Steps:
    """Walks a core operation: the server calls it asks for, then its result."""

    def __init__(self, op):
        self.op, self.value, self.error, self.result = op, None, None, None

    def next_call(self):
        """The next call to make, or None when the operation has its result."""
        try:
            fn = self.op.throw(self.error) if self.error is not None else self.op.send(self.value)
        except StopIteration as done:
            self.result = done.value
            return None
        self.value, self.error = None, None
        return fn


def _run(op):
    """Run a core operation with blocking calls."""
    steps = _Steps(op)
    while (fn := steps.next_call()) is not None:
        if isinstance(fn, _Sleep):
            time.sleep(fn.seconds)
            continue
        try:
            steps.value = fn()
        except Exception as e:  # noqa: BLE001 - thrown into the operation, which decides
            steps.error = e
    return steps.result


async def _run_async(op):
    """Run a core operation with awaited calls."""
    steps = _Steps(op)
    while (fn := steps.next_call()) is not None:
        if isinstance(fn, _Sleep):
            await asyncio.sleep(fn.seconds)
            continue
        try:
            steps.value = await fn()
        except Exception as e:  # noqa: BLE001 - thrown into the operation, which decides
            steps.error = e
    return steps.result


class Client:
    """Synchronous client (thread-safe for generate(); stream() opens its own connection).
    timeout: each call's deadline in s, retries included; channel_args: extra gRPC channel
    arguments (see `channel_options`); retry: a RetryPolicy (NO_RETRY: none)."""

    def __init__(self, url: str = "127.0.0.1:8001", timeout: float | None = DEADLINE_S, ssl: bool = False,
                 root_certificates=None, channel_args=None, retry: RetryPolicy | None = None):
        import tritonclient.grpc as grpc

        self._core = _Core(grpc, url, timeout, ssl, root_certificates, channel_args, retry)
        self.url, self.timeout = url, timeout

    @property
    def retries(self) -> int:
        """Retries of this client so far, every call together."""
        return self._core.retries

    def close(self) -> None:
        self._core.client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def ready(self, model: str | None = None) -> bool:
        return _run(self._core.ready(model))

    def models(self, timeout: float | None = -1.0) -> list[str]:
        return _run(self._core.models(timeout))

    def meta(self, model: str, retried: list | None = None) -> ModelMeta:
        return _run(self._core.model_meta(model, retried))

    # values: the request table's other inputs (serving.protocol.INPUTS) by keyword, a list for a
    # batch (one value per seed) or one value for `stream`; a keyword the table does not name is
    # refused (`build_inputs`). steps, class labels and gamma keep their places in the signatures.
    def infer(self, model: str, seeds, steps=None, class_labels=None, gamma=None, outputs=("image",),
              retried: list | None = None, **values) -> dict:
        return _run(self._core.infer(model, seeds, steps, class_labels, gamma, outputs, retried, **values))

    def generate(self, model: str, seeds, steps=None, class_labels=None, gamma=None,
                 retried: list | None = None, **values) -> np.ndarray:
        return _run(self._core.generate(model, seeds, steps, class_labels, gamma, retried=retried, **values))

    def generate_png(self, model: str, seeds, steps=None, class_labels=None, gamma=None,
                     retried: list | None = None, **values) -> list[bytes]:
        return _run(self._core.generate(model, seeds, steps, class_labels, gamma, png=True, retried=retried,
                                        **values))

    def stream(self, model: str, seed: int, steps=None, class_label=None, gamma=None, **values):
        """Yields (step, preview) after every sampler step; the last one is the final image."""
        name, inputs = self._core.stream_inputs(model, seed, steps, class_label=class_label, gamma=gamma, **values)
        q: queue.Queue = queue.Queue()
        client = self._core.new_client()
        try:
            client.start_stream(callback=lambda result, error: q.put((result, error)), stream_timeout=self.timeout)
            client.async_stream_infer(name, inputs, enable_empty_final_response=True)
            final = False
            while not final:
                try:
                    item, final = _stream_step(*q.get(timeout=self.timeout))
                except queue.Empty:
                    raise ServingError("DEADLINE_EXCEEDED", f"{name}: no response in {self.timeout} s") from None
                if item is not None:
                    yield item
        finally:
            client.stop_stream(cancel_requests=True)
            client.close()


class AsyncClient:
    """asyncio client (tritonclient.grpc.aio): the same calls as `Client`, awaited."""

    def __init__(self, url: str = "127.0.0.1:8001", timeout: float | None = DEADLINE_S, ssl: bool = False,
                 root_certificates=None, channel_args=None, retry: RetryPolicy | None = None):
        import tritonclient.grpc.aio as aio

        self._core = _Core(aio, url, timeout, ssl, root_certificates, channel_args, retry)
        self.url, self.timeout = url, timeout

    @property
    def retries(self) -> int:
        return self._core.retries

    async def close(self) -> None:
        await self._core.client.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def ready(self, model: str | None = None) -> bool:
        return await _run_async(self._core.ready(model))

    async def models(self, timeout: float | None = -1.0) -> list[str]:
        return await _run_async(self._core.models(timeout))

    async def meta(self, model: str, retried: list | None = None) -> ModelMeta:
        return await _run_async(self._core.model_meta(model, retried))

    async def config(self, model: str) -> dict:
        return await _run_async(self._core.config(model))

    async def statistics(self) -> dict:
        return await _run_async(self._core.statistics())

    async def server_version(self) -> str | None:
        return await _run_async(self._core.server_version())

    # values: as Client's, the request table's other inputs by keyword
    async def infer(self, model: str, seeds, steps=None, class_labels=None, gamma=None, outputs=("image",),
                    retried: list | None = None, **values) -> dict:
        return await _run_async(self._core.infer(model, seeds, steps, class_labels, gamma, outputs, retried,
                                                 **values))

    async def generate(self, model: str, seeds, steps=None, class_labels=None, gamma=None,
                       retried: list | None = None, **values) -> np.ndarray:
        return await _run_async(self._core.generate(model, seeds, steps, class_labels, gamma, retried=retried,
                                                    **values))

    async def generate_png(self, model: str, seeds, steps=None, class_labels=None, gamma=None,
                           retried: list | None = None, **values) -> list[bytes]:
        return await _run_async(self._core.generate(model, seeds, steps, class_labels, gamma, png=True,
                                                    retried=retried, **values))

    async def stream(self, model: str, seed: int, steps=None, class_label=None, gamma=None, **values):
        """Async iterator of (step, preview); the last one is the final image."""
        name, inputs = self._core.stream_inputs(model, seed, steps, class_label=class_label, gamma=gamma, **values)

        async def requests():
            yield {"model_name": name, "inputs": inputs, "enable_empty_final_response": True}

        responses = self._core.client.stream_infer(requests(), stream_timeout=self.timeout)
        try:
            async for result, error in responses:
                item, final = _stream_step(result, error)
                if item is not None:
                    yield item
                if final:
                    return
        finally:
            if hasattr(responses, "cancel"):
                responses.cancel()
