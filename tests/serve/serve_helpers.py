"""Serve an app with uvicorn in a thread, on 127.0.0.1 and a free port."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

from loratune.serve.server import build_server


@contextmanager
def running_server(app, shutdown_timeout_s: float = 10.0):
    """Run ``app`` with uvicorn in a thread on 127.0.0.1 and a free port; yield (url, server)."""
    server = build_server(app, "127.0.0.1", 0, shutdown_timeout_s)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(timeout=30)
