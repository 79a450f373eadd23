"""The Docker backend's calls to the engine: its errors mapped at the edge, and bounded calls.

:func:`edge` and :func:`raise_backend` turn the SDK's (and its HTTP library's) errors into
:class:`~policies.errors.RuntimeBackendError` in the project's words: the SDK's text names the
engine's URL and the container's ID, which are the site's business, kept on ``__cause__``.
:func:`bounded` runs an engine call that may hang (a kill the engine waits on) for at most a
given time; :func:`feed_logs` streams a container's logs into a :class:`TailBuffer`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import requests

from enclave.runtime._base import TailBuffer
from policies.errors import RuntimeBackendError

TIMEOUT_EXCEPTIONS = (requests.exceptions.ConnectionError, requests.exceptions.ReadTimeout)


def bounded(fn: Callable[[], object], timeout_s: float) -> tuple[bool, BaseException | None]:
    """Run ``fn`` in a daemon thread for at most ``timeout_s``: (finished, what it raised).
    An engine call that hangs (a kill the engine waits on) must not hold the agent past its
    bound; the thread is left to finish or fail on its own."""
    result: list[BaseException | None] = []

    def call() -> None:
        try:
            fn()
        except BaseException as e:  # reported to the caller, never raised in the thread
            result.append(e)
        else:
            result.append(None)

    t = threading.Thread(target=call, name="docker-bounded", daemon=True)
    t.start()
    t.join(timeout_s)
    return (True, result[0]) if result else (False, None)


def feed_logs(client: Any, container_id: str, buf: TailBuffer) -> None:
    drain(client.api.logs(container_id, stdout=True, stderr=True, stream=True, follow=False), buf)


def drain(stream: Any, buf: TailBuffer) -> None:
    """Feed an engine's log stream into ``buf`` (holding at most its cap), closing it after."""
    try:
        for chunk in stream:
            buf.feed(chunk)
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()


@contextmanager
def edge(what: str) -> Iterator[None]:
    """Map the SDK's (and its HTTP library's) errors to :class:`RuntimeBackendError`."""
    try:
        yield
    except Exception as e:
        raise_backend(what, e)


def raise_backend(what: str, e: Exception) -> None:
    """Raise ``e`` as :class:`RuntimeBackendError` in the project's words: the SDK's text (the
    engine's URL, the container's ID) stays on ``__cause__``, for the site's audit only."""
    import docker

    if isinstance(e, docker.errors.DockerException | requests.exceptions.RequestException):
        raise RuntimeBackendError(f"the container engine could not {what}") from e
    raise e
