"""Pre-images: what an append to a plain store keeps, so that a failed or killed append is undone exactly.

An append rewrites cells in place. Before it changes anything it copies every
metadata document of the store into its journal (``pre/meta.json``); before a
unit of work overwrites cells it copies their old bytes (``pre/cells/<key>``)
and writes an index naming the keys and whether each existed
(``pre/<unit>.json``). :func:`roll_back` puts the old bytes back, deletes every
cell the old metadata does not list (cells the append created), removes the
nodes it added and restores the documents: the store is byte for byte what it
was. It is idempotent, so a rollback that is itself killed is run again.
Icechunk needs none of this: a failed job's session is discarded.
"""

from __future__ import annotations

import json

import numpy as np

from zv_dask.errors import StoreError
from zv_dask.format.grid import parse_chunk_key
from zv_dask.store.cellio import cell_keys, delete_cells, get_cells, put_cells

__all__ = ["metadata_docs", "restore_metadata", "snapshot_metadata", "save_cells", "restore_cells", "roll_back",
           "PRE"]

PRE = "pre"
WHOLE = "whole-arrays"  # the unit that keeps the cells of arrays rewritten whole
_HIDDEN = (".zv-job/", ".zv-scratch/")


def metadata_docs(zs) -> dict[str, bytes]:
    """Every ``zarr.json`` of a plain store, by key."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    async def walk(prefix: str, keys: list) -> None:
        # node by node, never into an array's cells ("c/"): the cost is the number of nodes, not of cells
        entries = [e async for e in zs.store.list_dir(prefix)]
        for e in entries:
            if e == "zarr.json":
                keys.append(prefix + e)
            elif e != "c" and not e.startswith(".zv-"):
                await walk(f"{prefix}{e.rstrip('/')}/", keys)

    async def collect() -> dict[str, bytes]:
        keys: list[str] = []
        await walk("", keys)
        out: dict[str, bytes] = {}
        for key in keys:
            buf = await zs.store.get(key, default_buffer_prototype())
            if buf is not None:
                out[key] = buf.to_bytes()
        return out

    return sync(collect())


def restore_metadata(zs, docs: dict[str, bytes]) -> None:
    """Put the metadata documents back as they were, and remove every node added since.

    Cells written meanwhile in arrays that existed stay (see :func:`roll_back`
    for an exact undo).
    """
    import zarr
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    async def restore():
        keys = [k async for k in zs.store.list()]
        added = sorted(k for k in keys if k.endswith("/zarr.json") and k not in docs and not k.startswith(_HIDDEN))
        for key in added:  # outermost first; deleting a node takes its children
            node = key[: -len("/zarr.json")]
            if await zs.store.exists(f"{node}/zarr.json"):
                await zs.store.delete_dir(node)
        proto = default_buffer_prototype()
        for key, raw in docs.items():
            await zs.store.set(key, proto.buffer.from_bytes(raw))

    sync(restore())
    zs.root = zarr.open_group(zs.store, mode="r+", zarr_format=3)


def _whole_arrays(docs: dict[str, bytes]) -> list[str]:
    """Paths of the arrays that are rewritten whole, not cell by cell (the object index's)."""
    out = []
    for key, raw in docs.items():
        doc = json.loads(raw)
        if doc.get("node_type") == "array" and "nonempty_chunks" not in doc.get("attributes", {}):
            out.append(key[: -len("/zarr.json")])
    return out


def snapshot_metadata(zs, journal) -> None:
    """Copy every metadata document, and every cell of the arrays rewritten whole (object indexes), into
    the journal (before the job changes anything)."""
    from zarr.core.sync import sync

    docs = metadata_docs(zs)

    async def cells(prefix):
        return [k async for k in zs.store.list_prefix(prefix)]

    whole = [k for path in _whole_arrays(docs) for k in sync(cells(f"{path}/c/"))]
    save_cells(zs.store, journal, WHOLE, whole)
    journal.write_json(f"{PRE}/meta.json", {k: v.decode() for k, v in docs.items()})


def save_cells(zstore, journal, unit: str, keys: list[str]) -> None:
    """Keep the old bytes of ``keys`` (those that exist) and an index of them, before they are overwritten.

    A unit whose index exists was saved already (a retried task): nothing is
    saved again, so the pre-image stays the state before the job.
    """
    if journal.get(f"{PRE}/{unit}.json") is not None:
        return
    raws = get_cells(zstore, keys)
    journal.put_many({f"{PRE}/cells/{k}": r for k, r in zip(keys, raws) if r is not None})
    journal.write_json(f"{PRE}/{unit}.json", {"keys": keys, "existed": [r is not None for r in raws]})


def restore_cells(zstore, journal, unit: str) -> bool:
    """Put a unit's saved cells back and delete those it created; ``False`` if the unit saved nothing."""
    idx = journal.read_json(f"{PRE}/{unit}.json")
    if idx is None:
        return False
    keys, existed = idx["keys"], idx["existed"]
    old = [k for k, e in zip(keys, existed) if e]
    raws = journal.get_many([f"{PRE}/cells/{k}" for k in old])
    missing = [k for k, r in zip(old, raws) if r is None]
    if missing:
        raise StoreError(f"the journal at {journal.where()} lacks the saved bytes of {len(missing)} cells "
                         f"(first {missing[0]}): the append cannot be rolled back")
    # Deletions first, then the old bytes written in place: on a full disk (a common reason to roll
    # back) there is no room for the temporary copies of atomic writes, and the journal keeps the
    # bytes until the roll-back is over, so a write cut short is done again by the next roll-back.
    delete_cells(zstore, [k for k, e in zip(keys, existed) if not e])
    put_cells(zstore, list(zip(old, raws)), atomic=False)
    return True


def _listed_cells(key: str, doc: dict) -> set[str] | None:
    """The cell keys an array's metadata lists (``None``: not a ZV per-chunk array)."""
    attrs = doc.get("attributes", {})
    if doc.get("node_type") != "array" or "nonempty_chunks" not in attrs:
        return None
    path = key[: -len("/zarr.json")]
    origin = attrs.get("chunk_grid_origin")
    cells = np.asarray([parse_chunk_key(ck) for ck in attrs["nonempty_chunks"]], np.int64)
    if origin is not None and len(cells):
        cells = cells - np.asarray(origin, np.int64)
    return set(cell_keys(path, cells))


def roll_back(zs, journal) -> bool:
    """Undo the unfinished append that ``journal`` describes; ``False`` if it had changed nothing yet.

    Saved cells go back, cells the old metadata does not list are deleted,
    nodes the append added are removed, the old metadata documents are
    restored, and the journal goes.
    """
    from zarr.core.sync import sync

    snap = journal.read_json(f"{PRE}/meta.json")
    if snap is None:
        journal.remove()
        return False
    docs = {k: v.encode() for k, v in snap.items()}

    async def live(prefix):
        return [k async for k in zs.store.list_prefix(prefix)]

    saved = set((journal.read_json(f"{PRE}/{WHOLE}.json") or {}).get("keys", []))
    extra = []
    for key, raw in docs.items():
        listed = _listed_cells(key, json.loads(raw))
        path = key[: -len("/zarr.json")]
        if listed is None and path in _whole_arrays({key: raw}):
            listed = {k for k in saved if k.startswith(f"{path}/c/")}
        if listed is None:
            continue
        extra += [k for k in sync(live(f"{path}/c/")) if k not in listed]
    delete_cells(zs.store, extra)  # before the restores: see restore_cells
    for name in journal.names(PRE):
        if name.endswith(".json") and name != "meta.json":
            restore_cells(zs.store, journal, name[: -len(".json")])
    restore_metadata(zs, docs)
    journal.remove()
    return True
