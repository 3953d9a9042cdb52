"""Records -> token batches with Grain; the global batch of step s is a pure function of s.

Global window position g = s * B + row (B = global_batch_size). Epoch e = g // N (N records);
the record of g is perm_e[g % N], perm_e a permutation of the records keyed by (seed, e);
its tokenization is keyed by (seed, window_index=g). So a restart at step s, another process
count or another Grain worker count all give the same global batch of step s, byte for byte.
Process p of P builds only rows [p * B / P, (p + 1) * B / P) and reads only their records.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from absl import flags

from pingllm.data import augment as augment_lib
from pingllm.data import records, splitmix, tfds_builder, tokens

SOURCES = ("tfds", "synthetic_memory")
# Grain datasets need a length; training runs are bounded by this many steps.
_MAX_STEPS = 1 << 40


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where records come from and how batches are cut from them."""

    # 'tfds': the ripe_atlas_ping ArrayRecord dataset in data_dir (built by prepare());
    # 'synthetic_memory': records of a small synthetic Internet held in memory (tests).
    source: str = "tfds"
    tfds_config: str = "synthetic"  # 'synthetic' | 'manual' (files in manual_dir)
    data_dir: str = "~/tensorflow_datasets"
    manual_dir: str = ""
    synthetic_rows: int = tfds_builder.DEFAULT_SYNTHETIC_ROWS
    synthetic_seed: int = tfds_builder.DEFAULT_SYNTHETIC_SEED
    # Seconds the synthetic rows span: shorter = more sources, fewer pings each.
    synthetic_duration_s: int = tfds_builder.DEFAULT_SYNTHETIC_DURATION_S
    test_fraction: float = records.DEFAULT_TEST_FRACTION
    # Time split (tfds only): rows at or after this ISO 8601 time (UTC by default) form the
    # split 'later' (eval_split = 'later' asks about them); "" = none.
    later_from: str = ""
    max_target_length: int = tfds_builder.DEFAULT_MAX_TARGET_LENGTH
    global_batch_size: int = 32  # the run file's GLOBAL_BATCH_SIZE (gin/runs/pretrain.gin)
    seed: int = 0  # record order per epoch and tokenization randomness
    worker_count: int = 0  # Grain worker processes; 0 = in the main process
    worker_buffer_size: int = 2  # batches each worker prepares ahead
    read_threads: int = 2  # Grain threads (main process or each worker)
    prefetch_batches: int = 4
    eval_split: str = "test"
    # Training windows only (pingllm/data/augment.py): the share of windows that keep only the
    # latest measurement of each destination, and the share whose source address is replaced
    # by random bytes. Both make training windows look like a held-out-pair query.
    dedupe_rate: float = 0.0
    anonymise_source_rate: float = 0.0
    # Training rows only: pack this many consecutive windows into each row (segments 1..k,
    # positions restarting at 0) as far as they fit whole; a window that does not fit is
    # dropped. Deduplicated windows fill a fraction of a row, so packing feeds the same
    # compute more windows. Eval rows always hold one window.
    windows_per_row: int = 1

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"DataConfig.source must be one of {SOURCES}, got {self.source!r}")
        if self.tfds_config not in ("synthetic", "manual"):
            raise ValueError(f"DataConfig.tfds_config must be 'synthetic' or 'manual', "
                             f"got {self.tfds_config!r}")
        if self.source == "tfds" and self.tfds_config == "manual" and not self.manual_dir:
            raise ValueError("DataConfig.tfds_config='manual' needs DataConfig.manual_dir")
        if self.later_from and self.source != "tfds":
            raise ValueError("DataConfig.later_from needs DataConfig.source='tfds'")
        tfds_builder.later_from_seconds(self.later_from)  # a malformed time fails here
        for name in ("global_batch_size", "max_target_length", "read_threads",
                     "prefetch_batches", "worker_buffer_size", "windows_per_row"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DataConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.worker_count < 0:
            raise ValueError(f"DataConfig.worker_count must be >= 0, got {self.worker_count}")
        for name in ("dedupe_rate", "anonymise_source_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"DataConfig.{name} must be in [0, 1], got "
                                 f"{getattr(self, name)}")

    @property
    def augment(self) -> augment_lib.Augment:
        return augment_lib.Augment(self.seed, self.dedupe_rate, self.anonymise_source_rate)

    @property
    def builder_config(self) -> tfds_builder.RipeAtlasPingConfig:
        return tfds_builder.make_config(
            self.tfds_config, synthetic_rows=self.synthetic_rows,
            synthetic_seed=self.synthetic_seed, max_target_length=self.max_target_length,
            test_fraction=self.test_fraction, synthetic_duration_s=self.synthetic_duration_s,
            later_from=self.later_from,
        )

    @property
    def dataset_name(self) -> str:
        """Names the records (not the batching): a resumed iterator must see the same ones."""
        if self.source == "synthetic_memory":
            span = self.synthetic_duration_s
            return (f"synthetic_memory_rows{self.synthetic_rows}_seed{self.synthetic_seed}"
                    f"_len{self.max_target_length}_test{self.test_fraction:g}"
                    + (f"_span{span}s" if span != tfds_builder.DEFAULT_SYNTHETIC_DURATION_S
                       else ""))
        return f"{tfds_builder.NAME}/{self.builder_config.name}"


# ---- record sources ----


def prepare(config: DataConfig) -> None:
    """Builds the tfds dataset if it is missing (idempotent). Call on one process, then barrier."""
    if config.source == "tfds":
        tfds_builder.prepare(
            config.builder_config, data_dir=os.path.expanduser(config.data_dir),
            manual_dir=os.path.expanduser(config.manual_dir) or None,
        )


@functools.lru_cache(maxsize=4)
def _memory_records(rows: int, seed: int, max_target_length: int, test_fraction: float,
                    duration_s: int = tfds_builder.DEFAULT_SYNTHETIC_DURATION_S):
    from pingllm.data import synthetic

    table = synthetic.SyntheticInternet(seed=seed).generate(rows, duration_s=duration_s)
    split = records.rows_to_split_records(table, max_target_length, test_fraction)
    return {name: tuple(recs) for name, recs in split.items()}


def record_source(config: DataConfig, split: str) -> Sequence[dict[str, np.ndarray]]:
    """Random access to one split's records (len, [i]); picklable into Grain workers."""
    if config.source == "synthetic_memory":
        recs = _memory_records(config.synthetic_rows, config.synthetic_seed,
                               config.max_target_length, config.test_fraction,
                               config.synthetic_duration_s)[split]
    else:
        b = tfds_builder.builder(config.builder_config,
                                 data_dir=os.path.expanduser(config.data_dir))
        if not b.is_prepared():
            raise FileNotFoundError(
                f"{config.dataset_name} is not built in {b.data_dir}: call pipeline.prepare()")
        recs = tfds_builder.RecordSource(b, split)
    if len(recs) == 0:
        raise ValueError(f"split {split!r} of {config.dataset_name} has no records")
    return recs


# ---- which record each window reads ----


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, num_records: int) -> np.ndarray:
    """The record order of one epoch: argsort of a splitmix64 hash of (seed, epoch, i).

    Hand-rolled rather than np.random so the order never changes with the NumPy version.
    """
    m = splitmix.M64
    key = splitmix.mix64_int((splitmix.mix64_int(int(seed) & m) ^ int(epoch)) & m)
    with np.errstate(over="ignore"):
        h = np.arange(num_records, dtype=np.uint64) * np.uint64(splitmix.GOLDEN) + np.uint64(key)
    return np.argsort(splitmix.mix64_inplace(h), kind="stable")


def record_index(seed: int, position: int, num_records: int) -> int:
    """The record that global window position `position` reads."""
    epoch, offset = divmod(position, num_records)
    return int(epoch_permutation(seed, epoch, num_records)[offset])


@dataclasses.dataclass(frozen=True)
class Layout:
    """Process `process_index` of `process_count` takes rows [p*B/P, (p+1)*B/P) of each step."""

    global_batch_size: int
    process_index: int = 0
    process_count: int = 1

    def __post_init__(self):
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process_index {self.process_index} not in "
                             f"[0, {self.process_count})")
        if self.global_batch_size % self.process_count:
            raise ValueError(f"global_batch_size {self.global_batch_size} is not divisible by "
                             f"process_count {self.process_count}")

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.process_count

    def position(self, step: int, row: int) -> int:
        """Global window position of local row `row` of step `step`."""
        return step * self.global_batch_size + self.process_index * self.local_batch_size + row


# ---- Grain transforms (plain callables: they pickle into worker processes) ----


@dataclasses.dataclass(frozen=True)
class _Position:
    """Element k -> the global window index of window k % per_row of this process's row."""

    layout: Layout
    start_step: int
    per_row: int = 1

    def __call__(self, k: int) -> int:
        row_k, j = divmod(int(k), self.per_row)
        step, row = divmod(row_k, self.layout.local_batch_size)
        return self.layout.position(self.start_step + step, row) * self.per_row + j


@dataclasses.dataclass(frozen=True)
class _ReadRecord:
    source: Any
    seed: int

    def __call__(self, position: int) -> tuple[int, dict[str, np.ndarray]]:
        return position, self.source[record_index(self.seed, position, len(self.source))]


@dataclasses.dataclass(frozen=True)
class _TokenizeBatch:
    """Grain batch_fn: one vectorised tokenize_windows call per batch (not one per window)."""

    seed: int
    max_length: int
    per_row: int = 1

    def __call__(self, elements) -> dict[str, np.ndarray]:
        positions = [position for position, _ in elements]
        records = [record for _, record in elements]
        windows = tokens.tokenize_windows(records, seed=self.seed, window_indices=positions,
                                          max_length=self.max_length)
        if self.per_row == 1:
            return batch_from_tokens(windows.tokens, windows.fields, windows.lengths)
        return batch_from_segments(*pack_windows(windows.tokens, windows.fields,
                                                 windows.lengths, self.per_row))


def make_batch(windows: Sequence[tokens.TokenizedWindow]) -> dict[str, np.ndarray]:
    """The batch dict of CONTRACTS.md from tokenized windows (rows in order)."""
    return batch_from_tokens(
        np.stack([w.tokens for w in windows]),
        np.stack([w.fields for w in windows]),
        np.array([w.length for w in windows], np.int64),
    )


# The batch the pipeline yields (docs/CONTRACTS.md): key -> dtype; 'positions' only when rows
# pack several windows (windows_per_row > 1). Every array is [rows, max_target_length].
BATCH_DTYPES: dict[str, np.dtype] = {
    "inputs": np.dtype(np.int32), "targets": np.dtype(np.int32),
    "weights": np.dtype(np.float32), "segment_ids": np.dtype(np.int32),
    "fields": np.dtype(np.int32), "novel_result": np.dtype(np.float32),
}
PACKED_BATCH_DTYPES: dict[str, np.dtype] = {**BATCH_DTYPES, "positions": np.dtype(np.int32)}


def batch_spec(config: DataConfig, *, train: bool = True) -> dict[str, tuple[tuple[int, int],
                                                                              np.dtype]]:
    """Key -> (global shape, dtype) of the batches `train_iterator` (or eval) yields."""
    dtypes = PACKED_BATCH_DTYPES if train and config.windows_per_row > 1 else BATCH_DTYPES
    shape = (config.global_batch_size, config.max_target_length)
    return {k: (shape, d) for k, d in dtypes.items()}


def batch_from_tokens(tokens_BxL, fields_BxL, lengths_B) -> dict[str, np.ndarray]:
    """inputs/targets/weights/segment_ids/fields/novel_result from windows' tokens, field
    classes and lengths (one window per row)."""
    tokens_BxL = np.asarray(tokens_BxL, np.int32)
    length_Bx1 = np.asarray(lengths_B, np.int64)[:, None]
    segment_ids = (np.arange(tokens_BxL.shape[1]) < length_Bx1).astype(np.int32)
    return batch_from_segments(tokens_BxL, fields_BxL, segment_ids)


def batch_from_segments(tokens_BxL, fields_BxL, segment_ids_BxL,
                        positions_BxL=None) -> dict[str, np.ndarray]:
    """The batch dict of rows holding one or more windows (segments 1, 2, ..; 0 = padding).

    Packed rows (positions given) also carry 'positions': each window's token indices.
    """
    tokens_BxL = np.asarray(tokens_BxL, np.int32)
    segment_ids_BxL = np.asarray(segment_ids_BxL, np.int32)
    targets = np.zeros_like(tokens_BxL)
    targets[:, :-1] = tokens_BxL[:, 1:]
    target_fields = np.zeros(tokens_BxL.shape, np.int32)
    target_fields[:, :-1] = fields_BxL[:, 1:]
    novel = np.zeros(tokens_BxL.shape, np.float32)
    novel[:, :-1] = novel_results(tokens_BxL, fields_BxL, segment_ids_BxL)[:, 1:]
    # A target counts when it is the next token of the same window: the last token of a
    # window is followed by padding (id 0 = MEASUREMENT_START) or by another window.
    weights = np.zeros(tokens_BxL.shape, np.float32)
    weights[:, :-1] = (segment_ids_BxL[:, :-1] != 0) & (
        segment_ids_BxL[:, 1:] == segment_ids_BxL[:, :-1])
    batch = {
        "inputs": tokens_BxL,
        "targets": targets,
        "weights": weights,
        "segment_ids": segment_ids_BxL,
        "fields": target_fields,
        # 1 where the target is a result token of a measurement whose destination is new to
        # the window: the tokens a held-out pair's prediction depends on (no copy possible).
        "novel_result": novel,
    }
    dtypes = BATCH_DTYPES
    if positions_BxL is not None:
        batch["positions"] = positions_BxL
        dtypes = PACKED_BATCH_DTYPES
    return {k: np.asarray(batch[k], dtypes[k]) for k in dtypes}


def pack_windows(tokens_NxL, fields_NxL, lengths_N, per_row: int):
    """Windows k*per_row .. (k+1)*per_row-1 into row k, in order, each whole where it fits
    (one that does not is dropped; the first always fits).

    Returns (tokens, fields, segment_ids, positions), each int32[N / per_row, L].
    """
    tokens_NxL, fields_NxL = np.asarray(tokens_NxL), np.asarray(fields_NxL)
    lengths_N = np.asarray(lengths_N, np.int64)
    n, length = tokens_NxL.shape
    if n % per_row:
        raise ValueError(f"{n} windows do not make rows of {per_row}")
    rows = n // per_row
    out = [np.zeros((rows, length), np.int32) for _ in range(4)]
    out_tokens, out_fields, out_segments, out_positions = out
    for r in range(rows):
        at = 0
        for j in range(per_row):
            w, size = r * per_row + j, int(lengths_N[r * per_row + j])
            if at + size > length:
                continue
            out_tokens[r, at:at + size] = tokens_NxL[w, :size]
            out_fields[r, at:at + size] = fields_NxL[w, :size]
            out_segments[r, at:at + size] = j + 1
            out_positions[r, at:at + size] = np.arange(size)
            at += size
    return out_tokens, out_fields, out_segments, out_positions


def novel_results(tokens_BxL: np.ndarray, fields_BxL: np.ndarray,
                  segment_ids_BxL: np.ndarray | None = None) -> np.ndarray:
    """bool[B, L]: result-field tokens of measurements whose destination has not appeared
    earlier in its window (the row, or the row's segment when given; input-aligned).
    Vectorised over the batch."""
    tok, fld = np.asarray(tokens_BxL, np.int64), np.asarray(fields_BxL)
    b, length = tok.shape
    measurement = np.cumsum(fld == tokens.FIELD_START, axis=1) - 1
    rows, at = np.nonzero((fld == tokens.FIELD_DST)
                          & ((tok == tokens.DST_IPV4) | (tok == tokens.DST_IPV6)))
    out = np.zeros((b, length), bool)
    if len(rows) == 0:
        return out
    # The destination's type token and 16 following tokens (v4 bytes beyond 4 masked out).
    offsets = np.arange(17)
    window = tok[rows[:, None], np.minimum(at[:, None] + offsets, length - 1)]
    is_v4 = window[:, :1] == tokens.DST_IPV4
    window = np.where(is_v4 & (offsets > 4), 0, window)
    segment = (np.zeros(len(rows), np.int64) if segment_ids_BxL is None
               else np.asarray(segment_ids_BxL, np.int64)[rows, at])
    key = np.concatenate([rows[:, None], segment[:, None], window], axis=1)
    _, first = np.unique(key, axis=0, return_index=True)
    new = np.zeros((b, int(measurement.max()) + 1), bool)
    new[rows[first], measurement[rows[first], at[first]]] = True
    # Where each measurement's destination starts: only results after it are query-shaped.
    dst_at = np.full(new.shape, length, np.int64)
    dst_at[rows, measurement[rows, at]] = at
    r_rows, r_at = np.nonzero(fld == tokens.FIELD_RESULT)
    r_meas = measurement[r_rows, r_at]
    out[r_rows, r_at] = new[r_rows, r_meas] & (dst_at[r_rows, r_meas] < r_at)
    return out


def step_dataset(config: DataConfig, source, layout: Layout, start_step: int, *,
                 train: bool = True) -> grain.MapDataset:
    """Element i = this process's rows of step start_step + i (random access, lazy).

    Training windows get the config's augmentations and packing; eval windows (train=False)
    never do. Window i of row r (global row position p) has window index p * per_row + i.
    """
    per_row = config.windows_per_row if train else 1
    ds = (grain.MapDataset.range(0, (_MAX_STEPS - start_step) * layout.local_batch_size
                                 * per_row)
          .map(_Position(layout, start_step, per_row))
          .map(_ReadRecord(source, config.seed)))
    if train and config.augment.active:
        ds = ds.map(config.augment)
    return ds.batch(layout.local_batch_size * per_row,
                    batch_fn=_TokenizeBatch(config.seed, config.max_target_length, per_row))


# ---- the train iterator ----


class StepIterator(grain.DatasetIterator):
    """Batches of consecutive steps for one process; its state is the step.

    A Grain `DatasetIterator`, so `grain.checkpoint.CheckpointSave/Restore` (Orbax item 'iter')
    save `get_state()` as JSON and call `set_state()` on restore.
    """

    def __init__(self, config: DataConfig, source, layout: Layout, start_step: int = 0):
        super().__init__()
        self._config = config
        self._source = source
        self._layout = layout
        self._step = int(start_step)
        self._iter = None

    @property
    def step(self) -> int:
        """The step whose batch `next()` returns."""
        return self._step

    @property
    def layout(self) -> Layout:
        return self._layout

    def _ensure_iter(self):
        if self._iter is None:
            c = self._config
            ds = step_dataset(c, self._source, self._layout, self._step).to_iter_dataset(
                grain.ReadOptions(num_threads=c.read_threads,
                                  prefetch_buffer_size=c.prefetch_batches)
            )
            if c.worker_count > 0:
                # Grain reads absl flags when it starts workers; outside an absl app (tests,
                # tools) nothing parsed them and it would raise UnparsedFlagAccessError.
                if not flags.FLAGS.is_parsed():
                    flags.FLAGS.mark_as_parsed()
                ds = ds.mp_prefetch(grain.MultiprocessingOptions(
                    num_workers=c.worker_count, per_worker_buffer_size=c.worker_buffer_size))
            self._iter = iter(ds)
        return self._iter

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        batch = next(self._ensure_iter())
        self._step += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {
            "step": self._step,
            "process_index": self._layout.process_index,
            "process_count": self._layout.process_count,
            "global_batch_size": self._layout.global_batch_size,
            "seed": self._config.seed,
            "max_target_length": self._config.max_target_length,
            "dataset": self._config.dataset_name,
            "dedupe_rate": self._config.dedupe_rate,
            "anonymise_source_rate": self._config.anonymise_source_rate,
            "windows_per_row": self._config.windows_per_row,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues at state['step']; any process layout works, the data must be the same."""
        mine = self.get_state()
        # States saved before the window augmentations and packing existed had none.
        state = {"dedupe_rate": 0.0, "anonymise_source_rate": 0.0, "windows_per_row": 1,
                 **state}
        for key in ("global_batch_size", "seed", "max_target_length", "dataset", "dedupe_rate",
                    "anonymise_source_rate", "windows_per_row"):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"iterator state was saved with {key}={state.get(key)!r}, this run has "
                    f"{mine[key]!r}: resuming would not reproduce the same batches"
                )
        self.for_step(int(state["step"]))

    def for_step(self, step: int) -> StepIterator:
        """Repositions at `step` (for example after a restart with another process count)."""
        self.close()
        self._closed = False
        self._step = int(step)
        return self

    def start_prefetch(self) -> None:
        self._ensure_iter().start_prefetch()

    def close(self) -> None:
        if self._iter is not None:
            self._iter.close()
            self._iter = None
        super().close()


def train_iterator(config: DataConfig, *, process_index: int = 0, process_count: int = 1,
                   start_step: int = 0) -> StepIterator:
    layout = Layout(config.global_batch_size, process_index, process_count)
    return StepIterator(config, record_source(config, "train"), layout, start_step)


def eval_batches(config: DataConfig, *, process_index: int = 0, process_count: int = 1,
                 num_batches: int) -> list[dict[str, np.ndarray]]:
    """The same `num_batches` batches of the eval split every time (this process's rows)."""
    layout = Layout(config.global_batch_size, process_index, process_count)
    ds = step_dataset(config, record_source(config, config.eval_split), layout, 0, train=False)
    return [ds[i] for i in range(num_batches)]


def global_batch(config: DataConfig, step: int) -> dict[str, np.ndarray]:
    """The whole global batch of one step, computed in this process (tools and tests)."""
    layout = Layout(config.global_batch_size)
    return step_dataset(config, record_source(config, "train"), layout, step)[0]
