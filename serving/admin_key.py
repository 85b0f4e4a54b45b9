"""The admin key of a server this user launched: the launcher writes it (0600, in a 0700 dir),
and our own clients on the same host read it to unlock Triton's restricted protocols (the
model-repository index). Its own module, below both serving.launcher and serving.client."""
from __future__ import annotations

import os
from pathlib import Path

ADMIN_HEADER = "fewstep-admin-key"
GRPC_ADMIN_HEADER = "triton-grpc-protocol-" + ADMIN_HEADER  # Triton prefixes gRPC restriction keys


def admin_key_file(grpc_port: int) -> Path:
    """Where a server's admin key is kept for our own tools of the same user (0600, in a
    0700 dir): serving.client reads it to list the models of a server on this host."""
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or Path.home() / ".cache") / "fewstep" / "admin"
    return base / f"grpc-{grpc_port}.key"


def read_admin_key(grpc_port: int) -> str | None:
    try:
        return admin_key_file(grpc_port).read_text().strip() or None
    except OSError:
        return None


def write_admin_key(path: Path, key: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key)
