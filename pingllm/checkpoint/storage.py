"""Which client talks to a bucket, and a fast check that a run path is usable before device work.

Every gs:// path in pingllm (and, in the same process, Orbax's small files) goes through etils
epath's fsspec backend, i.e. gcsfs: epath would otherwise pick TensorFlow's GCS filesystem
whenever TensorFlow is installed, whose endpoint cannot be redirected (no emulator, no
private endpoint). Array data goes through tensorstore, as Orbax does it. See
docs/object_storage.md.
"""

from __future__ import annotations

import os
import threading

# Must be set before epath first picks a backend and before gcsfs is imported; setdefault keeps
# a user's explicit choice.
os.environ.setdefault("EPATH_USE_TF", "false")
# gcsfs's experimental zonal/HNS layer probes the bucket over gRPC (storage control API) and
# retries with backoff for minutes when that endpoint does not answer; the JSON API is enough.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

REMOTE_SCHEMES = ("gs://",)


class StorageError(RuntimeError):
    """A run path cannot be used (missing bucket, no credentials, unreachable)."""


def is_remote(path: os.PathLike | str) -> bool:
    return os.fspath(path).startswith(REMOTE_SCHEMES)


def filesystem(path: os.PathLike | str):
    """(fsspec filesystem, path inside it) for a local or gs:// path."""
    import fsspec

    return fsspec.core.url_to_fs(os.fspath(path))


def forget_cached_listings(fs) -> None:
    """Drops the listings every client of `fs`'s kind has cached (epath keeps one of its own)."""
    for instance in list(getattr(type(fs), "_cache", {}).values()) + [fs]:
        instance.invalidate_cache()


def check_writable(path: os.PathLike | str, *, timeout: float = 20.0) -> None:
    """Raises StorageError naming `path` unless its bucket exists and is readable, within timeout.

    Local paths are not checked (the directory is created on demand). Runs the probe on a thread
    so that a client stuck on credentials or a metadata server cannot hold the caller longer.
    """
    if not is_remote(path):
        return
    text = os.fspath(path)
    bucket = text[len("gs://"):].split("/", 1)[0]
    result: list[BaseException | None] = []

    def probe():
        try:
            fs, _ = filesystem(text)
            fs.ls(bucket, detail=False, refresh=True)
            result.append(None)
        except BaseException as e:  # noqa: BLE001 - reported below with the path
            result.append(e)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    if not result:
        raise StorageError(f"{text}: no answer from gs://{bucket} within {timeout:.0f}s "
                           "(network, credentials or metadata server); see "
                           "docs/object_storage.md")
    err = result[0]
    if err is None:
        return
    if isinstance(err, FileNotFoundError):
        raise StorageError(f"{text}: bucket gs://{bucket} does not exist (create it, or fix "
                           "BASE_OUTPUT_DIRECTORY)") from err
    raise StorageError(f"{text}: cannot use gs://{bucket}: {type(err).__name__}: {err} (check "
                       "credentials: gcloud auth application-default login, or a service "
                       "account on the VM)") from err


def local_mirror(remote_dir: os.PathLike | str) -> str:
    """A local directory standing in for a gs:// directory (TensorBoard event files, which grow
    by appends, are written here and copied up by Mirror)."""
    import tempfile

    text = os.fspath(remote_dir)
    root = os.environ.get("PINGLLM_LOCAL_MIRROR") or os.path.join(tempfile.gettempdir(),
                                                                  "pingllm-mirror")
    return os.path.join(root, text[len("gs://"):].strip("/"))


class Mirror:
    """Copies the files of a local directory that grew since the last sync to a gs:// one."""

    def __init__(self, local_dir: str, remote_dir: os.PathLike | str):
        self.local_dir = local_dir
        self.remote_dir = os.fspath(remote_dir).rstrip("/")
        self._sent: dict[str, int] = {}

    def sync(self) -> int:
        """Uploads new or grown files (whole; event files are small); returns how many."""
        fs, _ = filesystem(self.remote_dir)
        sent = 0
        for root, _, names in os.walk(self.local_dir):
            for name in names:
                local = os.path.join(root, name)
                size = os.path.getsize(local)
                rel = os.path.relpath(local, self.local_dir).replace(os.sep, "/")
                if self._sent.get(rel) == size:
                    continue
                fs.put_file(local, f"{self.remote_dir}/{rel}")
                self._sent[rel] = size
                sent += 1
        return sent
