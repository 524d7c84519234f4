"""Every exception zv-dask raises on purpose.

Messages name the offending value and what would have been accepted, so that
a user reading one line of a traceback (or of the CLI) knows what to change.
"""

from __future__ import annotations

import pickle

__all__ = [
    "ZVError",
    "StoreError",
    "MetadataError",
    "FormatError",
    "InputError",
    "OutOfBoundsError",
    "IngestError",
    "UnfinishedJobWarning",
]


class ZVError(Exception):
    """Base class of every zv-dask error."""


class StoreError(ZVError):
    """The store cannot be created, opened or written as asked.

    Examples: creating over an existing store, opening something that is not a
    ZV store, an unknown URL scheme or backend.
    """


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


def _rebuild_ingest_error(cls, message, stage, chunk, cause):
    err = cls(message, stage=stage, chunk=chunk)
    err.__cause__ = cause
    return err


class UnfinishedJobWarning(UserWarning):
    """The store holds an unfinished job (killed or failed): resume it or discard it."""
