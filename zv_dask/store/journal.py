"""The job journal: what a running ingest or pyramid job has made durable, so that a killed job resumes.

A job writes its journal *before* its first cell and removes it *after* its
last metadata document (after the commit on icechunk), so a store with a
journal is a store with an unfinished job. The journal holds

* ``job.json``: what the job is (kind, start time, options, input
  fingerprint) and its plan (bounds, write groups), written once;
* ``done/<stage>/<name>``: one record per finished unit of work (a level-0
  write group, a pyramid task, a finished round of pyramid levels), written
  by whoever finished it, after the cells it describes;
* ``locks/<n>``: the lease of the job process that holds the store (the
  highest ``n`` is current; see :meth:`Journal.acquire`).

Where it lives: a ``.zv-job`` prefix inside a plain store (local or object
storage: every worker writes the store, so every worker reaches it), or beside
an icechunk repository (``<repository>.zv-job/<branch>``), whose own durable
progress is a job branch (:mod:`zv_dask.transaction`).

Records are ``.npz`` files written with ``allow_pickle=False``: the arrays of a
result, and a JSON skeleton that names the (zv-dask) dataclasses they form.
Nothing from a journal is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib
import io
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from zv_dask.errors import StoreBusyError, StoreError, cause_text
from zv_dask.store.backends import local_path, prefix_store, url_scheme
from zv_dask.store.retry import delete_prefix, retry_dropped

__all__ = ["Journal", "JOURNAL_DIR", "journal_for", "journal_at", "job_branch_name", "pack", "unpack",
           "unfinished_message", "with_resume_hint", "JobLock", "LEASE_SECONDS", "job_options", "job_document",
           "differences"]

JOURNAL_DIR = ".zv-job"
LEASE_SECONDS = 60.0  # a job on another host whose lease is older than this is taken for dead
HEARTBEAT_SECONDS = 10.0
JOB_BRANCH_PREFIX = "zv-dask-job/"


# -- records ----------------------------------------------------------------------------------
def _encode(obj, arrays: list):
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        arrays.append(np.ascontiguousarray(obj))
        return {"__a": len(arrays) - 1}
    if isinstance(obj, (bytes, bytearray, memoryview)):
        arrays.append(np.frombuffer(bytes(obj), np.uint8))
        return {"__b": len(arrays) - 1}
    if isinstance(obj, tuple):
        return {"__t": [_encode(v, arrays) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, arrays) for v in obj]
    if isinstance(obj, dict):
        return {"__d": [[_encode(k, arrays), _encode(v, arrays)] for k, v in obj.items()]}
    if dataclasses.is_dataclass(obj):
        cls = type(obj)
        if not cls.__module__.startswith("zv_dask."):
            raise TypeError(f"cannot journal a {cls.__module__}.{cls.__qualname__}")
        return {"__c": f"{cls.__module__}:{cls.__qualname__}",
                "f": {f.name: _encode(getattr(obj, f.name), arrays) for f in dataclasses.fields(obj)}}
    raise TypeError(f"cannot journal a {type(obj).__name__}")


def _decode(node, arrays):
    if isinstance(node, list):
        return [_decode(v, arrays) for v in node]
    if not isinstance(node, dict):
        return node
    if "__a" in node:
        return arrays[f"a{node['__a']}"]
    if "__b" in node:
        return arrays[f"a{node['__b']}"].tobytes()
    if "__t" in node:
        return tuple(_decode(v, arrays) for v in node["__t"])
    if "__d" in node:
        return {_decode(k, arrays): _decode(v, arrays) for k, v in node["__d"]}
    module, _, name = node["__c"].partition(":")
    if not module.startswith("zv_dask."):
        raise StoreError(f"a journal record names {node['__c']!r}, which is not a zv-dask type")
    cls: Any = importlib.import_module(module)
    for part in name.split("."):
        cls = getattr(cls, part)
    return cls(**{k: _decode(v, arrays) for k, v in node["f"].items()})


def pack(obj) -> bytes:
    """A task result (dataclasses of arrays, dicts, tuples, bytes) as the bytes of one ``.npz`` record."""
    arrays: list = []
    skeleton = json.dumps(_encode(obj, arrays))
    buf = io.BytesIO()
    np.savez(buf, __skeleton__=np.frombuffer(skeleton.encode(), np.uint8),
             **{f"a{i}": a for i, a in enumerate(arrays)})
    return buf.getvalue()


def unpack(raw: bytes):
    """The object :func:`pack` wrote."""
    with np.load(io.BytesIO(raw), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return _decode(json.loads(arrays.pop("__skeleton__").tobytes().decode()), arrays)


# -- the journal --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Journal:
    """A job's journal: ``prefix`` under the local directory or object-store URL ``url``. Picklable."""

    url: str
    prefix: str = JOURNAL_DIR
    options: dict = field(default_factory=dict, repr=False, compare=False, hash=False)

    @property
    def local(self) -> bool:
        return url_scheme(self.url) in ("", "file")

    def _store(self):
        return prefix_store(self.url, self.options)

    def where(self, name: str = "") -> str:
        return f"{self.url.rstrip('/')}/{self.prefix}/{name}".rstrip("/")

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    # raw objects
    def put(self, name: str, data: bytes, *, create: bool = False) -> bool:
        """Write one object whole; with ``create``, only if it does not exist (``False`` if it did)."""
        import obstore

        tries = []

        def put():
            tries.append(1)
            obstore.put(self._store(), self._key(name), data, mode="create" if create else "overwrite")

        try:
            retry_dropped(put)
        except FileExistsError:
            return len(tries) > 1 and self.get(name) == data  # (a retry: the first try may have landed)
        except Exception as e:
            if create and "AlreadyExists" in type(e).__name__ + str(e)[:200]:
                return len(tries) > 1 and self.get(name) == data
            raise StoreError(f"cannot write the job journal at {self.where(name)}: "
                             f"{cause_text(e, self.where(name))}") from e
        return True

    def get(self, name: str) -> bytes | None:
        import obstore

        try:
            return bytes(obstore.get(self._store(), self._key(name)).bytes())
        except FileNotFoundError:
            return None
        except Exception as e:
            if "NotFound" in type(e).__name__ or "not found" in str(e).lower()[:300]:
                return None
            raise StoreError(f"cannot read the job journal at {self.where(name)}: {type(e).__name__}: "
                             f"{(str(e).splitlines() or [''])[0]}") from e

    def put_many(self, items: dict[str, bytes]) -> None:
        """Write many objects concurrently (pre-images of cells: many small objects)."""
        import asyncio

        import obstore
        from zarr.core.sync import sync

        if not items:
            return
        store = self._store()

        async def run():
            sem = asyncio.Semaphore(64)

            async def one(name, data):
                async with sem:
                    await obstore.put_async(store, self._key(name), data)

            await asyncio.gather(*(one(n, d) for n, d in items.items()))

        try:
            sync(run())
        except Exception as e:
            raise StoreError(f"cannot write the job journal at {self.where()}: {cause_text(e, self.where())}") from e

    def get_many(self, names: list[str]) -> list[bytes | None]:
        """Read many objects concurrently (``None`` where one does not exist)."""
        import asyncio

        import obstore
        from zarr.core.sync import sync

        store = self._store()

        async def run():
            sem = asyncio.Semaphore(64)

            async def one(name):
                async with sem:
                    try:
                        r = await obstore.get_async(store, self._key(name))
                    except FileNotFoundError:
                        return None
                    return bytes(await r.bytes_async())

            return await asyncio.gather(*(one(n) for n in names))

        return list(sync(run())) if names else []

    def names(self, sub: str) -> list[str]:
        """The names of the objects directly under ``sub/``, sorted."""
        import obstore

        prefix = self._key(sub).rstrip("/") + "/"
        if self.local and not os.path.isdir(os.path.join(str(local_path(self.url)), prefix)):
            return []
        out = []
        try:
            for batch in obstore.list(self._store(), prefix=prefix, chunk_size=1000):
                out += [m["path"][len(prefix):] for m in batch]
        except FileNotFoundError:
            return []
        return sorted(n for n in out if n and "/" not in n)

    def exists(self) -> bool:
        return self.get("job.json") is not None

    def remove(self) -> None:
        """Remove the whole journal (the job is over).

        The job document goes first: a journal is a job only while it has one, so a
        reader never finds a job whose lease (``locks/``) is already gone and takes a
        job that is finishing for a killed one.
        """
        import obstore

        if self.local:
            import shutil

            root = str(local_path(self.url))
            try:
                os.remove(os.path.join(root, self.prefix, "job.json"))
            except OSError:
                pass
            shutil.rmtree(os.path.join(root, self.prefix), ignore_errors=True)
            if self.url.endswith(JOURNAL_DIR):  # beside an icechunk repository: the directory is ours
                try:
                    os.rmdir(root)
                except OSError:
                    pass
            return
        store = self._store()
        retry_dropped(lambda: obstore.delete(store, self._key("job.json")))
        delete_prefix(store, self.prefix + "/")

    # structured
    def write_json(self, name: str, doc: dict, *, create: bool = False) -> bool:
        return self.put(name, json.dumps(doc, indent=1, sort_keys=True).encode(), create=create)

    def read_json(self, name: str) -> dict | None:
        raw = self.get(name)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise StoreError(f"the job journal at {self.where(name)} is not valid JSON") from None

    def job(self) -> dict | None:
        """The job document, or ``None`` when no job is unfinished here."""
        return self.read_json("job.json")

    def record(self, stage: str, name: str, obj) -> None:
        """Mark one unit of ``stage`` finished, with what it produced (written after its cells)."""
        self.put(f"done/{stage}/{name}.npz", pack(obj))

    def finished(self, stage: str) -> list[str]:
        """The names of the finished units of ``stage``."""
        return [n[:-4] for n in self.names(f"done/{stage}") if n.endswith(".npz")]

    def load(self, stage: str, name: str):
        raw = self.get(f"done/{stage}/{name}.npz")
        return None if raw is None else unpack(raw)

    def forget(self, stage: str) -> None:
        """Drop every record of ``stage`` (a stage that is redone from its start)."""
        import obstore

        names = self.names(f"done/{stage}")
        if names:
            retry_dropped(lambda: obstore.delete(self._store(), [self._key(f"done/{stage}/{n}") for n in names]))

    # the lease
    def _current_lease(self) -> tuple[int, dict | None]:
        """``(number of the next lease, the current lease if a live process holds it)``."""
        names = [int(n) for n in self.names("locks") if n.isdigit()]
        if not names:
            return 0, None
        held = self.read_json(f"locks/{max(names):08d}") or {}
        return max(names) + 1, (held if held.get("state") != "released" and _alive(held) else None)

    def holder(self) -> dict | None:
        """The lease of the live process that holds the store, or ``None`` (no lease, released or dead)."""
        return self._current_lease()[1]

    def acquire(self, what: str) -> JobLock:
        """Take the store for this process, or raise :class:`StoreError` naming the job that holds it.

        Leases are ``locks/<n>`` objects created with create-if-absent, so of two
        processes taking over the same dead lease ``n`` exactly one creates
        ``n + 1``. A lease is dead when its process is gone (same host) or it
        has not been renewed for :data:`LEASE_SECONDS` (another host).
        """
        n, held = self._current_lease()
        if held:
            raise StoreBusyError(_held_message(self, held))
        me = {"host": socket.gethostname(), "pid": os.getpid(), "what": what, "since": _now(),
              "renewed": time.time(), "state": "held"}
        if not self.write_json(f"locks/{n:08d}", me, create=True):
            held = self.read_json(f"locks/{n:08d}") or {}
            raise StoreBusyError(_held_message(self, held))
        return JobLock(self, f"locks/{n:08d}", me)


def _alive(lease: dict) -> bool:
    if not lease:
        return False
    if lease.get("host") == socket.gethostname():
        try:
            os.kill(int(lease.get("pid", -1)), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, ValueError, OverflowError):
            return True
        return True
    return time.time() - float(lease.get("renewed", 0)) < LEASE_SECONDS


def _lease_words(held: dict) -> str:
    """"process P on H, since S, lease renewed Ns ago"."""
    age = time.time() - float(held.get("renewed", time.time()))
    return f"process {held.get('pid')} on {held.get('host')}, since {held.get('since')}, lease renewed {age:.0f}s ago"


def _held_message(journal: Journal, held: dict) -> str:
    return (f"another job is writing this store ({held.get('what', 'a zv-dask job')}, {_lease_words(held)}); wait "
            f"for it to finish, or stop it and resume (journal: {journal.where()})")


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()


class JobLock:
    """A held lease: renewed in the background while the job runs; :meth:`check` before finishing."""

    def __init__(self, journal: Journal, name: str, doc: dict):
        self.journal, self.name, self.doc = journal, name, doc
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="zv-dask-job-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self.doc["renewed"] = time.time()
                self.journal.write_json(self.name, self.doc)
            except Exception:  # noqa: BLE001 - a missed renewal is retried; check() catches a lost lease
                pass

    def check(self) -> None:
        """Raise if another process has taken the store over meanwhile (our lease is no longer current)."""
        names = [n for n in self.journal.names("locks") if n.isdigit()]
        if names and f"locks/{max(names, key=int)}" != self.name:
            held = self.journal.read_json(f"locks/{max(names, key=int)}") or {}
            raise StoreError("this job lost the store to another job: " + _held_message(self.journal, held))

    def release(self) -> None:
        """Give the store back: the lease object goes (the next job takes the same number again)."""
        import obstore

        self._stop.set()
        self._thread.join(timeout=5)
        try:
            if self.journal.get(self.name) is not None:  # (gone with the journal of a finished job)
                retry_dropped(lambda: obstore.delete(self.journal._store(), self.journal._key(self.name)))
        except Exception:  # noqa: BLE001 - best effort: a dead process's lease is dead anyway
            pass


def with_resume_hint(e: Exception, kind: str = "job") -> Exception:
    """``e`` with a last sentence that says the finished work is kept and how to go on."""
    hint = (f"; the finished work is kept: run the same {kind} again with resume=True (--resume) to continue"
            + (", or with overwrite=True (--overwrite) to start again" if kind == "job" else ""))
    if "resume=True (--resume)" not in str(e):
        e.args = ((str(e.args[0]) if e.args else str(e)) + hint,) + tuple(e.args[1:])
    return e


# -- where, and what it says ---------------------------------------------------------------------
def job_branch_name(branch: str) -> str:
    """The icechunk branch a durable job on ``branch`` commits its progress to."""
    return f"{JOB_BRANCH_PREFIX}{branch}"


def journal_for(backend) -> Journal | None:
    """The journal of a store's backend, or ``None`` when the store has no location (an object passed in)."""
    icechunk = getattr(backend, "kind", None) == "icechunk" or getattr(backend, "session", None) is not None
    return journal_at(getattr(backend, "url", None), icechunk=icechunk, options=getattr(backend, "options", None),
                      branch=getattr(backend, "branch", "main"))


def journal_at(url, *, icechunk: bool = False, options: dict | None = None, branch: str = "main") -> Journal | None:
    """The journal of the store (or icechunk repository, for ``branch``) at ``url``; ``None`` without one."""
    if not isinstance(url, (str, os.PathLike)) or url_scheme(os.fspath(url)) == "memory":
        return None
    url = os.fspath(url)
    if url_scheme(url) in ("", "file"):
        url = os.path.abspath(str(local_path(url)))
    if icechunk:
        return Journal(url.rstrip("/") + JOURNAL_DIR, branch, dict(options or {}))
    return Journal(url, JOURNAL_DIR, dict(options or {}))


def unfinished_message(job: dict, journal: Journal) -> str:
    """"unfinished <kind> job (started ..., N of M groups written): resume with --resume or discard with
    --overwrite"."""
    done = len(journal.finished("level0")) if job.get("kind") == "ingest" else None
    total = job.get("plan", {}).get("groups")
    progress = f", {done} of {total} groups written" if done is not None and total is not None else ""
    if job.get("kind") == "pyramid" or job.get("stage") == "pyramid":
        rounds = len(journal.finished("rounds"))
        progress += f", {rounds} pyramid round(s) finished"
    fix = ("resume with --resume (resume=True) or discard with --overwrite (overwrite=True)"
           if job.get("kind") == "ingest" else "resume with --resume (resume=True) or run the build again")
    if job.get("kind") == "append":
        progress = ""
        fix = ("undo it with `zv-dask rollback` (zv_dask.roll_back), or run the append again with --resume "
               "(resume=True), which undoes it first")
    held = journal.holder()
    if held:  # not a killed job's leftover: a job at work now
        return (f"unfinished {job.get('kind', 'zv-dask')} job that another process is running now "
                f"({_lease_words(held)}{progress}): wait for it to finish, or stop it and then {fix}")
    return f"unfinished {job.get('kind', 'zv-dask')} job (started {job.get('started', '?')}{progress}): {fix}"


# -- what makes two jobs the same job ------------------------------------------------------------
def _plain(v):
    """JSON-ready, order-stable form of an option value."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in sorted(v.items(), key=lambda kv: str(kv[0]))}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, np.ndarray):
        return _plain(v.tolist())
    if isinstance(v, (np.integer, np.floating, np.bool_)):
        return v.item()
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return repr(v)


def job_options(**options) -> dict:
    """The options that decide what an ingest writes, as they were asked (plain JSON)."""
    return {k: _plain(v) for k, v in sorted(options.items())}


def job_document(kind: str, options: dict, fingerprint: dict, scanned: dict, plan: dict) -> dict:
    """The ``job.json`` of a job: what it is, what it reads, what it found, its plan."""
    return {"version": 1, "id": uuid.uuid4().hex[:16], "kind": kind, "started": _now(),
            "options": options, "input": fingerprint, "scan": scanned, "plan": plan}


def differences(old: dict, new: dict, where: str = "") -> list[str]:
    """Human-readable differences between two JSON documents (``old`` is the journal's)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        name = f"{where}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, name + ".")
        elif k == "files" and isinstance(a, list) and isinstance(b, list):
            out += _file_differences(a, b)
        elif a != b:
            out.append(f"{name}: {_short(a)} then, {_short(b)} now")
    return out


def _file_differences(old: list, new: list) -> list[str]:
    before = {f["path"]: f for f in old}
    after = {f["path"]: f for f in new}
    out = [f"input file {p} is gone" for p in sorted(set(before) - set(after))]
    out += [f"input file {p} is new" for p in sorted(set(after) - set(before))]
    for p in sorted(set(before) & set(after)):
        a, b = before[p], after[p]
        if a["size"] != b["size"]:
            out.append(f"input file {p} changed size ({a['size']:,} bytes then, {b['size']:,} now)")
        elif a["mtime_ns"] != b["mtime_ns"]:
            out.append(f"input file {p} was modified since the job started")
    return out


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


