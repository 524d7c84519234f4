"""After an append: the coarse levels rebuilt only in the regions whose children changed.

Each region of level ``k`` (:func:`~zv_dask.pyramid.plan.region_shape`) is
made from the level ``k - 1`` chunks inside it and nothing else, so when an
append has changed some level-0 chunks, level 1 is rebuilt in the regions that
hold them: every cell of those regions, with the links between the two levels
there. Cells of those regions that the rebuild leaves empty are deleted; the
level's metadata is merged (what lies outside the regions stays as it was).
The chunks of the rebuilt regions are the changed chunks the next level starts
from, and so on up. The levels come out byte-identical to a build over all the
points; the top of an automatic pyramid (``levels=None``) is decided again by
the same stop criteria, so it may gain a level or lose some.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import numpy as np

from zv_dask.format.cells import decode_fragments
from zv_dask.format.grid import Grid, chunk_keys, parse_chunk_key
from zv_dask.format.links import (
    decode_link_rows,
    link_array_attrs,
    link_family_attrs,
    offset_segment,
    parse_offset_segment,
)
from zv_dask.pyramid.builder import (
    LevelSource,
    PyramidBuilder,
    PyramidReport,
    drop_up_links,
    mark_links_present,
    small_enough,
)
from zv_dask.pyramid.plan import region_shape
from zv_dask.store.api import (
    create_resolution_level,
    create_vlen_arrays,
    list_resolution_levels,
    remove_resolution_level,
    update_node_attrs,
)
from zv_dask.store.cellio import cell_keys, delete_cells
from zv_dask.store.levels import ChunkSummary, finalize_level, level_chunk_keys, read_payloads, write_cells
from zv_dask.store.nodes import array_at, attr_dict, attrs_of, group_at
from zv_dask.store.objects import chunks_in, object_entries
from zv_dask.store.preimage import save_cells

__all__ = ["update_pyramid", "predict_rewrites", "LevelUpdate", "keys_at"]


@dataclass
class LevelUpdate:
    """What an append rewrote at one level: chunks whose cells were written or deleted, regions rebuilt."""

    level: int
    chunks: int = 0
    regions: int = 0
    deleted: int = 0


@dataclass
class _Family:
    """One link family's cells in the rebuilt regions, before the rebuild."""

    owner: int
    delta: int
    grid: Grid
    old: dict = field(default_factory=dict)  # segment -> (chunks in the regions, records there)


def keys_at(path: str, origin, chunks: np.ndarray) -> list[str]:
    """The store keys of an array's cells at absolute ``chunks``."""
    if not len(chunks):
        return []
    cells = np.asarray(chunks, np.int64).reshape(len(chunks), -1) - np.asarray(origin, np.int64)
    return cell_keys(path, cells)


def _chunks_of(keys) -> np.ndarray:
    keys = list(keys)
    if not keys:
        return np.zeros((0, 0), np.int64)
    return np.array([parse_chunk_key(k) for k in keys], np.int64)


def _in_regions(chunks: np.ndarray, per: np.ndarray, regions: np.ndarray) -> np.ndarray:
    chunks = np.asarray(chunks, np.int64)
    if not len(chunks) or not len(regions):
        return np.zeros(len(chunks), bool)
    return chunks_in(np.floor_divide(chunks, per), regions)


def _origin(arr) -> list[int]:
    ndim = len(arr.shape)
    return list(arr.attrs.get("chunk_grid_origin", [0] * ndim))


def _records(payloads: list[bytes]) -> int:
    return int(sum(len(decode_link_rows(p)) for p in payloads if p))


def _cat(parts: list[np.ndarray], ndim: int) -> np.ndarray:
    parts = [np.asarray(p, np.int64).reshape(-1, ndim) for p in parts if len(p)]
    return np.unique(np.concatenate(parts), axis=0) if parts else np.zeros((0, ndim), np.int64)


class _Rebuild:
    """One coarse level rebuilt in the regions holding the changed chunks of its parent."""

    def __init__(self, builder: PyramidBuilder, src: LevelSource, changed: np.ndarray, journal):
        self.b, self.src, self.journal = builder, src, journal
        self.zs = builder.zs
        self.ndim = builder.ndim
        step = builder.peek_step()
        assert step is not None, "a rebuild is made for a level still to build"
        self.batch = builder.plan_batch(src, [step])
        self.lv = self.batch.levels[0]
        self.k = step.level
        region = np.asarray(self.batch.region, np.int64)
        bpc = np.asarray(builder.bpc, np.int64)
        self.per_fine = region // (bpc * np.asarray(src.scale, np.int64))
        self.per_coarse = region // (bpc * np.asarray(step.total_scale, np.int64))
        changed = np.asarray(changed, np.int64).reshape(-1, self.ndim)
        self.regions = np.unique(np.floor_divide(changed, self.per_fine), axis=0) if len(changed) else changed

    def per(self, owner: int) -> np.ndarray:
        return self.per_fine if owner == self.k - 1 else self.per_coarse

    def run(self) -> tuple[LevelSource, np.ndarray, LevelUpdate]:
        zs, k, lv, ndim = self.zs, self.k, self.lv, self.ndim
        root = zs.root
        g = group_at(root, str(k))
        grid = lv.geom.grid
        # what the regions hold now: the level's cells and both link families' cells
        old = _chunks_of(level_chunk_keys(g)).reshape(-1, ndim)
        inside = _in_regions(old, self.per_coarse, self.regions)
        old_in, old_out = old[inside], old[~inside]
        arrays = [f"{k}/vertices", f"{k}/vertex_fragments"] + [f"{k}/vertex_attributes/{s.name}" for s in lv.specs]
        frag = read_payloads(zs.store, array_at(root, f"{k}/vertex_fragments"), old_in)
        old_rows = int(sum(int(decode_fragments(p).counts.sum()) for p in frag if p))
        families = {d: self._old_family(d) for d in lv.link_axes}
        keys = [key for path in arrays for key in keys_at(path, grid.origin, old_in)]
        for fam in families.values():
            for seg, (chunks, _) in fam.old.items():
                keys += keys_at(f"{fam.owner}/links/{fam.delta:+d}/{seg}", fam.grid.origin, chunks)
        if self.journal is not None:  # a plain store: the old bytes are kept before they change
            save_cells(zs.store, self.journal, f"level-{k:03d}", keys)
        self._prepare_links(families)
        fine = self.src
        fine_in = fine.chunks[_in_regions(fine.chunks, self.per_fine, self.regions)]
        restricted = LevelSource(fine.level, fine.grid, fine.scale, fine_in, None, fine.vertex_count, fine.specs,
                                 fine.objects, fine.all_ids)
        results = self.b.build_batch(self.batch, restricted) if len(fine_in) else []
        summaries = [r for r, _ in results]
        parts = [s.levels[k] for s in summaries if k in s.levels]
        new = ChunkSummary.concat(parts, ndim)
        new_present = new.chunks[new.rows > 0].reshape(-1, ndim)
        stale = old_in[~chunks_in(old_in, new_present)] if len(old_in) else old_in
        delete_cells(zs.store, [key for path in arrays for key in keys_at(path, grid.origin, stale)])
        # the level's metadata, merged
        present = np.concatenate([old_out, new_present]).reshape(-1, ndim)
        count = int(attr_dict(g, "zarr_vectors_level", {}).get("vertex_count", 0)) - old_rows + int(new.rows.sum())
        summary = ChunkSummary(present, np.ones(len(present), np.int64))
        objects = None
        if fine.objects is not None:
            objects = self._merged_objects(g, new)
            summary.object_ids, summary.object_chunks, summary.object_fragments = objects
        lm = self.b.level_metadata(lv, fine)
        finalize_level(root, k, grid, summary, lm, lv.specs, all_object_ids=fine.all_ids, vertex_count=count)
        for delta, fam in families.items():
            n = self._finish_family(fam, summaries)
            self.b.report.link_counts[f"{fam.owner}/{delta:+d}"] = n
            if n and fam.owner == k:
                lm.arrays_present = list(lm.arrays_present) + ["links"]
            elif n:
                mark_links_present(group_at(root, str(fam.owner)))
        create_resolution_level(zs, k, lm)
        rep = self.b.report
        rep.levels.append(k)
        rep.vertex_counts[k] = count
        rep.chunk_counts[k] = len(present)
        rep.bin_shapes[k] = lv.bin_shape
        rep.tasks[k] = len(results)
        nxt = LevelSource(k, grid, lv.step.total_scale, present, None, count, lv.specs, objects, fine.all_ids)
        changed = _cat([old_in, new_present], ndim)
        return nxt, changed, LevelUpdate(k, len(changed), len(self.regions), len(stale))

    # -- links -------------------------------------------------------------------------------
    def _old_family(self, delta: int) -> _Family:
        k = self.k
        owner = k - 1 if delta > 0 else k
        grid = self.lv.geom.fine_grid if delta > 0 else self.lv.geom.grid
        fam = _Family(owner, delta, grid)
        root = self.zs.root
        path = f"{owner}/links/{delta:+d}"
        if "links" not in group_at(root, str(owner)) or f"{delta:+d}" not in group_at(root, f"{owner}/links"):
            return fam
        fam_g = group_at(root, path)
        for seg in self._segments(delta):
            if seg not in fam_g:
                continue
            arr = array_at(fam_g, seg)
            chunks = _chunks_of(attrs_of(arr).get("nonempty_chunks", [])).reshape(-1, self.ndim)
            inside = chunks[_in_regions(chunks, self.per(owner), self.regions)]
            fam.old[seg] = (inside, _records(read_payloads(self.zs.store, arr, inside)))
        return fam

    def _segments(self, delta: int) -> list[str]:
        """Every offsets array a family of this step may have (listing the group would see cells of plain
        stores' arrays not made yet as stray objects)."""
        return [offset_segment(o) for o in itertools.product(*self.lv.link_axes[delta])]

    def _prepare_links(self, families: dict) -> None:
        """Arrays the tasks write into must exist first on icechunk and compressed stores (made empty)."""
        root = self.zs.root
        made = False
        for delta, fam in families.items():
            offsets = self.lv.link_created.get(delta)
            if offsets is None:
                continue
            links = group_at(root, str(fam.owner)).require_group("links")
            name = f"{delta:+d}"
            if name not in links:
                links.create_group(name, attributes=link_family_attrs(delta, self.ndim, 0))
            fam_g = group_at(links, name)
            missing = [o for o in offsets if offset_segment(o) not in fam_g]
            create_vlen_arrays(fam_g, fam.grid, [(offset_segment(o), link_array_attrs(delta, o, [], fam.grid.origin))
                                                 for o in missing], compressors=self.b.compressors)
            made = made or bool(missing)
        if made:
            self.b.job.absorb([])

    def _finish_family(self, fam: _Family, summaries: list) -> int:
        """Merge one family's presence lists and record counts; arrays left without records go."""
        root = self.zs.root
        owner, delta = fam.owner, fam.delta
        new: dict[str, list] = {}
        returned = []
        for s in summaries:
            for (lvl, d, seg), (chunks, counts) in s.links.items():
                if lvl == owner and d == delta:
                    new.setdefault(seg, []).append((chunks, counts))
            returned += s.link_cells.get((owner, delta), [])
        links = group_at(root, str(owner)).require_group("links")
        name = f"{delta:+d}"
        old_total = int(attrs_of(group_at(links, name)).get("num_links", 0)) if name in links else 0
        if name not in links:
            links.create_group(name, attributes=link_family_attrs(delta, self.ndim, 0))
        fam_g = group_at(links, name)
        total = old_total - sum(n for _, n in fam.old.values())
        create, update, stale_keys = [], {}, []
        for seg in sorted(set(fam.old) | set(new) | {n for n in self._segments(delta) if n in fam_g}):
            in_old, _ = fam.old.get(seg, (np.zeros((0, self.ndim), np.int64), 0))
            parts = new.get(seg, [])
            chunks_new = _cat([c for c, _ in parts], self.ndim)
            total += int(sum(int(np.sum(c)) for _, c in parts))
            stale = in_old[~chunks_in(in_old, chunks_new)] if len(in_old) else in_old
            stale_keys += keys_at(f"{owner}/links/{name}/{seg}", fam.grid.origin, stale)
            listed = _chunks_of(attrs_of(array_at(fam_g, seg)).get("nonempty_chunks", [])).reshape(-1, self.ndim) \
                if seg in fam_g else np.zeros((0, self.ndim), np.int64)
            outside = listed[~_in_regions(listed, self.per(owner), self.regions)]
            keys = sorted(chunk_keys(np.concatenate([outside, chunks_new]).reshape(-1, self.ndim)))
            attrs = link_array_attrs(delta, parse_offset_segment(seg), keys, fam.grid.origin)
            if not keys:
                if seg in fam_g:
                    del fam_g[seg]
            elif seg in fam_g:
                update[f"{fam_g.path}/{seg}"] = attrs
            else:
                create.append((seg, attrs))
        delete_cells(self.zs.store, stale_keys)
        create_vlen_arrays(fam_g, fam.grid, create, compressors=self.b.compressors)
        update_node_attrs(fam_g.store, update)
        write_cells(fam_g.store, returned, plain=self.b.plain or None)
        if total:
            update_node_attrs(fam_g.store, {fam_g.path: link_family_attrs(delta, self.ndim, total)})
        else:
            del links[name]
            if not list(links.keys()):
                del group_at(root, str(owner))["links"]
        return total

    def _merged_objects(self, g, new: ChunkSummary):
        """The level's object entries: those outside the regions as they were, the rebuilt ones new."""
        ndim = self.ndim
        if "object_index" in g:
            _, oid, och, ofr = object_entries(g, ndim)
            keep = ~_in_regions(och, self.per_coarse, self.regions)
            oid, och, ofr = oid[keep], och[keep], ofr[keep]
        else:
            oid, och, ofr = np.zeros(0, np.int64), np.zeros((0, ndim), np.int64), np.zeros(0, np.int64)
        if new.object_ids is not None:
            oid = np.concatenate([oid, new.object_ids])
            och = np.concatenate([och, np.asarray(new.object_chunks, np.int64).reshape(-1, ndim)])
            ofr = np.concatenate([ofr, new.object_fragments])
        return oid, och, ofr


def update_pyramid(builder: PyramidBuilder, src: LevelSource, changed: np.ndarray, *, journal=None,
                   old_top: int | None = None) -> tuple[PyramidReport, list[LevelUpdate]]:
    """Rebuild the store's coarse levels where the level-0 ``changed`` chunks lie, then its top.

    ``builder`` carries the options the pyramid was built with (one level per
    round); ``src`` is the merged level 0. Returns the report and, per level,
    what was rewritten.
    """
    t0 = time.perf_counter()
    zs = builder.zs
    top = old_top if old_top is not None else max([k for k in list_resolution_levels(zs) if k > 0], default=0)
    rep = builder.report
    rep.vertex_counts[0] = src.vertex_count
    rep.chunk_counts[0] = len(src.chunks)
    updates = []
    reason = ""
    for k in itertools.count(1):
        if k > top or builder.peek_step() is None:
            break
        builder.building = [k]
        t = time.perf_counter()
        src, changed, upd = _Rebuild(builder, src, changed, journal).run()
        rep.level_seconds[k] = time.perf_counter() - t
        builder.advance()
        builder.building = None
        updates.append(upd)
        if builder.levels is None:
            reason = small_enough(src.vertex_count, len(src.chunks), builder.min_points)
            if not reason and src.vertex_count >= rep.vertex_counts[k - 1]:
                reason = f"level {k} removed no point"
            if reason:
                for j in range(top, k, -1):  # levels the larger pyramid no longer reaches
                    remove_resolution_level(zs, j)

                drop_up_links(zs.root, k)
                rep.link_counts.pop(f"{k}/+1", None)
                break
    if not reason:  # the top of the old pyramid: the build goes on from there as a new build would
        before = set(rep.levels)
        src = builder.run(src, builder.first_reason(src.vertex_count, len(src.chunks)) if top == 0 else "")
        updates += [LevelUpdate(k, rep.chunk_counts.get(k, 0), 0) for k in rep.levels if k not in before]
    else:
        rep.stop_reason = reason
    rep.seconds = time.perf_counter() - t0
    return rep, updates


def predict_rewrites(builder: PyramidBuilder, changed: np.ndarray) -> list[LevelUpdate]:
    """Per existing coarse level, the regions an append touching the level-0 ``changed`` chunks rebuilds and
    the chunks there now (what a dry run shows; the rebuild may add chunks the old pyramid did not have)."""
    zs = builder.zs
    ndim = builder.ndim
    bpc = np.asarray(builder.bpc, np.int64)
    scale = np.ones(ndim, np.int64)
    changed = np.asarray(changed, np.int64).reshape(-1, ndim)
    out = []
    for i, k in enumerate(k for k in list_resolution_levels(zs) if k > 0):
        step = builder.peek_step(i)
        if step is None:
            break
        region = np.asarray(region_shape(step, builder.bpc), np.int64)
        regions = np.unique(np.floor_divide(changed, region // (bpc * scale)), axis=0) if len(changed) else changed
        old = _chunks_of(level_chunk_keys(group_at(zs.root, str(k)))).reshape(-1, ndim)
        inside = old[_in_regions(old, region // (bpc * np.asarray(step.total_scale, np.int64)), regions)]
        out.append(LevelUpdate(k, len(inside), len(regions)))
        changed, scale = inside, np.asarray(step.total_scale, np.int64)
    return out
