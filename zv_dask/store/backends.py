"""Turn what the user passed (a path, a URL, a zarr Store, an obstore store, an
icechunk Repository or Session) into a zarr store, plus the icechunk session
when the backend is transactional.

Object storage goes through obstore wrapped by zarr's ``ObjectStore``; the
transactional backend is icechunk. Storage options use one vocabulary for both
(``endpoint``, ``region``, ``access_key_id``, ``secret_access_key``,
``session_token``, ``allow_http``, ``anonymous``, ``timeout``, ``connect_timeout``,
``max_retries``) so a job can switch between them with one flag. ``endpoint_url``
and ``force_path_style`` (icechunk's spellings) are accepted by both; ``timeout``
bounds one request attempt and ``max_retries`` counts retries after the first
attempt on both (icechunk gets them as repository ``StorageSettings``). Explicit
S3 keys always win over ``AWS_*`` environment variables. Credentials are kept in
:attr:`Backend.options` but never shown in a repr.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from zv_dask.errors import StoreError
from zv_dask.store.credentials import icechunk_credentials, redact
from zv_dask.store.retry import RetryingObjectStore

if TYPE_CHECKING:
    from obstore.store import ObjectStore

__all__ = ["Backend", "resolve_backend", "local_path", "url_scheme", "object_store", "check_creatable"]

OBJECT_SCHEMES = {"s3", "s3a", "gs", "gcs", "az", "azure", "abfs", "abfss", "http", "https", "memory"}
BACKENDS = (None, "local", "obstore", "fsspec", "icechunk")


@dataclass
class Backend:
    """A resolved backend: the zarr store to read and write, and what it came from."""

    store: Any
    kind: str
    url: str | None = None
    session: Any = None
    repository: Any = None
    branch: str = "main"
    options: dict = field(default_factory=dict, repr=False)

    @property
    def transactional(self) -> bool:
        return self.session is not None


def url_scheme(target) -> str:
    """The lower-case URL scheme of ``target`` (``""`` for paths, Windows drive letters and non-strings)."""
    if not isinstance(target, str):
        return ""
    scheme = urlparse(target).scheme.lower()
    return scheme if len(scheme) > 1 else ""  # "C:" drive letters are paths


def local_path(target) -> Path:
    """A local path or ``file://`` URL as an absolute :class:`~pathlib.Path`.

    Absolute in *this* process's directory: a path a user gives is relative to
    the client, and whatever is sent to workers (which run in directories of
    their own) must not depend on theirs.
    """
    if isinstance(target, str) and target.startswith("file://"):
        target = unquote(urlparse(target).path)
    return Path(os.path.abspath(os.fspath(target)))


def check_creatable(target) -> None:
    """Raise :class:`StoreError` when no store can be made at a local path or ``file://`` URL (else nothing).

    Probed by making and removing a directory where the store would go (the nearest
    existing ancestor), so that a read-only, virtual or full file system, or a file in the
    way, is found before a job reads its input.
    """
    if not isinstance(target, (str, os.PathLike)) or url_scheme(os.fspath(target)) not in ("", "file"):
        return
    path = local_path(target)
    parent = path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if path.exists():
        return
    if not parent.is_dir():
        raise StoreError(f"cannot make a store at {str(path)!r}: {str(parent)!r} is a file, not a directory")
    import tempfile

    try:
        os.rmdir(tempfile.mkdtemp(prefix=".zv-probe-", dir=parent))
    except OSError as e:
        raise StoreError(f"cannot make a store at {str(path)!r}: {str(parent)!r} does not take new directories "
                         f"({e.strerror or type(e).__name__})") from None


def _split_bucket(url: str) -> tuple[str, str]:
    p = urlparse(url)
    return p.netloc, p.path.strip("/")


_DURATION_UNITS = {"ms": 1e-3, "s": 1.0, "sec": 1.0, "secs": 1.0, "m": 60.0, "min": 60.0, "mins": 60.0, "h": 3600.0}


def _seconds(value, name: str) -> float:
    """A duration given as seconds (number), a ``timedelta`` or a string like ``"30s"`` / ``"500ms"``."""
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*", value.lower())
        if m and m.group(2) in ("", *_DURATION_UNITS):
            return float(m.group(1)) * _DURATION_UNITS.get(m.group(2), 1.0)
    raise StoreError(f"storage option {name!r} must be a duration (seconds as a number, a timedelta or a "
                     f"string like '30s' or '500ms'), got {value!r}")


def _max_retries(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise StoreError(f"storage option 'max_retries' must be an integer >= 0, got {value!r}")
    return int(value)


# Retries of object-storage requests (obstore's ``retry_config``, icechunk's ``StorageRetriesSettings``)
# when storage_options do not say otherwise. obstore (object_store 0.12) retries 5xx answers (503
# SlowDown), 429, refused connections, and dropped connections and timeouts of idempotent requests (not
# of a conditional create, ``mode="create"``), 10 times by default, backing off from 100 ms (jittered,
# x2, at most 15 s; none after 3 min); icechunk tries 10 times in all, from 100 ms up to 3 min apart.
# Here: 15 retries, from 50 ms up to 5 s apart. With 35 % of the requests failing (503s and resets) one
# request in 0.35**16 (~5e-8) fails for good, where with 10 retries one in ~1e-5 does (a job of a few
# thousand requests in a few dozen); a dead endpoint is given up after ~3 s of backoff per request on
# average. ``max_retries`` and ``retry_config`` (obstore's keys, merged over these) set them for both.
RETRY_DEFAULTS: dict[str, Any] = {"max_retries": 15,
                                  "backoff": {"init_backoff": timedelta(milliseconds=50),
                                              "max_backoff": timedelta(seconds=5), "base": 2},
                                  "retry_timeout": timedelta(minutes=3)}


def _obstore_kwargs(scheme: str, options: dict) -> dict:
    """Map zv-dask's storage-option names onto obstore's constructor keywords."""
    opts = dict(options)
    client = dict(opts.pop("client_options", {}) or {})
    if "allow_http" in opts:
        client["allow_http"] = bool(opts.pop("allow_http"))
    if "timeout" in opts:
        client["timeout"] = timedelta(seconds=_seconds(opts.pop("timeout"), "timeout"))
    if "connect_timeout" in opts:
        client["connect_timeout"] = timedelta(seconds=_seconds(opts.pop("connect_timeout"), "connect_timeout"))
    given = dict(opts.pop("retry_config", {}) or {})
    retry = {**RETRY_DEFAULTS, **given,
             "backoff": {**RETRY_DEFAULTS["backoff"], **dict(given.get("backoff") or {})}}
    if "max_retries" in opts:
        retry["max_retries"] = _max_retries(opts.pop("max_retries"))
    retry["max_retries"] = _max_retries(retry["max_retries"])
    retry["retry_timeout"] = timedelta(seconds=_seconds(retry["retry_timeout"], "retry_timeout"))
    for k in ("init_backoff", "max_backoff"):  # (obstore takes timedeltas only; seconds and "50ms" work here)
        retry["backoff"][k] = timedelta(seconds=_seconds(retry["backoff"][k], k))
    if "endpoint_url" in opts:
        opts["endpoint"] = opts.pop("endpoint_url")
    if "anonymous" in opts:  # obstore's name for unsigned requests
        if opts.pop("anonymous"):
            opts["skip_signature"] = True
    opts.pop("concurrency", None)  # zv-dask's cell I/O's (see concurrency_option), not obstore's
    if scheme in ("s3", "s3a"):
        if "force_path_style" in opts:  # icechunk's name for path-style addressing
            opts.setdefault("virtual_hosted_style_request", not opts.pop("force_path_style"))
        # obstore merges AWS_* variables even when keys are given; make explicit keys win.
        if "access_key_id" in opts and "session_token" not in opts:
            opts["session_token"] = ""
        if "endpoint" in opts and "virtual_hosted_style_request" not in opts:
            opts["virtual_hosted_style_request"] = False
    if client:
        opts["client_options"] = client
    opts["retry_config"] = retry
    return opts


def _obstore_store(url: str, scheme: str, options: dict, read_only: bool):
    try:
        from obstore.store import AzureStore, GCSStore, HTTPStore, MemoryStore, S3Store
    except ImportError as e:  # pragma: no cover - obstore is a hard dependency
        raise StoreError(f"object storage needs obstore and zarr>=3.1: {e}") from e
    kw = _obstore_kwargs(scheme, options)
    obs: ObjectStore
    try:
        if scheme in ("s3", "s3a"):
            bucket, prefix = _split_bucket(url)
            obs = S3Store(bucket, prefix=prefix or None, **kw)
        elif scheme in ("gs", "gcs"):
            bucket, prefix = _split_bucket(url)
            obs = GCSStore(bucket, prefix=prefix or None, **kw)
        elif scheme in ("az", "azure", "abfs", "abfss"):
            obs = AzureStore.from_url(url, **kw)
        elif scheme in ("http", "https"):
            obs = HTTPStore.from_url(url, **kw)
        elif scheme == "memory":
            obs = MemoryStore()
        else:  # pragma: no cover
            raise StoreError(f"no obstore backend for scheme {scheme!r}")
    except StoreError:
        raise
    except Exception as e:  # noqa: BLE001 - unknown option names, malformed values: say which, never echo the values
        raise StoreError(f"cannot configure the obstore {scheme}:// store for {url!r} from storage_options "
                         f"{sorted(options)}: {type(e).__name__}: {redact(_first_line(e), options)}") from None
    return RetryingObjectStore(obs, read_only=read_only, concurrency=concurrency_option(options))


def concurrency_option(options: dict) -> int | None:
    """The ``concurrency`` storage option (requests in flight per cell I/O call), checked; ``None`` if not given."""
    value = (options or {}).get("concurrency")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit() \
            or int(value) < 1:
        raise StoreError(f"storage option concurrency must be a whole number of requests >= 1, got {value!r}")
    return int(value)


_PREFIX_STORES: dict = {}


def prefix_store(url: str, options: dict | None = None):
    """The obstore store rooted at a local directory or an object-storage URL, made once per process.

    What a job's own objects (scratch pieces, journal records) go through.
    """
    options = dict(options or {})
    key = (url, tuple(sorted((k, repr(v)) for k, v in options.items())))
    st = _PREFIX_STORES.get(key)
    if st is None:
        if url_scheme(url) in ("", "file"):
            from obstore.store import LocalStore

            st = LocalStore(prefix=str(local_path(url)), mkdir=True)
        else:
            st = object_store(url, options)
        _PREFIX_STORES[key] = st
    return st


def object_store(url: str, options: dict | None = None):
    """The obstore store of an object-storage URL (``s3://bucket/prefix``...), configured by ``options``."""
    scheme = url_scheme(url)
    if scheme not in OBJECT_SCHEMES:
        raise StoreError(f"{url!r} is not an object-storage URL (s3://, gs://, az://, http(s)://, memory://)")
    return _obstore_store(url, scheme, dict(options or {}), read_only=False).store


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


# storage_options that icechunk's Storage constructors do not take (retry_config becomes its StorageSettings)
_OBSTORE_ONLY = ("client_options", "retry_config", "virtual_hosted_style_request", "skip_signature")


def _icechunk_s3_kwargs(options: dict) -> dict:
    """Map zv-dask's storage-option names onto ``icechunk.s3_storage`` keywords."""
    opts = dict(options)
    if "endpoint" in opts:
        opts["endpoint_url"] = opts.pop("endpoint")
    if "skip_signature" in opts and "anonymous" not in opts:
        opts["anonymous"] = bool(opts["skip_signature"])
    if "virtual_hosted_style_request" in opts and "force_path_style" not in opts:
        opts["force_path_style"] = not opts["virtual_hosted_style_request"]
    if opts.get("endpoint_url") and "force_path_style" not in opts:
        opts["force_path_style"] = True  # S3-compatible servers (SeaweedFS, MinIO...) on an endpoint
    if "allow_http" in opts:
        opts["allow_http"] = bool(opts["allow_http"])
    for k in (*_OBSTORE_ONLY, *_RUNTIME_OPTIONS):
        opts.pop(k, None)
    return icechunk_credentials(opts)


# storage_options applied as icechunk repository settings rather than Storage arguments
_RUNTIME_OPTIONS = ("timeout", "connect_timeout", "max_retries", "concurrency")


def icechunk_storage(target, options: dict):
    """An icechunk ``Storage`` for a path or URL of a repository."""
    import icechunk

    scheme = url_scheme(target)
    opts = dict(options)
    if scheme in ("", "file"):
        return icechunk.local_filesystem_storage(str(local_path(target).absolute()))
    if scheme == "memory":
        return icechunk.in_memory_storage()
    try:
        if scheme in ("s3", "s3a"):
            bucket, prefix = _split_bucket(target)
            if not prefix:
                raise StoreError(f"an icechunk repository on S3 needs a key prefix, got {target!r} (bucket root)")
            return icechunk.s3_storage(bucket=bucket, prefix=prefix, **_icechunk_s3_kwargs(opts))
        for k in (*_OBSTORE_ONLY, *_RUNTIME_OPTIONS):
            opts.pop(k, None)
        if scheme in ("gs", "gcs"):
            bucket, prefix = _split_bucket(target)
            return icechunk.gcs_storage(bucket=bucket, prefix=prefix, **opts)
        if scheme in ("az", "azure", "abfs", "abfss"):
            container, prefix = _split_bucket(target)
            account = opts.pop("account", None)
            return icechunk.azure_storage(account=account, container=container, prefix=prefix, **opts)
    except TypeError as e:  # an option icechunk does not know
        raise StoreError(f"cannot configure icechunk {scheme}:// storage for {target!r} from storage_options "
                         f"{sorted(options)}: {redact(_first_line(e), options)}") from None
    raise StoreError(f"icechunk cannot store a repository at {target!r}: scheme {scheme!r} is not "
                     "one of file, memory, s3, gs, az")


def icechunk_storage_settings(options: dict):
    """``timeout`` / ``connect_timeout`` / ``max_retries`` / ``retry_config`` as icechunk ``StorageSettings``.

    ``timeout`` bounds one request attempt, as in obstore; ``max_retries`` counts
    retries after the first attempt, as in obstore; ``retry_config`` is read as
    obstore's (``max_retries``, ``backoff.init_backoff`` / ``max_backoff``,
    ``retry_timeout``, which bounds a whole operation with its retries). Without
    them the retries are :data:`RETRY_DEFAULTS`, as for obstore.
    """
    import icechunk

    given = dict(options.get("retry_config") or {})
    backoff = {**RETRY_DEFAULTS["backoff"], **dict(given.get("backoff") or {})}
    timeouts = {}
    if options.get("timeout") is not None:
        timeouts["operation_attempt_timeout_ms"] = max(1, int(_seconds(options["timeout"], "timeout") * 1000))
    if options.get("connect_timeout") is not None:
        timeouts["connect_timeout_ms"] = max(1, int(_seconds(options["connect_timeout"], "connect_timeout") * 1000))
    if given.get("retry_timeout") is not None:
        timeouts["operation_timeout_ms"] = max(1, int(_seconds(given["retry_timeout"], "retry_timeout") * 1000))
    max_retries = options.get("max_retries")
    if max_retries is None:
        max_retries = given.get("max_retries", RETRY_DEFAULTS["max_retries"])
    retries = icechunk.StorageRetriesSettings(
        max_tries=_max_retries(max_retries) + 1,
        initial_backoff_ms=max(1, int(_seconds(backoff["init_backoff"], "init_backoff") * 1000)),
        max_backoff_ms=max(1, int(_seconds(backoff["max_backoff"], "max_backoff") * 1000)))
    return icechunk.StorageSettings(retries=retries,
                                    timeouts=icechunk.StorageTimeoutSettings(**timeouts) if timeouts else None)


def _icechunk_backend(target, mode: str, options: dict, branch: str, create: bool) -> Backend:
    import icechunk

    if isinstance(target, icechunk.Session):
        if mode != "r" and target.read_only:
            raise StoreError("a read-only icechunk Session was passed for writing; pass a writable session")
        return Backend(target.store, "icechunk", session=None if target.read_only else target,
                       branch=target.branch or branch)
    if isinstance(target, icechunk.Repository):
        repo, url = target, None
    else:
        storage = icechunk_storage(target, options)
        settings = icechunk_storage_settings(options)
        config = icechunk.RepositoryConfig(storage=settings) if settings is not None else None
        url = str(target)
        exists = icechunk.Repository.exists(storage, settings)
        if not exists:
            if mode == "r" or not create:
                raise StoreError(f"no icechunk repository at {target!r}")
            try:
                repo = icechunk.Repository.create(storage, config)
            except icechunk.IcechunkError as e:
                raise StoreError(f"cannot create an icechunk repository at {target!r}: {str(e).splitlines()[0]} "
                                 "(a new repository needs an empty location)") from None
        else:
            repo = icechunk.Repository.open(storage, config)
    if mode == "r":
        session = repo.readonly_session(branch=branch)
        return Backend(session.store, "icechunk", url=url, repository=repo, branch=branch, options=options)
    session = repo.writable_session(branch)
    return Backend(session.store, "icechunk", url=url, session=session, repository=repo, branch=branch,
                   options=options)


def resolve_backend(target, *, mode: str = "r+", backend: str | None = None,
                    storage_options: dict | None = None, branch: str = "main",
                    create: bool = False) -> Backend:
    """Resolve ``target`` to a :class:`Backend`.

    ``mode`` is ``"r"`` (read only), ``"r+"`` (read/write existing) or ``"w"``
    (create). ``create`` lets the icechunk backend create a missing repository.
    """
    from zarr.abc.store import Store as ZarrStore

    options = dict(storage_options or {})
    read_only = mode == "r"
    if backend not in BACKENDS:
        raise StoreError(f"unknown backend {backend!r}; use one of local, obstore, fsspec, icechunk (or None to infer)")
    try:
        import icechunk
        is_ice = isinstance(target, (icechunk.Repository, icechunk.Session))
    except ImportError:  # pragma: no cover
        is_ice = False
    if backend == "icechunk" or is_ice:
        return _icechunk_backend(target, mode, options, branch, create or mode == "w")
    if isinstance(target, ZarrStore):
        store = target
        if read_only and not store.read_only:
            store = store.with_read_only(True)
        session = getattr(target, "session", None)
        if session is not None and getattr(session, "read_only", True):
            session = None
        return Backend(store, "icechunk" if session is not None else "store", session=session)
    try:
        import obstore.store as obs_mod
        if isinstance(target, obs_mod.ObjectStore if hasattr(obs_mod, "ObjectStore") else ()):
            from zarr.storage import ObjectStore
            return Backend(ObjectStore(target, read_only=read_only), "obstore")
        obs_types = tuple(getattr(obs_mod, n) for n in ("S3Store", "GCSStore", "AzureStore", "HTTPStore",
                                                         "LocalStore", "MemoryStore") if hasattr(obs_mod, n))
        if isinstance(target, obs_types):
            from zarr.storage import ObjectStore
            return Backend(ObjectStore(target, read_only=read_only), "obstore")
    except ImportError:  # pragma: no cover
        pass
    if not isinstance(target, (str, os.PathLike)):
        raise StoreError(f"cannot make a store from {type(target).__name__}; pass a path, a URL, a zarr Store, "
                         "an obstore store or an icechunk Repository/Session")
    target = os.fspath(target)
    scheme = url_scheme(target)
    if backend == "fsspec":
        try:
            from zarr.storage import FsspecStore
            return Backend(FsspecStore.from_url(target, storage_options=options or None, read_only=read_only),
                           "fsspec", url=target, options=options)
        except ImportError as e:
            raise StoreError(f"backend='fsspec' needs the optional fsspec extra: {e}") from e
    if scheme in ("", "file"):
        from zarr.storage import LocalStore
        path = local_path(target)
        if backend == "obstore":
            from obstore.store import LocalStore as ObsLocal
            from zarr.storage import ObjectStore
            path.mkdir(parents=True, exist_ok=True) if not read_only else None
            return Backend(ObjectStore(ObsLocal(prefix=str(path.absolute())), read_only=read_only), "obstore",
                           url=str(path))
        return Backend(LocalStore(path, read_only=read_only), "local", url=str(path))
    if scheme in OBJECT_SCHEMES:
        return Backend(_obstore_store(target, scheme, options, read_only), "obstore", url=target, options=options)
    raise StoreError(f"unknown URL scheme {scheme!r} in {target!r}; zv-dask reads and writes "
                     "local paths, file://, s3://, gs://, az://, http(s):// and memory://")
