"""Every exception zv-dask raises on purpose.

Messages name the offending value and what would have been accepted, so that
a user reading one line of a traceback (or of the CLI) knows what to change.
"""

from __future__ import annotations

import os
import pickle
from typing import Literal

__all__ = [
    "ZVError",
    "StoreError",
    "StoreBusyError",
    "MetadataError",
    "FormatError",
    "InputError",
    "OutOfBoundsError",
    "IngestError",
    "TaskStage",
    "UnfinishedJobWarning",
    "UnfinishedJobError",
    "cause_text",
    "out_of_space",
]


_NO_SPACE = (28, 122)  # ENOSPC, EDQUOT
_NO_PERMISSION = (1, 13, 30)  # EPERM, EACCES, EROFS


def out_of_space(e: BaseException) -> bool:
    """Whether ``e`` is a full disk (or quota): by its errno, or by the OS's words in another library's error."""
    if isinstance(e, OSError) and e.errno in _NO_SPACE:
        return True
    text = str(e).lower()
    return "no space left" in text or "disk quota" in text


def cause_text(e: BaseException, where: object = None) -> str:
    """One line for the cause of a failed task: what went wrong and, for a full or read-only disk, where.

    ``where`` is the store (a zarr store or a path) the task was writing; an
    :class:`OSError` that names no file of its own (``write()`` on a full disk)
    is reported against it.
    """
    whole = str(e)
    text = f"{type(e).__name__}: {(whole.strip().splitlines() or [''])[0]}"
    text += _storage_context(text, whole)
    errno = getattr(e, "errno", None) if isinstance(e, OSError) else None
    if errno is None and out_of_space(e):
        errno = _NO_SPACE[0]  # obstore's errors carry the OS's words, not its errno
    if errno not in _NO_SPACE + _NO_PERMISSION:
        return text
    path = getattr(e, "filename", None) or getattr(where, "root", None)
    if path is None:  # a path or URL names itself; a store object without a root (icechunk's) would not
        path = where if isinstance(where, (str, os.PathLike)) else "the store"
    if errno in _NO_SPACE:
        return f"no space left on the device holding {path} ({text}); free space there and rerun"
    return f"no permission to write {path} ({text})"


# S3 error codes -> HTTP status, for errors (icechunk's) that give the code and not the status
_S3_STATUS = {"SlowDown": 503, "ServiceUnavailable": 503, "InternalError": 500, "RequestTimeout": 400,
              "AccessDenied": 403, "InvalidAccessKeyId": 403, "SignatureDoesNotMatch": 403, "ExpiredToken": 400,
              "NoSuchBucket": 404, "NoSuchKey": 404, "RequestTimeTooSkewed": 403}


def _storage_context(first: str, whole: str) -> str:
    """What a storage error's later lines say and its first does not: the object's key, the HTTP status."""
    import re

    extra = []
    key = re.search(r'with key="([^"]+)"', whole)
    if key and key.group(1) not in first:
        extra.append(f"object {key.group(1)}")
    code = re.search(r'code: "(\w+)"', whole)
    if code and code.group(1) in _S3_STATUS and not re.search(r"\b[45]\d\d\b", first):
        extra.append(f"HTTP {_S3_STATUS[code.group(1)]} {code.group(1)}")
    return f" ({', '.join(extra)})" if extra else ""


class ZVError(Exception):
    """Base class of every zv-dask error."""


class StoreError(ZVError):
    """The store cannot be created, opened or written as asked.

    Examples: creating over an existing store, opening something that is not a
    ZV store, an unknown URL scheme or backend. ``conflict`` is true for a commit
    lost to a concurrent one (the job is over: nothing to resume).
    """

    conflict: bool = False


class StoreBusyError(StoreError):
    """Another job is creating or writing the store right now (its lease is live, or its
    nodes changed while this job read them): wait for it, or stop it and resume."""


class MetadataError(ZVError):
    """Store or level metadata is inconsistent or malformed."""


class FormatError(ZVError):
    """A cell's bytes do not follow the ZV 0.9.2 layout."""


class InputError(ZVError, ValueError):
    """The points, attributes or parameters handed to zv-dask are unusable."""


class OutOfBoundsError(InputError):
    """Points lie outside the store bounds under ``out_of_bounds="raise"``."""


class IngestError(ZVError):
    """A stage of a distributed job failed; says which stage and which chunk.

    ``stage`` is ``"scan"``, ``"write"``, ``"finalize"``, ``"pyramid level k"`` or
    ``"commit"``; ``chunk`` is the chunk key (``"i.j.k"``) when one is known. Both
    survive pickling (a worker's error reaching the client), and so does the
    cause when it pickles.
    """

    def __init__(self, message: str, *, stage: str | None = None, chunk: str | None = None):
        super().__init__(message)
        self.stage = stage
        self.chunk = chunk

    def __reduce__(self):
        # A cause (or context) that does not survive a round trip (zarr's ArrayNotFoundError pickles but
        # does not unpickle) stays in the message only, and is dropped from the error itself: distributed's
        # pickler (tblib) pickles both links of the chain on its own, and a chain the client cannot
        # unpickle reaches it as a plain Exception.
        for link in ("__cause__", "__context__"):
            other = getattr(self, link)
            if other is not None:
                try:
                    pickle.loads(pickle.dumps(other))
                except Exception:  # noqa: BLE001
                    setattr(self, link, None)
        cause = self.__cause__
        return _rebuild_ingest_error, (type(self), self.args[0] if self.args else "", self.stage, self.chunk, cause)

    def __reduce_ex__(self, protocol):  # (tblib, which distributed installs, patches this one; ours wins)
        return self.__reduce__()


class TaskStage:
    """What a task is doing, for its error: ``with TaskStage("write", "writing group 3", where=store) as st:``.

    Inside the block a :class:`ZVError` passes as it is; any other exception
    becomes an :class:`IngestError` "<what>[ (first chunk <chunk>)] failed: <cause>"
    with the stage and chunk, the cause chained. ``st.chunk`` (and ``st.what``)
    may be set as the block learns them; ``where`` names a full or read-only disk
    in the cause (:func:`cause_text`); ``raw=True`` gives the cause as
    ``Type: message`` instead.
    """

    def __init__(self, stage: str, what: str, *, where: object = None, chunk: str | None = None,
                 raw: bool = False):
        self.stage, self.what, self.where, self.chunk, self.raw = stage, what, where, chunk, raw

    def __enter__(self) -> TaskStage:
        return self

    def __exit__(self, typ, e, tb) -> Literal[False]:
        if e is None or isinstance(e, ZVError) or not isinstance(e, Exception):
            return False
        cause = f"{type(e).__name__}: {e}" if self.raw else cause_text(e, self.where)
        first = f" (first chunk {self.chunk})" if self.chunk else ""
        raise IngestError(f"{self.what}{first} failed: {cause}", stage=self.stage, chunk=self.chunk) from e


def _rebuild_ingest_error(cls, message, stage, chunk, cause):
    err = cls(message, stage=stage, chunk=chunk)
    err.__cause__ = cause
    return err


class UnfinishedJobWarning(UserWarning):
    """The store holds an unfinished job (killed or failed): resume it or discard it."""


class UnfinishedJobError(StoreError):
    """What was asked for is what an unfinished job (killed, failed or still running) has not finished.

    Reading a level such a job was writing would return a part of it (or
    nothing) as if it were the whole: the message says the job and how to
    resume it (``--resume`` / ``resume=True``) or undo it.
    """
