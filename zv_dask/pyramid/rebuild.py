"""A pyramid build on a local store, beside the levels it replaces: they stay until the new ones are complete.

The new levels are built in ``<store>/.zv-job/rebuild``, a store of its own whose level 0 is the
store's level 0: its cell files hard-linked (so nothing deleted or replaced there can reach the
store's files, and no byte is copied), its group document and ``links`` its own. The build reads
the same cells and writes nothing the store's levels depend on. When it has finished, the swap
moves the old coarse levels and level 0's links aside, the new ones in, then the level-0 and
root documents over the old ones (``os.replace``, the root last), and deletes what it moved
aside. A build killed before the swap leaves the store exactly as it was, with a journal that
says a build is unfinished (``resume`` continues it beside the store); one killed during the
swap is finished by ``resume`` (each step of the swap can be run again).

Object stores and icechunk build in place: icechunk's commit is the swap; on object storage a
rename is a copy of every cell (a killed build there is resumed, the old levels are gone).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from zv_dask.faults import kill_point
from zv_dask.pyramid.builder import drop_up_links
from zv_dask.store.api import ZVStore, name_store, open_store
from zv_dask.store.backends import local_path
from zv_dask.store.journal import JOURNAL_DIR

__all__ = ["can_build_beside", "open_rebuild", "finish_rebuild", "rebuild_path", "swap"]

_SWAP = "swap.json"  # written when the build is complete: the swap may run (again)


def can_build_beside(zs: ZVStore, journal) -> bool:
    """A standalone build of ``zs`` can run beside its levels: a local plain store with a journal."""
    return journal is not None and zs.backend.kind == "local" and zs.session is None and zs.url is not None


def rebuild_path(zs: ZVStore) -> Path:
    return local_path(zs.url) / JOURNAL_DIR / "rebuild"


def _link_tree(src: Path, dst: Path) -> None:
    """``dst`` mirrors the directory ``src``: the same directories, every file hard-linked."""
    for d, _dirs, files in os.walk(src):
        rel = Path(d).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for f in files:
            os.link(Path(d) / f, dst / rel / f)


def open_rebuild(zs: ZVStore, fresh: bool) -> ZVStore:
    """The store the new levels are built in (made anew with ``fresh``, else the killed build's)."""
    store, work = local_path(zs.url), rebuild_path(zs)
    if fresh or not (work / "zarr.json").exists():
        shutil.rmtree(work, ignore_errors=True)
        (work / "0").mkdir(parents=True)
        for entry in (store / "0").iterdir():
            if entry.is_dir() and entry.name != "links":
                _link_tree(entry, work / "0" / entry.name)
        shutil.copyfile(store / "0" / "zarr.json", work / "0" / "zarr.json")
        shutil.copyfile(store / "zarr.json", work / "zarr.json")
        built = open_store(str(work), "r+")
        drop_up_links(built.root, 0)  # level 0's links are rebuilt with the levels they point to
        return built
    return open_store(str(work), "r+")


def finish_rebuild(zs: ZVStore, built: ZVStore) -> None:
    """Put the levels of ``built`` in the place of ``zs``'s coarse levels (see the module docstring)."""
    work = rebuild_path(zs)
    ome = zs.root.attrs.get("ome")
    if isinstance(ome, dict) and isinstance(ome.get("name"), str):  # named after the store, not "rebuild"
        name_store(built, ome["name"])
    levels = sorted((p.name for p in work.iterdir() if p.name.isdigit() and p.name != "0"), key=int)
    (work / _SWAP).write_text(json.dumps({"levels": levels, "links0": (work / "0" / "links").exists()}))
    swap(zs)


def swap(zs: ZVStore) -> bool:
    """Run (or run again) the swap of a complete build; ``False`` when there is none to run."""
    store, work = local_path(zs.url), rebuild_path(zs)
    if not (work / _SWAP).exists():
        return False
    plan = json.loads((work / _SWAP).read_text())
    aside = work.parent / "replaced"
    aside.mkdir(exist_ok=True)

    def move_aside(p: Path, name: str) -> None:
        if p.exists():
            shutil.rmtree(aside / name, ignore_errors=True)
            os.replace(p, aside / name)

    for p in list(store.iterdir()):  # old coarse levels: those not replaced yet, and those the new pyramid lacks
        if p.name.isdigit() and p.name != "0" and (p.name not in plan["levels"] or (work / p.name).exists()):
            move_aside(p, p.name)
    kill_point("swap")  # the old levels aside, the new ones not yet in: the worst moment to die
    for name in plan["levels"]:
        if (work / name).exists():
            os.replace(work / name, store / name)
    if (work / "0" / "links").exists() or not plan["links0"]:
        move_aside(store / "0" / "links", "links-0")
        if (work / "0" / "links").exists():
            os.replace(work / "0" / "links", store / "0" / "links")
    for doc in ("0/zarr.json", "zarr.json"):  # the root last: readers see the new pyramid only now
        if (work / doc).exists():
            os.replace(work / doc, store / doc)
    shutil.rmtree(aside, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    return True
