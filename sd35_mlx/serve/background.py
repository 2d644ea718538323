"""Run the server on a thread of this process (tests, benchmarks, apps that embed it).

    with BackgroundServer(create_app(registry)) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused")

Binds 127.0.0.1 on a free port unless told otherwise; start and stop waits are bounded.
"""

from __future__ import annotations

import threading
import time

from .cli import LOOPBACK, bind


class BackgroundServer:
    def __init__(self, app, host: str = LOOPBACK, port: int = 0, start_timeout: float = 60.0):
        import uvicorn

        self._sock = bind(host, port)
        self.host, self.port = self._sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        self.app = app
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)
        self._start_timeout = start_timeout

    def __enter__(self) -> "BackgroundServer":
        self._thread.start()
        deadline = time.monotonic() + self._start_timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def __exit__(self, *exc) -> None:
        self.stop()
