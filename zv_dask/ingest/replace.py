"""Overwrite without losing the old store: the new one is built beside it and swapped in when complete.

A local plain store that ``overwrite=True`` replaces stays as it was while the job runs: the
job writes a new store at ``.<name>.zv-overwrite`` in the same directory (the same file system,
so the swap is two renames) and only a finished job puts it in the old one's place. A failed
job removes its new store; a killed one leaves it, with its journal, for ``resume=True``.

The swap renames the old store to ``.<name>.zv-replaced``, the new one to ``<name>``, then removes
the old. Between the two renames (microseconds) no store is at ``<name>``; a job killed exactly
there leaves both whole, and the next overwrite, resume or :func:`finish_swap` completes it.

Icechunk needs none of this (a job is one commit); on object storage there is no rename, so
an overwrite of a store that holds points is refused there (:func:`refuse_object_overwrite`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from zv_dask.errors import StoreError

__all__ = ["replacement_path", "replaced_path", "swap_in", "finish_swap", "refuse_object_overwrite"]

OBJECT_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "azure", "abfs", "abfss")


def replacement_path(target: Path) -> Path:
    """Where an overwrite of ``target`` builds the new store."""
    return target.with_name(f".{target.name}.zv-overwrite")


def replaced_path(target: Path) -> Path:
    """Where the swap parks the old store until it is removed."""
    return target.with_name(f".{target.name}.zv-replaced")


def finish_swap(target: Path) -> None:
    """Complete a swap a killed job left half done (no store at ``target``, the parked old one beside it)."""
    old, new = replaced_path(target), replacement_path(target)
    if not target.exists() and old.exists() and new.exists():
        os.rename(new, target)
    if target.exists() and old.exists():
        shutil.rmtree(old, ignore_errors=True)


def swap_in(new: Path, target: Path) -> str | None:
    """Put the finished store ``new`` at ``target``, replacing (and removing) what is there.

    Returns a warning when the old store, once moved aside, could not be removed (files this
    process may not delete): the new store is in place, the old one waits at the path named.
    """
    old = replaced_path(target)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
        if old.exists():  # an earlier old store nobody could remove: park this one beside it
            import uuid

            old = old.with_name(f"{old.name}-{uuid.uuid4().hex[:8]}")
    if target.exists():
        os.rename(target, old)
    os.rename(new, target)
    errors: list = []
    shutil.rmtree(old, onexc=lambda fn, path, exc: errors.append(exc))
    if old.exists():
        why = (getattr(errors[0], "strerror", None) or type(errors[0]).__name__) if errors else "unknown"
        return f"the replaced store could not be removed ({why}); it waits at {old}: remove it by hand"
    return None


def refuse_object_overwrite(url: str) -> None:
    """Object storage has no rename: an overwrite would delete the old store before the new one is whole."""
    raise StoreError(f"refusing to overwrite {url}: on object storage the old store would be deleted before the "
                     "new one is complete, and a failure would lose both. Write the new store to another prefix "
                     "and move your readers to it (then delete the old one), delete the old store first, or use "
                     "an icechunk repository (backend='icechunk'), where a job is one commit")
