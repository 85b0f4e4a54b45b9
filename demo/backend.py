"""The page's backend: every call `fewstep demo`'s page makes to Triton (through serving.client
only), and what the page says when a call had to be retried (serving.client's retries: a
server restarting is waited for within the request's deadline)."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from fewstep.serving.client import DEADLINE_S, Client, ModelMeta

# listing the models (page load, ↻) waits for a restarting server (4-8 s measured under load), not the whole
# request deadline: a server that is down is said within seconds
LIST_DEADLINE_S = 15.0


def retry_note(retried: list) -> str:
    """What the page says when a request was sent more than once (serving.client's retries)."""
    if not retried:
        return ""
    codes = ", ".join(sorted({e.code for e in retried}))
    return (f"↻ retried {len(retried)} time{'s' if len(retried) > 1 else ''} after {codes} (the server was "
            f"restarting or busy); the same seeds and settings always give the same images")


def retrying_note(retried: list, url: str, deadline: float) -> str:
    """The status while a request is being retried."""
    last = retried[-1]
    return (f"⏳ **Triton at `{url}` answered {last.code}; retrying** ({len(retried)} so far) until the "
            f"{deadline:g} s deadline: a restarting server is back within seconds.")


@dataclass
class Backend:
    """Every call the page makes to Triton (through serving.client only)."""
    url: str
    manifests: dict = field(default_factory=dict)  # name -> manifest.json of the models we serve
    timeout: float = DEADLINE_S  # retries included: covers a restart of the server
    list_timeout: float = LIST_DEADLINE_S

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
        for name in c.models(timeout=self.list_timeout):
            m = c.meta(name)
            (metas if m.is_image else skipped).append(m if m.is_image else name)
        return metas, skipped

    def meta(self, name: str) -> ModelMeta:
        return self.client().meta(name)

    def generate(self, name, seeds, steps, label=None, gamma=None, retried: list | None = None, **values
                 ) -> tuple[np.ndarray, float]:
        """(images, seconds); `retried` collects the client's retries (serving.client); values:
        the request's other inputs, one value for every image."""
        c = self.client()
        t0 = time.perf_counter()
        images = c.generate(name, seeds, steps, retried=retried, class_labels=label, gamma=gamma,
                            **{k: [v] * len(seeds) for k, v in values.items()})
        return images, time.perf_counter() - t0

    def stream(self, name, seed, steps, label=None, gamma=None, **values):
        return self.client().stream(name, seed, steps, class_label=label, gamma=gamma, **values)
