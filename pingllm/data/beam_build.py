"""The `manual` build on Apache Beam: files -> rows -> rows of one source -> records per split.

One pipeline feeds every split (tfds applies one PTransform per split; `ManualSplits` builds
the shared part once per pipeline). Steps: the file list -> Reshuffle (one file per worker,
not all of them fused onto the first) -> each file through the streaming importer
(`ripe_atlas.iter_file_tables`), its rows cut by source address -> GroupByKey on the source ->
`records.rows_to_split_records` on that source's rows -> `(key, record)` per split, keyed by
`tfds_builder.keyed_records` exactly as the single-process build keys them, so both write the
same records in the same order. The importer's counts become Beam counters in NAMESPACE
(`kept`, `dropped/<reason>`, `filtered/<filter>`, `notes/<note>`, and for an input that ended
early `truncated/<field>/<file>`);
`summary_from_metrics` reads them back as an `ImportSummary`.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from etils import epath

from pingllm.data import records, ripe_atlas

NAMESPACE = "pingllm.ripe_atlas_import"
# The numbers of an ImportSummary.truncated entry, one counter each (its `error` text is logged).
TRUNCATED_FIELDS = ("compressed_offset", "compressed_size", "decompressed_offset", "lines")
_log = logging.getLogger(__name__)


def rows_by_source(table: pa.Table) -> Iterator[tuple[str, pa.Table]]:
    """(source address text, that source's rows) for each source of a ROW_SCHEMA table."""
    if not table.num_rows:
        return
    encoded = pc.dictionary_encode(table["src_addr"]).combine_chunks()
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    order = np.argsort(codes, kind="stable")
    bounds = np.flatnonzero(np.diff(codes[order])) + 1
    for rows in np.split(order, bounds):
        yield encoded.dictionary[int(codes[rows[0]])].as_py(), table.take(rows)


@contextlib.contextmanager
def _local(path: str):
    """A local path for `path`: itself, or a temporary copy of a gs:// (any epath) file."""
    if "://" not in path:
        yield path
        return
    source = epath.Path(path)
    with tempfile.TemporaryDirectory(prefix="pingllm_beam_") as tmp:
        local = epath.Path(tmp) / source.name
        source.copy(local)  # as it is: the importer tells compression by content
        yield str(local)


def count_summary(summary: ripe_atlas.ImportSummary) -> None:
    """Adds one file's import counts to the pipeline's counters (NAMESPACE)."""
    Metrics.counter(NAMESPACE, "kept").inc(summary.kept)
    for group, counts in (("dropped", summary.dropped), ("filtered", summary.filtered),
                          ("notes", summary.notes)):
        for name, count in counts.items():
            Metrics.counter(NAMESPACE, f"{group}/{name}").inc(count)
    for t in summary.truncated:  # one counter per number, named after its file
        for field in TRUNCATED_FIELDS:
            Metrics.counter(NAMESPACE, f"truncated/{field}/{t['file']}").inc(t[field])


def import_file(path: str) -> Iterator[tuple[str, pa.Table]]:
    """One input file -> (source, rows) pieces, chunk by chunk; its counts go to counters."""
    summary = ripe_atlas.ImportSummary()
    with _local(path) as local:
        for table in ripe_atlas.iter_file_tables([local], summary):
            yield from rows_by_source(table)
    for t in summary.truncated:
        t["file"] = path  # not the temporary copy
        _log.warning("TRUNCATED %s: %s", path, t.get("error", ""))
    count_summary(summary)


def source_records(item: tuple[str, Sequence[pa.Table]], *, max_target_length: int,
                   test_fraction: float, later_from_s: int | None):
    """All rows of one source -> TaggedOutput(split, (key, record)) for every record."""
    from pingllm.data.tfds_builder import keyed_records

    _, tables = item
    table = pa.concat_tables(list(tables))
    split = records.rows_to_split_records(table, max_target_length, test_fraction,
                                          later_from_s=later_from_s)
    for name, recs in split.items():
        for key_record in keyed_records(recs):
            yield beam.pvalue.TaggedOutput(name, key_record)


def summary_from_metrics(result) -> ripe_atlas.ImportSummary:
    """The import counts of a finished pipeline (its NAMESPACE counters) as an ImportSummary."""
    summary = ripe_atlas.ImportSummary()
    truncated: dict[str, dict] = {}
    query = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    for counter in query["counters"]:
        name = counter.key.metric.name
        value = counter.committed if counter.committed is not None else counter.attempted
        group, _, rest = name.partition("/")
        if group == "kept":
            summary.kept += value
        elif group == "truncated":
            field, _, path = rest.partition("/")
            entry = truncated.setdefault(path, {"file": path})
            entry[field] = entry.get(field, 0) + value
        elif value:
            counts = getattr(summary, group)
            counts[rest] = counts.get(rest, 0) + value
    summary.truncated = [truncated[p] for p in sorted(truncated)]
    return summary


class ManualSplits:
    """The shared import + grouping, built once per pipeline; `split(name)` is a split's part."""

    def __init__(self, paths: Sequence, names: Sequence[str], *,
                 max_target_length: int, test_fraction: float, later_from_s: int | None):
        self.paths = [str(p) for p in paths]
        self.names = tuple(names)
        self.options = dict(max_target_length=max_target_length, test_fraction=test_fraction,
                            later_from_s=later_from_s)
        self._built: dict[int, object] = {}

    def __getstate__(self):  # PCollections stay in the launching process
        return {**self.__dict__, "_built": {}}

    def outputs(self, pipeline):
        """The tagged per-split outputs of `pipeline`'s shared part (built on first use)."""
        key = id(pipeline)
        if key not in self._built:
            self._built[key] = (
                pipeline
                | "ManualFiles" >> beam.Create(self.paths)
                | "OneFilePerWorker" >> beam.Reshuffle()
                | "ImportFile" >> beam.FlatMap(import_file)
                | "BySource" >> beam.GroupByKey()
                | "SourceRecords" >> beam.FlatMap(source_records, **self.options)
                .with_outputs(*self.names)
            )
        return self._built[key]

    def split(self, name: str) -> beam.PTransform:
        if name not in self.names:
            raise KeyError(f"no split {name!r} in {self.names}")
        return _Split(self, name)


class _Split(beam.PTransform):
    """One split's (key, record) PCollection, out of the shared outputs."""

    def __init__(self, shared: ManualSplits, name: str):
        super().__init__()
        self.shared, self.split_name = shared, name

    def expand(self, pbegin):
        return self.shared.outputs(pbegin.pipeline)[self.split_name] | "Records" >> beam.Map(
            lambda key_record: key_record)
