"""Start-up programs saved whole (serialized executables), so that a restart neither traces nor
compiles them.

The persistent compilation cache (compilation_cache.py) is keyed by the lowered program: a hit
still pays the trace and lowering that compute its key (seconds for the train step). This cache is
keyed by what determines the program instead - the program's name, the config parts it is built
from, its arguments' shapes, dtypes and shardings, the devices, jax/jaxlib/flax/optax versions,
the XLA flags and a hash of pingllm's own source files - and holds the executable
(`jax.experimental.serialize_executable`) or, for the abstract train state, its description.
Entries live in `<compilation cache dir>/executables` (local, a Modal volume or gs:// through
etils.epath), are checksummed, and are written by process 0 only (every process reads, as JAX
does for its cache). A missing, unreadable or mismatched entry falls back to the normal path
(trace and compile, through the compilation cache), logged, and process 0 writes it again.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import threading
from collections.abc import Callable
from typing import Any

import jax
from absl import logging
from etils import epath

from pingllm import compilation_cache

SUBDIR = "executables"
ENV_SWITCH = "PINGLLM_EXECUTABLE_CACHE"  # "0": off (the compilation cache alone)
_MAGIC = b"PINGLLM-EXE-3\n"  # changes when the entry format changes
_SOURCE_ROOT = os.path.dirname(os.path.abspath(__file__))
# jax.config values that change what a traced program computes.
_JAX_FLAGS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_threefry_partitionable",
              "jax_default_prng_impl", "jax_numpy_rank_promotion", "jax_numpy_dtype_promotion",
              "jax_softmax_custom_jvp", "jax_use_shardy_partitioner")


class EntryError(Exception):
    """An entry that cannot be used (corrupt, truncated, another key, not loadable)."""


_source_digest: str | None = None


def source_digest() -> str:
    """sha256 of every .py file of the pingllm package (relative path and bytes), sorted."""
    global _source_digest
    if _source_digest is None:
        digest = hashlib.sha256()
        for root, dirs, files in os.walk(_SOURCE_ROOT):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(f for f in files if f.endswith(".py")):
                path = os.path.join(root, name)
                digest.update(os.path.relpath(path, _SOURCE_ROOT).encode() + b"\0")
                with open(path, "rb") as f:
                    digest.update(f.read() + b"\0")
        _source_digest = digest.hexdigest()
    return _source_digest


def environment_key() -> str:
    """Everything outside the config that decides a compiled program on this host."""
    import flax
    import jaxlib
    import optax

    devices = [(d.id, d.platform, d.device_kind, d.process_index) for d in jax.devices()]
    flags = {name: str(getattr(jax.config, name, None)) for name in _JAX_FLAGS}
    env = {k: os.environ.get(k, "") for k in ("XLA_FLAGS", "LIBTPU_INIT_ARGS")}
    return repr(dict(
        format=_MAGIC, jax=jax.__version__, jaxlib=jaxlib.__version__, flax=flax.__version__,
        optax=optax.__version__, pingllm=source_digest(), devices=devices,
        process_count=jax.process_count(), backend=jax.devices()[0].client.platform_version,
        flags=flags, env=env))


def spec(tree) -> str:
    """Shapes, dtypes and shardings of a tree of arrays or ShapeDtypeStructs, and its structure."""
    def leaf(x):
        sharding = getattr(x, "sharding", None)
        if sharding is not None and hasattr(sharding, "mesh"):
            sharding = (sharding.spec, sharding.mesh.axis_names, sharding.mesh.devices.shape,
                        sharding.mesh.device_ids.ravel().tolist(), sharding.memory_kind)
        return (tuple(x.shape), str(x.dtype), repr(sharding))

    leaves, treedef = jax.tree.flatten(tree)
    return repr((str(treedef), [leaf(x) for x in leaves]))


class ExecutableCache:
    """Load-or-build for the start-up programs of one process (see the module docstring)."""

    def __init__(self, directory: str, *, disabled_reason: str = ""):
        self.directory = epath.Path(directory) / SUBDIR if directory else None
        self.disabled_reason = disabled_reason or ("" if directory else "no compilation cache")
        self.is_writer = jax.process_index() == 0
        self._env = environment_key() if self.enabled else ""
        self.loaded: list[str] = []
        self.built: list[str] = []
        self.fallbacks: list[str] = []  # name: why an existing entry was not used
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return not self.disabled_reason

    def _key(self, name: str, parts: Any) -> tuple[str, bytes]:
        text = f"{name}\n{self._env}\n{parts!r}".encode()
        return f"{name}-{hashlib.sha256(text).hexdigest()[:32]}", text

    def _read(self, name: str, parts: Any) -> Any:
        """The entry's payload; None when absent; EntryError when unusable."""
        stem, text = self._key(name, parts)
        path = self.directory / f"{stem}.bin"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        head = len(_MAGIC) + 32
        if not data.startswith(_MAGIC) or len(data) < head:
            raise EntryError(f"{path}: not an entry of this format")
        payload = data[head:]
        if hashlib.sha256(payload).digest() != data[len(_MAGIC):head]:
            raise EntryError(f"{path}: checksum mismatch (truncated or overwritten)")
        try:
            key_text, value = pickle.loads(payload)
        except Exception as e:  # noqa: BLE001 - a payload that does not unpickle is unusable
            raise EntryError(f"{path}: does not unpickle: {e}") from e
        if key_text != text:
            raise EntryError(f"{path}: written for another key")
        return value

    def _write(self, name: str, parts: Any, value: Any) -> None:
        if not self.is_writer:
            return
        stem, text = self._key(name, parts)
        payload = pickle.dumps((text, value), protocol=pickle.HIGHEST_PROTOCOL)
        data = _MAGIC + hashlib.sha256(payload).digest() + payload
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.directory / f"{stem}.bin"
            if "://" in str(path):  # one object write is atomic on a bucket (no rename there)
                path.write_bytes(data)
            else:  # a start killed mid-write must not leave a truncated entry behind
                tmp = self.directory / f".{stem}.{os.getpid()}.tmp"
                tmp.write_bytes(data)
                tmp.replace(path)
        except Exception as e:  # noqa: BLE001 - a cache that cannot be written costs time only
            logging.warning("executable cache: could not write %s: %s", stem, e)

    def _use(self, name: str, parts: Any, decode: Callable[[Any], Any]) -> Any:
        """Decoded entry, or None (absent, unusable: logged and counted)."""
        if not self.enabled:
            return None
        try:
            value = self._read(name, parts)
            if value is None:
                return None
            result = decode(value)
        except Exception as e:  # noqa: BLE001 - any failure to load falls back to building
            logging.warning("executable cache: %s not used (%s); tracing and compiling it",
                            name, e)
            with self._lock:
                self.fallbacks.append(f"{name}: {e}")
            if self.is_writer:  # removed, so that it is not retried at every start
                stem, _ = self._key(name, parts)
                try:
                    (self.directory / f"{stem}.bin").unlink(missing_ok=True)
                except OSError:
                    pass
            return None
        with self._lock:
            self.loaded.append(name)
        return result

    def compiled(self, name: str, parts: Any, lower: Callable[[], Any]) -> Any:
        """`lower().compile()`, or the same program loaded from its entry.

        `parts` must name everything `lower` depends on beyond the environment (config parts,
        `spec` of the arguments, constants).
        """
        found = self._use(name, parts, _load_executable)
        if found is not None:
            return found
        hits = compilation_cache.stats().hits_in_this_thread()
        compiled = lower().compile()
        with self._lock:
            self.built.append(name)
        if compilation_cache.stats().hits_in_this_thread() > hits:
            # JAX 0.10.2 on CPU: an executable loaded from the compilation cache serializes
            # into one that fails when run ("Function <fusion> not found"); only a program
            # compiled here is written (the next start that compiles it writes the entry).
            logging.info("executable cache: %s came from the compilation cache; not written", name)
            return compiled
        if self.enabled and self.is_writer:
            try:
                value = _serialize_executable(compiled)
            except Exception as e:  # noqa: BLE001 - some programs do not serialize: no entry
                logging.warning("executable cache: %s does not serialize: %s", name, e)
            else:
                self._write(name, parts, value)
        return compiled

    def value(self, name: str, parts: Any, build: Callable[[], Any],
              encode: Callable[[Any], Any], decode: Callable[[Any], Any]) -> Any:
        """`build()`, or `decode` of what `encode` stored for the same key."""
        found = self._use(name, parts, decode)
        if found is not None:
            return found
        built = build()
        with self._lock:
            self.built.append(name)
        if self.enabled:
            self._write(name, parts, encode(built))
        return built

    def report(self) -> dict[str, int]:
        """Logs and returns what this start loaded and built."""
        with self._lock:
            loaded, built, fallbacks = list(self.loaded), list(self.built), list(self.fallbacks)
        if not self.enabled:
            logging.info("executable cache: off (%s)", self.disabled_reason)
        else:
            logging.info("executable cache: %d loaded (%s), %d traced and compiled (%s), "
                         "%d unusable entries", len(loaded), ", ".join(loaded) or "-",
                         len(built), ", ".join(built) or "-", len(fallbacks))
        return {"loaded": len(loaded), "built": len(built), "fallbacks": len(fallbacks)}


def _serialize_executable(compiled) -> tuple[bytes, bytes]:
    from jax.experimental import serialize_executable

    blob, in_tree, out_tree = serialize_executable.serialize(compiled)
    # The devices it runs on, in the program's order (deserialize_and_load's default is all).
    device_ids = [d.id for d in compiled._executable._unloaded_executable.device_list]
    with io.BytesIO() as f:
        pickle.dump((in_tree, out_tree, device_ids), f, protocol=pickle.HIGHEST_PROTOCOL)
        trees = f.getvalue()
    return blob, trees


def _load_executable(value: tuple[bytes, bytes]):
    from jax.experimental import serialize_executable

    blob, trees = value
    in_tree, out_tree, device_ids = pickle.loads(trees)
    by_id = {d.id: d for d in jax.devices()}
    return serialize_executable.deserialize_and_load(
        blob, in_tree, out_tree, execution_devices=[by_id[i] for i in device_ids])
