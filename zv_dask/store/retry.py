"""Retries of the object-store requests that obstore does not retry: conditional PUTs and deletes.

obstore retries throttling (429, 503) and server errors for every request, and
dropped connections for idempotent ones; a conditional PUT (``mode="create"``)
and a delete (S3's ``POST ?delete``) whose connection drops fail at once with
"error sending request", although the request may have taken effect. Both are
safe to send again here:

* a delete is idempotent (deleting a missing key is no error);
* a create that landed before its answer was lost fails on the retry as
  "already exists"; the callers tell their own object from another writer's by
  reading it back (zarr's ``set_if_not_exists`` means "unless present" anyway).

Measured with a loopback proxy that resets connections (``tests/chaosproxy.py``):
without these retries a job failed on the first reset of one of these requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from zarr.storage import ObjectStore

__all__ = ["is_dropped", "retry_dropped", "retry_dropped_async", "delete_prefix", "RetryingObjectStore",
           "DROPPED_ATTEMPTS"]

log = logging.getLogger(__name__)

DROPPED_ATTEMPTS = 6  # tries of a request whose connection dropped (backoff 0.05 s, doubling)
_WORDS = ("error sending request", "connection reset", "connection closed", "broken pipe", "incomplete message",
          "connection error", "unexpected eof", "channel closed")


def is_dropped(e: BaseException) -> bool:
    """Whether ``e`` is a connection that failed mid-request (the request may or may not have taken effect)."""
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    text = f"{type(e).__name__}: {e}".lower()[:2000]
    return any(w in text for w in _WORDS)


def retry_dropped(call, attempts: int = DROPPED_ATTEMPTS):
    """``call()``, tried again (with backoff) while it fails with a dropped connection."""
    for i in range(attempts):
        try:
            return call()
        except Exception as e:
            if i == attempts - 1 or not is_dropped(e):
                raise
            log.info("a request's connection dropped (%s); trying again (%d of %d)", type(e).__name__, i + 2,
                     attempts)
            time.sleep(0.05 * 2 ** i)


async def retry_dropped_async(call, attempts: int = DROPPED_ATTEMPTS):
    """``await call()``, tried again (with backoff) while it fails with a dropped connection."""
    for i in range(attempts):
        try:
            return await call()
        except Exception as e:
            if i == attempts - 1 or not is_dropped(e):
                raise
            log.info("a request's connection dropped (%s); trying again (%d of %d)", type(e).__name__, i + 2,
                     attempts)
            await asyncio.sleep(0.05 * 2 ** i)


def delete_prefix(store, prefix: str) -> None:
    """Delete every object under ``prefix`` of an obstore store, a listing page (1,000 keys) per request."""
    import obstore

    for batch in obstore.list(store, prefix=prefix, chunk_size=1000):
        paths = [m["path"] for m in batch]
        retry_dropped(lambda paths=paths: obstore.delete(store, paths))


class RetryingObjectStore(ObjectStore):
    """zarr's :class:`~zarr.storage.ObjectStore` whose conditional puts and deletes survive a dropped connection.

    ``concurrency`` (the ``concurrency`` storage option) is how many requests
    zv-dask's cell I/O keeps in flight per call (:mod:`zv_dask.store.cellio`).
    """

    def __init__(self, store, *, read_only: bool = False, concurrency: int | None = None) -> None:
        super().__init__(store, read_only=read_only)
        self.concurrency = concurrency

    def with_read_only(self, read_only: bool = False) -> RetryingObjectStore:
        return type(self)(self.store, read_only=read_only, concurrency=self.concurrency)

    async def set_if_not_exists(self, key, value) -> None:
        import obstore

        self._check_writable()
        buf = value.as_buffer_like()

        async def put():
            with contextlib.suppress(obstore.exceptions.AlreadyExistsError):
                await obstore.put_async(self.store, key, buf, mode="create")

        await retry_dropped_async(put)

    async def delete(self, key: str) -> None:
        await retry_dropped_async(lambda: ObjectStore.delete(self, key))

    async def delete_dir(self, prefix: str) -> None:
        await retry_dropped_async(lambda: ObjectStore.delete_dir(self, prefix))
