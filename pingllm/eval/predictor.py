"""RTT quantiles and P(fail) from a checkpoint (docs/tokenization.md "Reading a prediction").

The command is `pingllm-predict` (pingllm/cli/predict.py).

Reading the distribution exactly, with at most four forward rows per query:

1. prompt + RTT_START: the logits before RTT_START, restricted to {RTT_START, FAILED}, give
   P(fail); the logits at RTT_START give p(b1) over the first RTT byte.
2. Canonical RTT codes increase with the RTT they decode to, and code = b1 << 8 | b2, so the
   RTT CDF is the b1 CDF refined inside each b1 bin. A quantile q therefore lies in the one bin
   where the b1 CDF crosses q, and only that bin's p(b2 | b1) is needed: one row
   prompt + RTT_START + b1 per distinct bin among p10/p50/p90 (1 to 3 rows), instead of 256.

Mass on non-canonical codes (never in data) is dropped and the rest renormalised.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa

from pingllm.data import augment, records, schema, tokens

QUANTILES = (0.1, 0.5, 0.9)
OUTPUT_COLUMNS = ("p_fail", "rtt_p10", "rtt_p50", "rtt_p90")
_LENGTH_BUCKET = 64  # prompts are padded to a multiple of this: few compiled shapes


class PredictionError(ValueError):
    """A query the predictor cannot answer (bad address, mixed families, missing column)."""


@dataclasses.dataclass(frozen=True)
class Query:
    """One (source, destination[, time]) question; addresses uint8[16] (IPv4 in bytes 0..3)."""

    src_addr: np.ndarray
    dst_addr: np.ndarray
    ip_version: int
    event_time: int | None = None  # Unix seconds


@dataclasses.dataclass(frozen=True)
class Predictions:
    """Per query: P(no reply) and RTT quantiles in ms (conditional on a reply)."""

    p_fail: np.ndarray  # float64[N]
    rtt_p10: np.ndarray
    rtt_p50: np.ndarray
    rtt_p90: np.ndarray

    def __len__(self) -> int:
        return len(self.p_fail)

    def as_dict(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in OUTPUT_COLUMNS}


# ---- the code distribution ----

CANONICAL_B1 = tokens.CANONICAL_RTT_BYTE1  # first bytes (b1) a canonical RTT code starts with


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=-1, keepdims=True)


def p_fail_from_logits(logits_NxV: np.ndarray) -> np.ndarray:
    """P(FAILED) with the next-token distribution restricted to {RTT_START, FAILED}."""
    two = logits_NxV[:, [tokens.RTT_START, tokens.FAILED]].astype(np.float64)
    return _softmax(two)[:, 1]


def byte_distribution(logits_NxV: np.ndarray, valid_N256: np.ndarray | None = None) -> np.ndarray:
    """Distribution over the 256 byte tokens, renormalised over `valid` bytes."""
    logits = logits_NxV[:, tokens.BYTE_OFFSET:tokens.BYTE_OFFSET + 256].astype(np.float64)
    if valid_N256 is not None:
        logits = np.where(valid_N256, logits, -np.inf)
    return _softmax(logits)


def quantile_bins(p_b1_Nx256: np.ndarray, qs=QUANTILES) -> tuple[np.ndarray, np.ndarray]:
    """(b1 bin of each quantile int[N, Q], the quantile's rank inside its bin float[N, Q])."""
    cdf = np.cumsum(p_b1_Nx256, axis=1)
    cdf[:, -1] = 1.0  # guard against rounding just below 1
    q = np.asarray(qs, np.float64)
    bins = np.stack([np.argmax(cdf >= qi, axis=1) for qi in q], axis=1)
    before = np.take_along_axis(cdf, bins, 1) - np.take_along_axis(p_b1_Nx256, bins, 1)
    mass = np.take_along_axis(p_b1_Nx256, bins, 1)
    inner = np.clip((q[None, :] - before) / np.maximum(mass, 1e-300), 0.0, 1.0)
    return bins, inner


def b2_valid(b1: np.ndarray) -> np.ndarray:
    """bool[N, 256]: canonical second bytes after b1 (only b1 = 0 excludes code 0)."""
    valid = np.ones((len(b1), 256), bool)
    valid[np.asarray(b1) == 0, 0] = False
    return valid


def quantile_in_bin(p_b2_Nx256: np.ndarray, inner_N: np.ndarray) -> np.ndarray:
    """The b2 at which the within-bin CDF reaches inner."""
    cdf = np.cumsum(p_b2_Nx256, axis=1)
    cdf[:, -1] = 1.0
    return np.argmax(cdf >= inner_N[:, None], axis=1)


# ---- the model ----


@functools.lru_cache(maxsize=4)
def _forward_fn(model_cfg):
    from pingllm.model import Transformer

    model = Transformer(model_cfg)

    @jax.jit
    def last_two(params, tokens_BxL, lengths_B):
        """Logits (float32) at the last two real positions of each row: Bx2xV."""
        positions_L = jnp.arange(tokens_BxL.shape[1])
        segment_ids = (positions_L[None, :] < lengths_B[:, None]).astype(jnp.int32)
        logits = model.apply({"params": params}, tokens_BxL, segment_ids)
        idx = jnp.stack([lengths_B - 2, lengths_B - 1], axis=1)
        return jnp.take_along_axis(logits, idx[:, :, None], axis=1)

    return last_two


def pad_prompts(chunk, batch_size: int, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> (tokens int32[batch_size, width], lengths) with width a multiple of
    _LENGTH_BUCKET (few compiled shapes); unused rows get length 2."""
    longest = max(len(r) for r in chunk)
    width = min(-(-longest // _LENGTH_BUCKET) * _LENGTH_BUCKET, max_length)
    if longest > width:
        raise PredictionError(f"a prompt of {longest} tokens exceeds the model's {max_length}")
    batch = np.zeros((batch_size, width), np.int32)
    lengths = np.full(batch_size, 2, np.int32)
    for i, row in enumerate(chunk):
        batch[i, :len(row)] = row
        lengths[i] = len(row)
    return batch, lengths


class Predictor:
    """A model's parameters plus how prompts are built (context choice, tokenization seed)."""

    def __init__(self, model_cfg, params, *, data_config=None, seed: int = 0,
                 batch_size: int = 32, latest_per_destination: bool | None = None):
        self.model_cfg = model_cfg
        self.params = params
        self.data_config = data_config
        self.seed = seed
        self.batch_size = batch_size
        # Contexts are cut the way the training windows were: a model trained mostly on
        # windows holding each destination's latest measurement (DataConfig.dedupe_rate)
        # gets the latest measurement of each context destination.
        if latest_per_destination is None:
            latest_per_destination = data_config is not None and data_config.dedupe_rate >= 0.5
        self.latest_per_destination = latest_per_destination
        self.max_length = model_cfg.max_target_length
        self._forward = _forward_fn(model_cfg)
        self._train_index = None

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, **kwargs) -> Predictor:
        """A run directory (newest complete step), its checkpoints/ directory or one step."""
        cfg, params, _ = load_checkpoint(path)
        kwargs.setdefault("seed", cfg.data.seed)
        return cls(cfg.model, params, data_config=cfg.data, **kwargs)

    # ---- raw prompts -> distributions ----

    def _logits(self, rows: list[np.ndarray]) -> np.ndarray:
        """Logits at the last two positions of each row (float32[N, 2, V]), batched."""
        out = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            batch, lengths = pad_prompts(chunk, self.batch_size, self.max_length)
            logits = self._forward(self.params, jnp.asarray(batch), jnp.asarray(lengths))
            out.append(np.asarray(jax.device_get(logits))[:len(chunk)])
        return np.concatenate(out) if out else np.zeros((0, 2, 1), np.float32)

    def predict_prompts(self, prompts: Sequence[np.ndarray]) -> Predictions:
        """Predictions for prompts that end just before the result field."""
        n = len(prompts)
        if n == 0:
            empty = np.zeros(0)
            return Predictions(empty, empty, empty, empty)
        first = self._logits([np.append(p, tokens.RTT_START).astype(np.int32) for p in prompts])
        p_fail = p_fail_from_logits(first[:, 0])
        p_b1 = byte_distribution(first[:, 1], np.broadcast_to(CANONICAL_B1, (n, 256)))
        bins, inner = quantile_bins(p_b1)
        # One refinement row per distinct (query, bin).
        pairs = sorted({(i, int(b)) for i in range(n) for b in bins[i]})
        rows = [np.append(prompts[i], [tokens.RTT_START, tokens.BYTE_OFFSET + b]).astype(np.int32)
                for i, b in pairs]
        second = self._logits(rows)[:, 1]
        b1_of_row = np.array([b for _, b in pairs])
        p_b2 = byte_distribution(second, b2_valid(b1_of_row))
        row_of = {pair: k for k, pair in enumerate(pairs)}
        quantiles = np.zeros((n, len(QUANTILES)))
        for i in range(n):
            for q in range(len(QUANTILES)):
                k = row_of[(i, int(bins[i, q]))]
                b2 = quantile_in_bin(p_b2[k:k + 1], inner[i, q:q + 1])[0]
                quantiles[i, q] = tokens.decode_rtt(tokens.bytes_to_rtt_code(bins[i, q], b2))
        return Predictions(p_fail, quantiles[:, 0], quantiles[:, 1], quantiles[:, 2])

    # ---- queries + context -> prompts ----

    def prompt(self, query: Query, context: dict | None, *, window_index: int = 0,
               mode: str | None = None) -> np.ndarray:
        """Tokens for one query after a context record of the same source (None: empty).

        mode: None ('full' with a query time, else 'none'), 'drawn' (by window_index, as in
        training) or a timestamp mode name.

        The context keeps its newest measurements that surely fit; measurements after the
        query's time are dropped so the query's time delta is never negative.
        """
        record = _fit_context(context, query, self.max_length, self.latest_per_destination)
        if mode is None:  # the most informative mode the query allows
            mode = "full" if query.event_time is not None else "none"
        elif mode == "drawn":  # as in training: the mode window_index draws
            mode = None
        return tokens.tokenize_prompt(
            record, seed=self.seed, window_index=window_index, max_length=self.max_length,
            query_src=query.src_addr, query_dst=query.dst_addr, ip_version=query.ip_version,
            query_time=query.event_time, mode=mode)

    def training_context(self, query: Query) -> dict | None:
        """The training split's measurements of the query's source, as one record (or None)."""
        if self.data_config is None:
            return None
        if self._train_index is None:
            self._train_index = _index_by_source(_train_records(self.data_config))
        key = (query.ip_version, bytes(np.asarray(query.src_addr, np.uint8)))
        return self._train_index.get(key)

    def predict(self, pairs, context=None) -> Predictions:
        """pairs: Queries, or (src, dst[, time]) text tuples. context: rows (a ROW_SCHEMA
        table or a file path) of earlier measurements; None uses the training data's records
        of each source (empty context when it has none)."""
        queries = [q if isinstance(q, Query) else make_query(*q) for q in pairs]
        by_source = None
        if context is not None:
            table = context if isinstance(context, pa.Table) else read_rows(context)
            by_source = _index_by_source(records.rows_to_records(table, 1 << 30))
        prompts = []
        for q in queries:
            if by_source is None:
                ctx = self.training_context(q)
            else:
                ctx = by_source.get((q.ip_version, bytes(np.asarray(q.src_addr, np.uint8))))
            prompts.append(self.prompt(q, ctx))
        return self.predict_prompts(prompts)


def _fit_context(context: dict | None, query: Query, max_length: int,
                 latest_per_destination: bool = False) -> dict:
    """The context record cut to measurements before the query that fit any timestamp mode
    (only the latest of each destination's, if asked)."""
    empty = {"src_addr": np.asarray(query.src_addr, np.uint8), "ip_version": query.ip_version,
             "dst_addr": np.zeros((0, 16), np.uint8), "event_time": np.zeros(0, np.int64),
             "rtt_ms": np.zeros(0, np.float32)}
    if context is None or len(context["event_time"]) == 0:
        return empty
    if int(context["ip_version"]) != query.ip_version:
        return empty
    t = np.asarray(context["event_time"], np.int64)
    keep = np.arange(len(t))
    if query.event_time is not None:
        keep = keep[t <= query.event_time]
    if latest_per_destination and len(keep):
        keep = keep[augment.latest_of_each_destination(np.asarray(context["dst_addr"])[keep])]
    query_len = tokens.worst_case_tokens(query.ip_version, True)  # absolute time, and the result
    room = tokens.max_measurements(query.ip_version, max_length - query_len)
    keep = keep[len(keep) - min(room, len(keep)):]
    return {"src_addr": np.asarray(context["src_addr"], np.uint8),
            "ip_version": query.ip_version,
            "dst_addr": np.asarray(context["dst_addr"])[keep],
            "event_time": t[keep],
            "rtt_ms": np.asarray(context["rtt_ms"])[keep]}


def _index_by_source(recs) -> dict[tuple[int, bytes], dict]:
    """{(ip version, source bytes): one time-ordered record of all its measurements}."""
    parts: dict[tuple[int, bytes], list[dict]] = {}
    for r in recs:
        key = (int(r["ip_version"]), bytes(np.asarray(r["src_addr"], np.uint8)))
        parts.setdefault(key, []).append(r)
    out = {}
    for key, rs in parts.items():
        t = np.concatenate([r["event_time"] for r in rs])
        order = np.argsort(t, kind="stable")
        out[key] = {"src_addr": np.asarray(rs[0]["src_addr"], np.uint8), "ip_version": key[0],
                    "dst_addr": np.concatenate([r["dst_addr"] for r in rs])[order],
                    "event_time": t[order],
                    "rtt_ms": np.concatenate([r["rtt_ms"] for r in rs])[order]}
    return out


def _train_records(data_config):
    from pingllm.data import pipeline

    src = pipeline.record_source(data_config, "train")
    return (src[i] for i in range(len(src)))


# ---- checkpoints ----


def resolve_checkpoint(path: str | os.PathLike):
    """(run_dir, step_dir) epaths of a run directory, its checkpoints/ directory or a step
    directory, local or gs:// (pingllm.checkpoint.format.resolve_step)."""
    from pingllm.checkpoint import format as checkpoint_format

    return checkpoint_format.resolve_step(path)


def load_checkpoint(path: str | os.PathLike):
    """(Config recovered from the run's config.gin, parameters on one device, step dir).

    The parameters are the moving average when the run kept one (OptimizerConfig.ema_decay).
    """
    import tempfile

    from pingllm import config as config_lib
    from pingllm.checkpoint import manager as checkpointing
    from pingllm.model import Transformer, dummy_inputs

    run_dir, step_dir = resolve_checkpoint(path)
    gin_file = run_dir / "config.gin"
    if not gin_file.is_file():
        raise FileNotFoundError(f"{gin_file} is missing: cannot recover the model config")
    with tempfile.TemporaryDirectory() as tmp:  # gin reads local files (a bucket's is copied)
        local_gin = gin_file if not str(gin_file).startswith("gs://") else (
            checkpointing.epath.Path(tmp) / "config.gin")
        if local_gin != gin_file:
            local_gin.write_text(gin_file.read_text())
        cfg = config_lib.load([str(local_gin)])
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    import flax.linen as nn

    shapes = jax.eval_shape(lambda: nn.meta.unbox(Transformer(cfg.model).init(
        {"params": jax.random.key(0)}, *dummy_inputs(cfg.model))["params"]))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            shapes)
    params = checkpointing.restore_params(step_dir, abstract, prefer_ema=True)
    return cfg, params, step_dir


# ---- queries from text and files ----


def parse_time(value) -> int | None:
    """Unix seconds from an int/float, ISO-8601 text, a datetime or a pandas/arrow timestamp."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return int(value.timestamp())
    if isinstance(value, (int, np.integer, float, np.floating)):
        return int(value)
    text = str(value).strip()
    if not text:
        return None
    try:
        return int(float(text))
    except ValueError:
        pass
    try:
        return parse_time(dt.datetime.fromisoformat(text.replace("Z", "+00:00")))
    except ValueError as e:
        raise PredictionError(f"not a time (Unix seconds or ISO 8601): {text!r}") from e


def make_query(src: str, dst: str, event_time=None) -> Query:
    """A Query from address text; raises PredictionError naming the bad value."""
    try:
        src_b, src_v = schema.parse_address(str(src))
    except schema.AddressError as e:
        raise PredictionError(f"bad source address {src!r}: {e}") from e
    try:
        dst_b, dst_v = schema.parse_address(str(dst))
    except schema.AddressError as e:
        raise PredictionError(f"bad destination address {dst!r}: {e}") from e
    if src_v != dst_v:
        raise PredictionError(f"source {src} is IPv{src_v} but destination {dst} is IPv{dst_v}")
    return Query(src_b, dst_b, src_v, parse_time(event_time))


def read_table(path: str | os.PathLike) -> pa.Table:
    """A Parquet or CSV file as an arrow table."""
    p = Path(path)
    if not p.is_file():
        raise PredictionError(f"file not found: {p}")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(p)
    if p.suffix == ".csv":
        import pyarrow.csv as pcsv

        return pcsv.read_csv(p, convert_options=pcsv.ConvertOptions(
            column_types={"src_addr": pa.string(), "dst_addr": pa.string()}))
    raise PredictionError(f"{p}: use .parquet or .csv")


def read_rows(path: str | os.PathLike) -> pa.Table:
    """Context rows: ROW_SCHEMA Parquet/CSV, or RIPE Atlas JSON lines (via the importer)."""
    p = Path(path)
    if p.suffix in (".jsonl", ".json", ".gz", ".bz2"):
        from pingllm.data import ripe_atlas

        if not p.is_file():
            raise PredictionError(f"file not found: {p}")
        table, _ = ripe_atlas.import_files([p])
        return table
    table = read_table(p)
    needed = ("src_addr", "dst_addr", "event_time", "rtt")
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise PredictionError(f"{p}: context rows lack column(s) {', '.join(missing)}")
    n = len(table)
    if "ip_version" not in table.column_names:
        _, versions = schema.parse_addresses(table["src_addr"].to_pylist())
        table = table.append_column("ip_version", pa.array(versions, pa.int8()))
    for name, default in (("msm_id", -1), ("prb_id", -1)):
        if name not in table.column_names:
            table = table.append_column(name, pa.array(np.full(n, default), pa.int64()))
    times = [parse_time(v) for v in table["event_time"].to_pylist()]
    table = table.set_column(table.column_names.index("event_time"), "event_time",
                             pa.array(np.asarray(times, np.int64) * 1_000_000, pa.int64())
                             .cast(pa.timestamp("us", tz="UTC")))
    return table.select(schema.ROW_SCHEMA.names).cast(schema.ROW_SCHEMA)


def queries_from_table(table: pa.Table) -> list[Query]:
    missing = [c for c in ("src_addr", "dst_addr") if c not in table.column_names]
    if missing:
        raise PredictionError(f"pairs file lacks column(s) {', '.join(missing)} "
                              f"(has {', '.join(table.column_names)})")
    src, dst = table["src_addr"].to_pylist(), table["dst_addr"].to_pylist()
    times = (table["event_time"].to_pylist() if "event_time" in table.column_names
             else [None] * len(src))
    out = []
    for row, (s, d, t) in enumerate(zip(src, dst, times)):
        try:
            out.append(make_query(s, d, t))
        except PredictionError as e:
            raise PredictionError(f"row {row}: {e}") from e
    return out


def write_table(table: pa.Table, path: str | os.PathLike) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix == ".csv":
        import pyarrow.csv as pcsv

        pcsv.write_csv(table, p)
    else:
        import pyarrow.parquet as pq

        pq.write_table(table, p)
