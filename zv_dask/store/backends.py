"""Turn what the user passed (a path, a URL, a zarr Store, an obstore store, an
icechunk Repository or Session) into a zarr store, plus the icechunk session
when the backend is transactional.

Object storage goes through obstore wrapped by zarr's ``ObjectStore``; the
transactional backend is icechunk. Storage options use one vocabulary for both
(``endpoint``, ``region``, ``access_key_id``, ``secret_access_key``,
``session_token``, ``allow_http``, ``anonymous``, ``timeout``, ``max_retries``)
so a job can switch between them with one flag.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from zv_dask.errors import StoreError

__all__ = ["Backend", "resolve_backend", "local_path", "url_scheme"]

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
    if not isinstance(target, str):
        return ""
    scheme = urlparse(target).scheme.lower()
    return scheme if len(scheme) > 1 else ""  # "C:" drive letters are paths


def local_path(target) -> Path:
    if isinstance(target, Path):
        return target
    if isinstance(target, str) and target.startswith("file://"):
        return Path(unquote(urlparse(target).path))
    return Path(target)


def _split_bucket(url: str) -> tuple[str, str]:
    p = urlparse(url)
    return p.netloc, p.path.strip("/")


def _obstore_kwargs(scheme: str, options: dict) -> dict:
    """Map zv-dask's storage-option names onto obstore's constructor keywords."""
    opts = dict(options)
    client = dict(opts.pop("client_options", {}) or {})
    if "allow_http" in opts:
        client["allow_http"] = bool(opts.pop("allow_http"))
    if "timeout" in opts:
        client["timeout"] = f"{float(opts.pop('timeout'))}s" if not isinstance(opts.get("timeout"), str) else opts.pop("timeout")
    retry = dict(opts.pop("retry_config", {}) or {})
    if "max_retries" in opts:
        retry["max_retries"] = int(opts.pop("max_retries"))
    if "endpoint_url" in opts:
        opts["endpoint"] = opts.pop("endpoint_url")
    opts.pop("concurrency", None)  # used by zv-dask's writer, not by obstore
    if scheme in ("s3", "s3a"):
        # obstore merges AWS_* variables even when keys are given; make explicit keys win.
        if "access_key_id" in opts and "session_token" not in opts:
            opts["session_token"] = ""
        if "endpoint" in opts and "virtual_hosted_style_request" not in opts:
            opts["virtual_hosted_style_request"] = False
    if client:
        opts["client_options"] = client
    if retry:
        opts["retry_config"] = retry
    return opts


def _obstore_store(url: str, scheme: str, options: dict, read_only: bool):
    try:
        from obstore.store import AzureStore, GCSStore, HTTPStore, MemoryStore, S3Store
        from zarr.storage import ObjectStore
    except ImportError as e:  # pragma: no cover - obstore is a hard dependency
        raise StoreError(f"object storage needs obstore and zarr>=3.1: {e}") from e
    kw = _obstore_kwargs(scheme, options)
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
    return ObjectStore(obs, read_only=read_only)


def icechunk_storage(target, options: dict):
    """An icechunk ``Storage`` for a path or URL of a repository."""
    import icechunk

    scheme = url_scheme(target)
    opts = dict(options)
    if scheme in ("", "file"):
        return icechunk.local_filesystem_storage(str(local_path(target).absolute()))
    if scheme == "memory":
        return icechunk.in_memory_storage()
    if scheme in ("s3", "s3a"):
        bucket, prefix = _split_bucket(target)
        if not prefix:
            raise StoreError(f"an icechunk repository on S3 needs a key prefix, got {target!r} (bucket root)")
        if "endpoint" in opts:
            opts["endpoint_url"] = opts.pop("endpoint")
        if opts.get("endpoint_url") and "force_path_style" not in opts:
            opts["force_path_style"] = True
        for k in ("timeout", "max_retries", "concurrency", "client_options", "retry_config"):
            opts.pop(k, None)
        return icechunk.s3_storage(bucket=bucket, prefix=prefix, **opts)
    if scheme in ("gs", "gcs"):
        bucket, prefix = _split_bucket(target)
        return icechunk.gcs_storage(bucket=bucket, prefix=prefix, **opts)
    if scheme in ("az", "azure", "abfs", "abfss"):
        container, prefix = _split_bucket(target)
        account = opts.pop("account", None)
        return icechunk.azure_storage(account=account, container=container, prefix=prefix, **opts)
    raise StoreError(f"icechunk cannot store a repository at {target!r}: scheme {scheme!r} is not "
                     "one of file, memory, s3, gs, az")


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
        url = str(target)
        exists = icechunk.Repository.exists(storage)
        if not exists:
            if mode == "r" or not create:
                raise StoreError(f"no icechunk repository at {target!r}")
            repo = icechunk.Repository.create(storage)
        else:
            repo = icechunk.Repository.open(storage)
    if mode == "r":
        session = repo.readonly_session(branch=branch)
        return Backend(session.store, "icechunk", url=url, repository=repo, branch=branch)
    session = repo.writable_session(branch)
    return Backend(session.store, "icechunk", url=url, session=session, repository=repo, branch=branch)


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
