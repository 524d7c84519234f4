"""S3 keys that stay in the process they were given to; workers use their own environment.

What a job sends to its workers is pickled: the zarr store over obstore (whose pickle is its
configuration, keys included), an icechunk ``ForkSession`` (its storage with its static
credentials), and the storage options themselves (scratch space and journal). With explicit
``access_key_id`` / ``secret_access_key`` in the storage options, the keys travel in all three.

Two ways keep them from travelling:

* give no keys at all: every process (the client, and each worker when it unpickles a store)
  then takes its credentials from its own environment (``AWS_ACCESS_KEY_ID`` /
  ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, or obstore's and icechunk's default chains:
  profiles, web identity, instance metadata). Nothing to do: obstore's pickled configuration and
  icechunk's pickled storage then hold no key.
* give the client's keys as a :class:`ClientCredentials` (storage option ``credential_provider``;
  on the command line ``-S worker_credentials=env`` turns ``access_key_id`` /
  ``secret_access_key`` / ``session_token`` into one, see :func:`prepare_credentials`). The
  client signs its requests with them; pickled, it becomes a reference to nothing secret, so a
  worker process finds no keys in what it receives and uses its own environment (obstore: its
  default chain; icechunk: ``AWS_*`` variables).

The icechunk backend needs :func:`icechunk_credentials` applied to the keywords of
``icechunk.s3_storage`` (``credential_provider`` is obstore's name; icechunk's is
``get_credentials``).
"""

from __future__ import annotations

import os
import uuid
from typing import Any, overload

from zv_dask.errors import StoreError

__all__ = ["ClientCredentials", "prepare_credentials", "icechunk_credentials", "redact", "SECRET_OPTIONS",
           "WORKER_CREDENTIALS"]

# storage options whose values are secrets (zv-dask's names, obstore's and icechunk's aliases)
SECRET_OPTIONS = ("secret_access_key", "aws_secret_access_key", "session_token", "aws_session_token", "token",
                  "aws_token", "access_key", "account_key", "azure_storage_account_key", "sas_key", "sas_token",
                  "azure_storage_sas_key", "client_secret", "azure_client_secret", "password",
                  "service_account_key", "google_service_account_key", "bearer_token")
_KEY_NAMES = {"access_key_id": ("access_key_id", "aws_access_key_id"),
              "secret_access_key": ("secret_access_key", "aws_secret_access_key"),
              "session_token": ("session_token", "aws_session_token", "token", "aws_token")}
WORKER_CREDENTIALS = "worker_credentials"

# The keys of the ClientCredentials made in this process, by token. A worker process has none of
# them: what it unpickles finds nothing here, and it falls back on its own environment.
_HERE: dict[str, tuple[str, str, str | None]] = {}


def _here(token: str):
    """What a pickled :class:`ClientCredentials` becomes: itself in the process that made it, else ``None``."""
    keys = _HERE.get(token)
    return None if keys is None else ClientCredentials(*keys, _token=token)


class ClientCredentials:
    """S3 keys for this process only: an obstore ``credential_provider`` that does not travel.

    ``storage_options={"credential_provider": ClientCredentials(key_id, secret), ...}`` signs the
    client's requests with these keys. A store, fork or storage-options dict pickled for a worker
    carries only a random token: in another process it stands for no credentials, and the worker
    uses its own (``AWS_*`` variables, a profile, an instance role). Its repr shows no key.
    """

    def __init__(self, access_key_id: str, secret_access_key: str, session_token: str | None = None, *,
                 _token: str | None = None):
        for name, v in (("access_key_id", access_key_id), ("secret_access_key", secret_access_key)):
            if not isinstance(v, str) or not v:
                raise StoreError(f"ClientCredentials needs {name} as a non-empty string")
        if session_token is not None and not isinstance(session_token, str):
            raise StoreError("ClientCredentials needs session_token as a string (or None)")
        self.token = _token or uuid.uuid4().hex
        _HERE[self.token] = (access_key_id, secret_access_key, session_token or None)

    @property
    def keys(self) -> tuple[str, str, str | None]:
        return _HERE[self.token]

    def __call__(self) -> dict:  # obstore's S3CredentialProvider protocol
        key, secret, token = self.keys
        return {"access_key_id": key, "secret_access_key": secret, "token": token, "expires_at": None}

    def __reduce__(self):
        return _here, (self.token,)

    def __dask_tokenize__(self):
        return ("zv-dask-ClientCredentials", self.token)

    def __eq__(self, other) -> bool:
        return isinstance(other, ClientCredentials) and other.token == self.token

    def __hash__(self) -> int:
        return hash(self.token)

    def __repr__(self) -> str:
        return f"<ClientCredentials {self.token[:8]}: S3 keys kept in this process; workers use their own>"

    __str__ = __repr__


class IcechunkCredentials:
    """icechunk's ``get_credentials`` for a :class:`ClientCredentials`: its keys here, ``AWS_*`` elsewhere.

    icechunk pickles this callable into the storage (and with it into every fork) and calls it
    where credentials are needed: in the client process it answers with the client's keys; in a
    worker, with the worker's ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
    ``AWS_SESSION_TOKEN``.
    """

    def __init__(self, token: str):
        self.token = token

    def __call__(self):
        import icechunk

        keys = _HERE.get(self.token)
        if keys is None:
            key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
            if not key or not secret:
                raise StoreError("the job's S3 keys stay in its client (worker_credentials=env): this process "
                                 "needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in its environment")
            keys = (key, secret, os.environ.get("AWS_SESSION_TOKEN") or None)
        return icechunk.S3StaticCredentials(access_key_id=keys[0], secret_access_key=keys[1], session_token=keys[2])

    def __repr__(self) -> str:
        return f"<IcechunkCredentials {self.token[:8]}>"


class _AsIcechunk:
    """An obstore-style S3 credential provider (a callable returning a dict) as icechunk's ``get_credentials``."""

    def __init__(self, provider):
        self.provider = provider

    def __call__(self):
        import asyncio
        import inspect

        import icechunk

        got = self.provider()
        if inspect.isawaitable(got):
            got = asyncio.run(_awaited(got))
        exp = got.get("expires_at")
        return icechunk.S3StaticCredentials(access_key_id=got["access_key_id"],
                                            secret_access_key=got["secret_access_key"],
                                            session_token=got.get("token"), expires_after=exp)

    def __repr__(self) -> str:
        return f"<credential provider {type(self.provider).__name__}>"


@overload
def prepare_credentials(options: dict) -> dict: ...


@overload
def prepare_credentials(options: None) -> None: ...


def prepare_credentials(options: dict | None) -> dict | None:
    """Storage options with ``worker_credentials="env"`` turned into a :class:`ClientCredentials`.

    ``worker_credentials="env"``: the keys given (``access_key_id``, ``secret_access_key``,
    optionally ``session_token``) are for this process only, and the workers use their own
    environment. Without keys it only says so: every process already uses its own environment.
    Options without ``worker_credentials`` come back unchanged; applying it twice changes nothing.
    """
    if not options or WORKER_CREDENTIALS not in options:
        return options
    opts = dict(options)
    mode = opts.pop(WORKER_CREDENTIALS)
    if str(mode).strip().lower() != "env":
        raise StoreError(f"storage option {WORKER_CREDENTIALS!r} takes 'env' (the workers use the credentials of "
                         "their own environment), got another value")
    found = {}
    for name, aliases in _KEY_NAMES.items():
        for a in aliases:
            if a in opts:
                found[name] = opts.pop(a)
    if not found:
        return opts
    if "access_key_id" not in found or "secret_access_key" not in found:
        raise StoreError(f"{WORKER_CREDENTIALS}=env with keys needs both access_key_id and secret_access_key "
                         f"(got {sorted(found)})")
    if "credential_provider" in opts:
        raise StoreError(f"{WORKER_CREDENTIALS}=env with keys and a credential_provider: give one of them")
    opts["credential_provider"] = ClientCredentials(str(found["access_key_id"]), str(found["secret_access_key"]),
                                                    None if found.get("session_token") in (None, "")
                                                    else str(found["session_token"]))
    return opts


def icechunk_credentials(kwargs: dict) -> dict:
    """Keywords of ``icechunk.s3_storage`` with obstore's ``credential_provider`` as icechunk's ``get_credentials``.

    A :class:`ClientCredentials` becomes an :class:`IcechunkCredentials` (nothing secret in a fork);
    ``None`` (what one is in a worker process) is dropped, so that icechunk reads the worker's
    environment; another callable is adapted. Keywords without one come back unchanged.
    """
    kwargs = prepare_credentials(kwargs)
    if "credential_provider" not in kwargs:
        return kwargs
    kw = dict(kwargs)
    provider = kw.pop("credential_provider")
    if provider is None:
        return kw
    if "get_credentials" in kw:
        raise StoreError("storage options give both credential_provider and get_credentials: give one of them")
    kw["get_credentials"] = (IcechunkCredentials(provider.token) if isinstance(provider, ClientCredentials)
                             else _AsIcechunk(provider))
    return kw


def _secret_values(options: dict | None) -> list[str]:
    out: list[str] = []
    for k, v in (options or {}).items():
        if isinstance(v, dict):
            out += _secret_values(v)
        elif isinstance(v, ClientCredentials):
            out += [s for s in v.keys[1:] if s]
        elif str(k).lower() in SECRET_OPTIONS and v not in (None, "") and not isinstance(v, bool):
            out.append(str(v))
    return out


def redact(text: Any, options: dict | None) -> str:
    """``text`` with every secret value of ``options`` (secret keys, tokens, passwords) replaced by ``***``."""
    text = str(text)
    for s in sorted(set(_secret_values(options)), key=len, reverse=True):
        if len(s) >= 4:
            text = text.replace(s, "***")
    return text


async def _awaited(awaitable):
    """``asyncio.run`` takes a coroutine; a provider may return any awaitable."""
    return await awaitable
