"""Where a job's tasks run: the given ``distributed`` client, the current one, or Dask's local scheduler."""

from __future__ import annotations

__all__ = ["resolve_client", "run_tasks"]


def resolve_client(client):
    """``client`` if given, else the current ``distributed`` client, else ``None`` (local scheduler)."""
    if client is not None:
        return client
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


def run_tasks(objs, client, progress: bool = False, label: str = "") -> list:
    """Compute dask objects and return their results in order, with a progress bar if asked.

    On a client a failure stops the stage's other tasks before the error propagates.
    """
    import dask

    if client is not None:
        from zv_dask.transaction import gather_or_stop

        futures = client.compute(list(objs))
        if progress:
            from zv_dask.progress import show_progress

            show_progress(futures, label)
        return gather_or_stop(client, futures)
    if progress:
        from dask.diagnostics import ProgressBar

        print(label, flush=True)
        with ProgressBar():
            return list(dask.compute(*objs))
    return list(dask.compute(*objs))
