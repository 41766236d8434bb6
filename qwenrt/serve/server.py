"""Run the app on uvicorn: bind first (a taken port is a one-line error), log one
format, and stop cleanly on SIGTERM or Ctrl-C."""

from __future__ import annotations

import functools
import ipaddress
import logging
import signal
import socket
import sys
from dataclasses import replace

from qwenrt.errors import QwenrtError
from qwenrt.runtimes.base import Engine
from qwenrt.serve.app import EngineStart, ServerLimits, create_app
from qwenrt.serve.connections import LimitedH11Protocol
from qwenrt.serve.service import EngineService

# In-flight answers get this long to finish after SIGTERM; then they are cancelled.
GRACEFUL_SHUTDOWN_SECONDS = 10


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, or a QwenrtError saying why there cannot be one."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise QwenrtError(f"cannot listen on {host}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise QwenrtError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


def serve(
    start: EngineStart, model_id: str, sock: socket.socket, limits: ServerLimits, access_log: bool = True
) -> None:
    """Serve until SIGTERM or Ctrl-C; the engine opens once the server answers (/health says
    503 until it is warm) and is closed on the way out. An engine that cannot open stops the
    server, and its error is raised here."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    # asyncio warns for every write to a connection whose client has just left, before the
    # server notices; the answer's own log line says it better, once.
    logging.getLogger("asyncio").addFilter(lambda record: "socket.send() raised exception" not in record.getMessage())
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    failures: list[BaseException] = []
    services: list[EngineService] = []

    def announce(engine: Engine) -> str:
        return (f"serving {model_id} with {engine.name} ({engine.threads.threads} threads, {engine.concurrency} "
                f"at a time) on {url}/v1")  # fmt: skip

    def failed(exc: BaseException) -> None:
        failures.append(exc)
        server.should_exit = True

    app = create_app(replace(start, announce=announce, failed=failed, ready=services.append), model_id, limits)
    config = uvicorn.Config(
        app,
        http=functools.partial(LimitedH11Protocol, request_timeout_s=limits.request_timeout_s,
                               max_connections=limits.max_connections),
        timeout_keep_alive=limits.keep_alive_s,
        log_config=None,
        access_log=access_log,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        server_header=False,
    )  # fmt: skip
    server = uvicorn.Server(config)
    logging.getLogger("qwenrt.serve").info("listening on %s; loading the model", url)
    # uvicorn shuts down gracefully on SIGINT and SIGTERM, then raises the signal again for
    # the handlers it found: make those quiet, so that a requested stop exits with status 0.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for service in services:
            service.cancel_all()  # after a forced stop (Ctrl-C twice), generations must not run on
    if failures:
        exc = failures[0]
        if isinstance(exc, QwenrtError):
            raise exc
        raise QwenrtError(f"the {start.runtime} engine could not open {start.model_dir}: {exc}") from exc
