"""ROW_SCHEMA rows -> RIPE Atlas ping results as JSON lines (fw 5080 format, docs/data_rules.md §2).

What a row does not say (the other two packets, NAT, TTL) is filled in deterministically from
the row itself, so the same table always gives the same bytes. Importing the lines back
(`pingllm.data.ripe_atlas`) gives the rows again: `min` is the row's float32 RTT written with
`repr` of its exact float64 value, `from` is the public source, `rcvd` is 0 exactly when the
row failed, and timestamps are the rows' whole seconds.

`mixed_ripe_lines` writes the same rows as a dump from the wild looks: firmware 4610 to 5080
(no `mver`/`stored_timestamp` on old ones, `lts` -1, late duplicate replies, `error` entries)
with traceroute and DNS results between them; importing it still gives exactly the rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from pingllm.data.schema import ROW_SCHEMA

FIRMWARE = 5080
MEASUREMENT_VERSION = "2.6.2"
PACKETS = 3


def _row_hash(table: pa.Table) -> np.ndarray:
    """A uint64 per row from its ids and time: the source of every filled-in detail."""
    msm = table["msm_id"].to_numpy().astype(np.uint64)
    prb = table["prb_id"].to_numpy().astype(np.uint64)
    t = table["event_time"].cast(pa.int64()).to_numpy().astype(np.uint64)
    with np.errstate(over="ignore"):
        h = msm * np.uint64(0x9E3779B97F4A7C15) ^ prb * np.uint64(0xBF58476D1CE4E5B9) ^ t
        for _ in range(2):
            h = (h ^ (h >> np.uint64(31))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(29))


def _num(x: float) -> str:
    """A float as JSON that reads back to the same float64."""
    return repr(float(x))


def ripe_lines(table: pa.Table) -> Iterator[str]:
    """One JSON object (a RIPE Atlas ping result, no newline) per row."""
    if not table.schema.equals(ROW_SCHEMA, check_metadata=False):
        raise ValueError(f"expected ROW_SCHEMA, got {table.schema}")
    h = _row_hash(table)
    u = [((h >> np.uint64(s)) & np.uint64(0xFFFF)).astype(np.float64) / 65536 for s in (0, 16, 32)]
    rtt = table["rtt"].to_numpy().astype(np.float64)
    # Extra delay of the two slower packets; a few percent of pings lose one or two packets.
    spread = np.stack([0.003 + rtt * 0.03 * u[0], 0.003 + rtt * 0.08 * u[1]], axis=1)
    rcvd = np.where(u[2] < 0.01, 1, np.where(u[2] < 0.04, 2, PACKETS))
    lost_slot = (h >> np.uint64(48)).astype(np.int64) % PACKETS
    nat = (h >> np.uint64(52)) & np.uint64(0xFF)
    ttl = 40 + (h >> np.uint64(56)).astype(np.int64) % 20
    columns = zip(
        table["msm_id"].to_pylist(),
        table["prb_id"].to_pylist(),
        (table["event_time"].cast(pa.int64()).to_numpy() // 1_000_000).tolist(),
        table["src_addr"].to_pylist(),
        table["dst_addr"].to_pylist(),
        table["ip_version"].to_pylist(),
    )
    for i, (msm, prb, ts, src, dst, af) in enumerate(columns):
        # Most IPv4 probes sit behind NAT: their local address is private, `from` is public.
        local = (
            f"192.168.{int(nat[i]) % 8}.{2 + int(nat[i]) // 8}" if af == 4 and nat[i] < 160 else src
        )
        head = (
            f'{{"fw":{FIRMWARE},"mver":"{MEASUREMENT_VERSION}","lts":{int(h[i] % np.uint64(90))},'
            f'"dst_name":"{dst}","af":{af},"dst_addr":"{dst}","src_addr":"{local}",'
            f'"proto":"ICMP",'
        )
        tail = (
            f'"msm_id":{msm},"prb_id":{prb},"timestamp":{ts},"msm_name":"Ping",'
            f'"from":"{src}","type":"ping","group_id":{msm},'
            f'"stored_timestamp":{ts + 30 + int(h[i] % np.uint64(300))}}}'
        )
        if rtt[i] < 0:
            result = ",".join(['{"x":"*"}'] * PACKETS)
            yield (
                f'{head}"size":48,"result":[{result}],"dup":0,"rcvd":0,"sent":{PACKETS},'
                f'"min":-1,"max":-1,"avg":-1,{tail}'
            )
            continue
        replies = [rtt[i]] + [round(rtt[i] + spread[i, j], 3) for j in range(PACKETS - 1)]
        replies = replies[: rcvd[i]]
        entries = [f'{{"rtt":{_num(r)}}}' for r in replies]
        order = [(lost_slot[i] + j) % PACKETS for j in range(PACKETS)]
        slots = ['{"x":"*"}'] * PACKETS
        for slot, entry in zip(order, entries):
            slots[slot] = entry
        yield (
            f'{head}"ttl":{int(ttl[i])},"size":48,"result":[{",".join(slots)}],"dup":0,'
            f'"rcvd":{int(rcvd[i])},"sent":{PACKETS},"min":{_num(rtt[i])},'
            f'"max":{_num(max(replies))},"avg":{_num(sum(replies) / len(replies))},'
            f"{tail}"
        )


_OTHER_TYPES = {
    "traceroute": '{{"fw":5080,"lts":20,"endtime":{t},"dst_name":"193.0.14.129","dst_addr":'
                  '"193.0.14.129","src_addr":"192.168.1.2","proto":"ICMP","af":4,"size":48,'
                  '"paris_id":1,"result":[{{"hop":1,"result":[{{"from":"192.168.1.1","ttl":64,'
                  '"size":76,"rtt":0.5}}]}},{{"hop":2,"result":[{{"x":"*"}}]}}],"msm_id":5001,'
                  '"prb_id":{prb},"timestamp":{t},"msm_name":"Traceroute","from":"{src}",'
                  '"type":"traceroute","group_id":5001}}',
    "dns": '{{"fw":5080,"lts":20,"dst_addr":"193.0.14.129","af":4,"proto":"UDP","result":'
           '{{"rt":12.3,"size":62,"abuf":"AAAA","ID":1,"ANCOUNT":1,"QDCOUNT":1,"NSCOUNT":0,'
           '"ARCOUNT":0}},"msm_id":10001,"prb_id":{prb},"timestamp":{t},"msm_name":"Tdig",'
           '"from":"{src}","type":"dns","group_id":10001,"src_addr":"192.168.1.2"}}',
}


def _as_firmware(record: dict, variant: int) -> dict:
    """One ping result as another firmware or a rarer case writes it (the same row)."""
    if variant == 0:  # 4610: no measurement version, no stored_timestamp
        record.update(fw=4610)
        record.pop("mver")
        record.pop("stored_timestamp")
    elif variant == 1:  # a probe that does not know whether its clock is in sync
        record.update(fw=4790, lts=-1)
        record.pop("mver")
    elif variant == 2 and record["rcvd"]:  # a late duplicate, slower than every reply
        record.update(fw=5020, mver="2.2.1", dup=1)
        record["result"].append({"rtt": round(record["max"] * 3 + 100.0, 3), "dup": 1})
    elif variant == 3 and {"x": "*"} in record["result"]:  # a send error instead of a timeout
        record["result"][record["result"].index({"x": "*"})] = {
            "error": "sendto failed: No route to host"}
    return record


def mixed_ripe_lines(table: pa.Table) -> Iterator[str]:
    """The rows of `table` as mixed firmware, with traceroute and DNS results between them."""
    h = _row_hash(table) if table.num_rows else np.zeros(0, np.uint64)
    for i, line in enumerate(ripe_lines(table)):
        variant = int(h[i] >> np.uint64(40)) % 6
        if variant < 4:
            line = json.dumps(_as_firmware(json.loads(line), variant), separators=(",", ":"))
        yield line
        record = None
        for k, template in enumerate(_OTHER_TYPES.values()):
            if int(h[i] >> np.uint64(8 * k)) % (7 + 4 * k) == 0:
                record = record or json.loads(line)
                yield template.format(t=record["timestamp"], prb=record["prb_id"],
                                      src=record["from"])


def write_ripe_json(table: pa.Table, path, *, mixed: bool = False) -> int:
    """Write `table` as RIPE Atlas JSON lines to `path` (`mixed`: as mixed_ripe_lines);
    returns the number of lines."""
    n = 0
    lines_of = mixed_ripe_lines if mixed else ripe_lines
    with open(Path(path), "w", encoding="utf-8") as f:
        for batch in table.to_batches(max_chunksize=100_000):
            lines = list(lines_of(pa.Table.from_batches([batch], schema=table.schema)))
            f.write("\n".join(lines) + "\n" if lines else "")
            n += len(lines)
    return n


def read_json_lines(path) -> list[dict]:
    """Parse a file of JSON lines (a check, not the importer)."""
    with open(Path(path), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
