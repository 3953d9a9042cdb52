"""The synthetic Internet (docs/data_rules.md §3): a seeded, vectorised world of ping rows.

The world (cities, ASes, prefixes, hosts, measurement streams) is built once from the seed;
rows are then drawn stream by stream with numpy. Everything a row depends on that the ground
truth API must recompute later (path stretch and route states, outages, dead targets) is a
hash of (seed, ids, time), so `noise_free_rtt_ms` and `fibre_floor_ms` work from addresses
alone. Per-ping noise (queueing, loss, the heavy tail) comes from a seeded generator.

Decisions (each one line of why):

- A "stream" for gap statistics is one source's time line across its measurements (what
  `records.rows_to_records` groups and the tokenizer's time deltas see): with 240 s intervals
  dominant, only that reading gives docs/data_rules.md's 60 s median gap. Gaps per
  (msm_id, probe) are the measurement intervals themselves (240 s dominant).
- Anycast services (the built-ins' targets) own one prefix whose city is `ANYCAST_CITY`; the
  instance that answers is the source's catchment, so floors and truths resolve it per source.
- The anchor mesh is a sample of partner anchors per anchor (not all ~970), else anchors'
  streams would have sub-second gaps and swamp the data.
- Local time is solar time (longitude / 15 h): good to within an hour almost everywhere.
- Event times are whole seconds so rows survive the RIPE JSON round trip exactly.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import ipaddress
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from pingllm.data import splitmix
from pingllm.data.schema import FAILED_RTT, ROW_SCHEMA

# ---------------------------------------------------------------- constants

ACCESS_NAMES = ("datacenter", "fibre", "cable", "dsl", "cellular", "satellite")
DATACENTER, FIBRE, CABLE, DSL, CELLULAR, SATELLITE = range(6)
ACCESS_DELAY_MS = np.array([0.5, 7.0, 12.0, 20.0, 35.0, 560.0])
# Spread of the stable per-line delay around the nominal one (lognormal sigma).
_ACCESS_SIGMA = np.array([0.35, 0.3, 0.25, 0.3, 0.3, 0.03])
# Mean per-packet queueing at one end in the quiet hours (ms).
_QUEUE_MS = np.array([0.03, 0.6, 2.0, 1.2, 9.0, 20.0])
_PACKET_LOSS = np.array([0.002, 0.004, 0.006, 0.006, 0.02, 0.03])

AS_KIND_NAMES = ("transit", "cloud", "residential", "mobile", "academic")
TRANSIT, CLOUD, RESIDENTIAL, MOBILE, ACADEMIC = range(5)

HOST_KIND_NAMES = ("probe", "anchor", "server", "anycast")
PROBE, ANCHOR, SERVER, ANYCAST = range(4)

ANYCAST_CITY = -2  # city of an anycast prefix: the answering instance depends on the source
UNKNOWN = -1

FIBRE_KM_PER_MS = 200.0
EARTH_RADIUS_KM = 6371.0
DEFAULT_START = "2025-03-03T00:00:00Z"
DAY_S = 86_400

# Real cities: name, lat, lon, metro population (thousands), region.
_CITIES = """\
London,51.51,-0.13,14000,EU|Paris,48.86,2.35,12000,EU|Moscow,55.76,37.62,12500,EU
Istanbul,41.01,28.98,15500,EU|Madrid,40.42,-3.70,6700,EU|Barcelona,41.39,2.17,5600,EU
Berlin,52.52,13.40,4500,EU|Rome,41.90,12.50,4300,EU|Milan,45.46,9.19,4300,EU
Athens,37.98,23.73,3200,EU|Kyiv,50.45,30.52,3000,EU|Saint Petersburg,59.93,30.34,5400,EU
Lisbon,38.72,-9.14,2900,EU|Manchester,53.48,-2.24,2800,EU|Birmingham,52.49,-1.89,2600,EU
Hamburg,53.55,9.99,2700,EU|Munich,48.14,11.58,2900,EU|Frankfurt,50.11,8.68,2300,EU
Cologne,50.94,6.96,2000,EU|Dusseldorf,51.23,6.78,1600,EU|Essen,51.46,7.01,2500,EU
Stuttgart,48.78,9.18,2700,EU|Vienna,48.21,16.37,2900,EU|Warsaw,52.23,21.01,3100,EU
Budapest,47.50,19.04,3000,EU|Bucharest,44.43,26.10,2300,EU|Prague,50.08,14.44,2700,EU
Amsterdam,52.37,4.90,2500,EU|Rotterdam,51.92,4.48,1800,EU|The Hague,52.07,4.30,1100,EU
Utrecht,52.09,5.12,900,EU|Eindhoven,51.44,5.47,750,EU|Brussels,50.85,4.35,2100,EU
Antwerp,51.22,4.40,1100,EU|Zurich,47.38,8.54,1400,EU|Geneva,46.20,6.14,1000,EU
Bern,46.95,7.45,420,EU|Basel,47.56,7.59,550,EU|Stockholm,59.33,18.07,2400,EU
Gothenburg,57.71,11.97,1000,EU|Oslo,59.91,10.75,1600,EU|Copenhagen,55.68,12.57,2100,EU
Helsinki,60.17,24.94,1500,EU|Dublin,53.35,-6.26,2000,EU|Edinburgh,55.95,-3.19,900,EU
Glasgow,55.86,-4.25,1800,EU|Leeds,53.80,-1.55,1900,EU|Bristol,51.45,-2.59,1000,EU
Lyon,45.76,4.84,2300,EU|Marseille,43.30,5.37,1900,EU|Toulouse,43.60,1.44,1400,EU
Bordeaux,44.84,-0.58,1300,EU|Lille,50.63,3.06,1500,EU|Nice,43.70,7.27,1000,EU
Nantes,47.22,-1.55,1000,EU|Strasbourg,48.57,7.75,800,EU|Naples,40.85,14.27,3100,EU
Turin,45.07,7.69,2200,EU|Florence,43.77,11.26,1500,EU|Bologna,44.49,11.34,1000,EU
Palermo,38.12,13.36,1200,EU|Seville,37.39,-5.98,1500,EU|Valencia,39.47,-0.38,2500,EU
Bilbao,43.26,-2.93,1000,EU|Porto,41.15,-8.61,1700,EU|Krakow,50.06,19.94,1500,EU
Wroclaw,51.11,17.04,1200,EU|Gdansk,54.35,18.65,1100,EU|Poznan,52.41,16.93,1000,EU
Katowice,50.26,19.02,2700,EU|Brno,49.20,16.61,700,EU|Bratislava,48.15,17.11,700,EU
Ljubljana,46.06,14.51,550,EU|Zagreb,45.81,15.98,1100,EU|Belgrade,44.79,20.45,1700,EU
Sofia,42.70,23.32,1700,EU|Thessaloniki,40.64,22.94,1100,EU|Riga,56.95,24.11,1000,EU
Vilnius,54.69,25.28,800,EU|Tallinn,59.44,24.75,600,EU|Minsk,53.90,27.57,2000,EU
Kharkiv,49.99,36.23,1400,EU|Odesa,46.48,30.72,1000,EU|Chisinau,47.01,28.86,700,EU
Novosibirsk,55.01,82.93,1600,EU|Yekaterinburg,56.84,60.61,1500,EU|Kazan,55.79,49.12,1300,EU
Nizhny Novgorod,56.33,44.00,1200,EU|Reykjavik,64.15,-21.94,240,EU|Luxembourg,49.61,6.13,650,EU
Valletta,35.90,14.51,400,EU|Nicosia,35.17,33.36,330,EU|Tbilisi,41.72,44.79,1200,EU
Yerevan,40.18,44.51,1100,EU|Baku,40.41,49.87,2300,EU|Aarhus,56.16,10.20,350,EU
Bergen,60.39,5.32,420,EU|Malmo,55.60,13.00,750,EU|Tampere,61.50,23.76,400,EU
Leipzig,51.34,12.37,1000,EU|Dresden,51.05,13.74,800,EU|Hanover,52.38,9.73,1200,EU
Nuremberg,49.45,11.08,1300,EU|Graz,47.07,15.44,650,EU|Linz,48.31,14.29,800,EU
Cork,51.90,-8.47,400,EU|Cardiff,51.48,-3.18,1100,EU|Belfast,54.60,-5.93,700,EU
Newcastle,54.98,-1.61,1100,EU|Groningen,53.22,6.57,360,EU|Ghent,51.05,3.72,600,EU
Liege,50.63,5.57,750,EU|Cluj-Napoca,46.77,23.60,420,EU|Skopje,42.00,21.43,600,EU
Sarajevo,43.86,18.41,550,EU|Tirana,41.33,19.82,900,EU|Timisoara,45.75,21.23,400,EU
Tel Aviv,32.09,34.78,4000,ME|Dubai,25.20,55.27,3500,ME|Riyadh,24.71,46.68,7500,ME
Tehran,35.69,51.39,9000,ME|Jeddah,21.49,39.19,4600,ME|Doha,25.29,51.53,2300,ME
Kuwait City,29.38,47.98,3000,ME|Amman,31.95,35.93,4000,ME|Beirut,33.89,35.50,2400,ME
Baghdad,33.31,44.36,7000,ME|Muscat,23.59,58.41,1500,ME|Ankara,39.93,32.86,5500,ME
Izmir,38.42,27.14,4300,ME|New York,40.71,-74.01,19000,NA|Los Angeles,34.05,-118.24,13000,NA
Chicago,41.88,-87.63,9500,NA|Dallas,32.78,-96.80,7600,NA|Houston,29.76,-95.37,7100,NA
Washington,38.91,-77.04,6300,NA|Miami,25.76,-80.19,6100,NA|Philadelphia,39.95,-75.17,6200,NA
Atlanta,33.75,-84.39,6100,NA|Boston,42.36,-71.06,4900,NA|Phoenix,33.45,-112.07,4900,NA
San Francisco,37.77,-122.42,4700,NA|San Jose,37.34,-121.89,2000,NA|Seattle,47.61,-122.33,4000,NA
Detroit,42.33,-83.05,4300,NA|Minneapolis,44.98,-93.27,3700,NA|San Diego,32.72,-117.16,3300,NA
Denver,39.74,-104.99,3000,NA|St. Louis,38.63,-90.20,2800,NA|Kansas City,39.10,-94.58,2200,NA
Salt Lake City,40.76,-111.89,1300,NA|Portland,45.52,-122.68,2500,NA|Las Vegas,36.17,-115.14,2300,NA
Charlotte,35.23,-80.84,2700,NA|Austin,30.27,-97.74,2400,NA|Ashburn,39.04,-77.49,300,NA
Toronto,43.65,-79.38,6400,NA|Montreal,45.50,-73.57,4300,NA|Vancouver,49.28,-123.12,2600,NA
Calgary,51.05,-114.07,1500,NA|Ottawa,45.42,-75.70,1400,NA|Mexico City,19.43,-99.13,22000,NA
Guadalajara,20.66,-103.35,5300,NA|Monterrey,25.69,-100.32,5300,NA|Honolulu,21.31,-157.86,1000,NA
Anchorage,61.22,-149.90,400,NA|Panama City,8.98,-79.52,1900,NA|San Juan,18.47,-66.11,2400,NA
Sao Paulo,-23.55,-46.63,22000,SA|Rio de Janeiro,-22.91,-43.17,13500,SA
Buenos Aires,-34.60,-58.38,15500,SA|Lima,-12.05,-77.04,11000,SA|Bogota,4.71,-74.07,11000,SA
Santiago,-33.45,-70.67,7000,SA|Caracas,10.48,-66.90,3000,SA|Belo Horizonte,-19.92,-43.94,6000,SA
Brasilia,-15.79,-47.88,4700,SA|Porto Alegre,-30.03,-51.23,4300,SA|Fortaleza,-3.73,-38.52,4100,SA
Medellin,6.24,-75.58,4000,SA|Quito,-0.18,-78.47,2000,SA|Montevideo,-34.90,-56.16,1800,SA
Asuncion,-25.26,-57.58,2300,SA|Tokyo,35.68,139.69,37000,AS|Osaka,34.69,135.50,19000,AS
Seoul,37.57,126.98,25000,AS|Beijing,39.90,116.41,21000,AS|Shanghai,31.23,121.47,27000,AS
Guangzhou,23.13,113.26,14000,AS|Shenzhen,22.54,114.06,13000,AS|Hong Kong,22.32,114.17,7500,AS
Taipei,25.03,121.57,7000,AS|Singapore,1.35,103.82,6000,AS|Kuala Lumpur,3.14,101.69,8400,AS
Jakarta,-6.21,106.85,34000,AS|Bangkok,13.76,100.50,17000,AS|Manila,14.60,120.98,14000,AS
Ho Chi Minh City,10.82,106.63,9000,AS|Hanoi,21.03,105.85,8000,AS|Mumbai,19.08,72.88,21000,AS
Delhi,28.61,77.21,32000,AS|Bangalore,12.97,77.59,13000,AS|Chennai,13.08,80.27,11500,AS
Hyderabad,17.39,78.49,10500,AS|Kolkata,22.57,88.36,15000,AS|Karachi,24.86,67.01,16500,AS
Lahore,31.55,74.34,13000,AS|Dhaka,23.81,90.41,22000,AS|Colombo,6.93,79.86,2400,AS
Kathmandu,27.72,85.32,1500,AS|Tashkent,41.30,69.24,2600,AS|Almaty,43.24,76.89,2000,AS
Ulaanbaatar,47.89,106.91,1600,AS|Busan,35.18,129.08,3400,AS|Fukuoka,33.59,130.40,2600,AS
Nagoya,35.18,136.91,9000,AS|Sapporo,43.06,141.35,2600,AS|Chengdu,30.57,104.07,16000,AS
Johannesburg,-26.20,28.05,10000,AF|Cape Town,-33.92,18.42,4700,AF|Durban,-29.86,31.02,3500,AF
Lagos,6.52,3.38,15000,AF|Cairo,30.04,31.24,22000,AF|Nairobi,-1.29,36.82,5000,AF
Casablanca,33.57,-7.59,4300,AF|Algiers,36.75,3.06,3500,AF|Tunis,36.81,10.18,2700,AF
Accra,5.60,-0.19,2500,AF|Addis Ababa,9.03,38.74,5000,AF|Dar es Salaam,-6.79,39.21,7000,AF
Kinshasa,-4.44,15.27,15000,AF|Dakar,14.72,-17.47,3300,AF|Kampala,0.35,32.58,3600,AF
Abidjan,5.36,-4.01,5600,AF|Port Louis,-20.16,57.50,150,AF|Kigali,-1.95,30.06,1200,AF
Sydney,-33.87,151.21,5300,OC|Melbourne,-37.81,144.96,5100,OC|Brisbane,-27.47,153.03,2600,OC
Perth,-31.95,115.86,2200,OC|Adelaide,-34.93,138.60,1400,OC|Auckland,-36.85,174.76,1700,OC
Wellington,-41.29,174.78,450,OC|Christchurch,-43.53,172.64,400,OC|Suva,-18.14,178.44,190,OC"""

REGIONS = ("EU", "ME", "NA", "SA", "AS", "AF", "OC")
# Share of RIPE Atlas probes (and of ASes) per region: weighted toward Europe.
_REGION_SHARE = np.array([0.56, 0.04, 0.19, 0.04, 0.09, 0.03, 0.05])
# The RIR /12 each region's IPv6 /32s come from (RIPE, RIPE, ARIN, LACNIC, APNIC, AFRINIC, APNIC).
_REGION_V6_BLOCK = np.array([0x2A00, 0x2A00, 0x2600, 0x2800, 0x2400, 0x2C00, 0x2400], np.uint64)
# Residential access mix per region: fibre, cable, DSL.
_RESIDENTIAL_MIX = {
    "EU": (0.38, 0.24, 0.38),
    "ME": (0.35, 0.1, 0.55),
    "NA": (0.3, 0.55, 0.15),
    "SA": (0.4, 0.3, 0.3),
    "AS": (0.7, 0.1, 0.2),
    "AF": (0.25, 0.15, 0.6),
    "OC": (0.4, 0.3, 0.3),
}


# Route detours between regions (x the stretch excess): direct cables across the North
# Atlantic, detours around continents to Asia and Africa, tromboning inside Africa.
_REGION_DETOUR = np.ones((len(REGIONS), len(REGIONS)))
for (_a, _b), _f in {
    ("EU", "NA"): 0.55,
    ("EU", "ME"): 1.2,
    ("EU", "AS"): 1.25,
    ("EU", "AF"): 1.3,
    ("EU", "SA"): 1.0,
    ("EU", "OC"): 0.85,
    ("NA", "AS"): 0.8,
    ("NA", "OC"): 0.8,
    ("AS", "AS"): 1.3,
    ("AF", "AF"): 1.6,
    ("SA", "SA"): 1.2,
    ("ME", "ME"): 1.3,
    ("AS", "OC"): 1.0,
    ("NA", "SA"): 0.9,
    ("ME", "AS"): 1.2,
}.items():
    _REGION_DETOUR[REGIONS.index(_a), REGIONS.index(_b)] = _f
    _REGION_DETOUR[REGIONS.index(_b), REGIONS.index(_a)] = _f


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Sizes and rates of the synthetic world; defaults are calibrated to docs/data_rules.md §3."""

    num_ases: int = 2000
    num_probes: int = 13_400
    num_anchors: int = 970
    num_servers: int = 3000
    num_anycast: int = 16
    as_kind_shares: tuple[float, ...] = (0.06, 0.04, 0.62, 0.10, 0.18)
    # Probe placement: residential, datacenter, academic, mobile, satellite.
    probe_kind_shares: tuple[float, ...] = (0.627, 0.2, 0.09, 0.08, 0.003)
    ipv6_probe_share: float = 0.76
    ipv6_server_share: float = 0.6
    congested_share: float = 0.10  # of access (residential, mobile) ASes
    anchor_mesh_partners: int = 3
    anchoring_same_region: float = 0.1
    builtin_two_services: float = 0.5
    user_msm_per_probe: float = 0.7
    user_ipv6_share: float = 0.4
    # Failures.
    dead_server_share: float = 0.07
    dead_probe_target_share: float = 0.15
    outage_per_hour: float = 0.004
    burst_loss: float = 0.006
    broken_ipv6_share: float = 0.04
    # Missing rows (probe disconnected): per 3-hour block, and single results.
    offline_per_block: float = 0.012
    missing_result: float = 0.01
    heavy_tail: float = 0.002


# ---------------------------------------------------------------- hashing (pure randomness)

_GOLDEN = np.uint64(splitmix.GOLDEN)
_mix64 = splitmix.mix64


def _hash(seed: int, salt: int, *keys) -> np.ndarray:
    """A uint64 hash of (seed, salt, keys...), broadcast over the keys."""
    with np.errstate(over="ignore"):
        h = _mix64(np.asarray(np.uint64(seed) * _GOLDEN + np.uint64(salt), np.uint64))
        for k in keys:
            k = np.asarray(k).astype(np.int64).astype(np.uint64)
            h = _mix64(h ^ (k + _GOLDEN))
    return h


_unit = splitmix.unit


def _normal(h: np.ndarray) -> np.ndarray:
    """uint64 hash -> standard normal (Box-Muller on the hash's two halves)."""
    u1 = ((h >> np.uint64(32)).astype(np.float64) + 0.5) / 2**32
    u2 = (h & np.uint64(0xFFFFFFFF)).astype(np.float64) / 2**32
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def _to_seconds(start_time) -> int:
    if isinstance(start_time, (int, np.integer)):
        return int(start_time)
    if isinstance(start_time, str):
        start_time = dt.datetime.fromisoformat(start_time)  # 3.11 reads a trailing Z
    if start_time.tzinfo is None:
        start_time = start_time.replace(tzinfo=dt.UTC)
    seconds = start_time.timestamp()
    if seconds != int(seconds):
        raise ValueError(f"start_time must be a whole second: {start_time}")
    return int(seconds)


# ---------------------------------------------------------------- world tables


@dataclasses.dataclass(frozen=True)
class Cities:
    name: tuple[str, ...]
    lat: np.ndarray  # float64[C] degrees
    lon: np.ndarray  # float64[C] degrees
    population_k: np.ndarray  # float64[C] metro population, thousands
    region: np.ndarray  # int8[C] index into REGIONS

    def index(self, name: str) -> int:
        return self.name.index(name)

    def distance_km(self, a, b) -> np.ndarray:
        """Great-circle distance between city indices a and b (broadcast)."""
        return _haversine_km(self.lat[a], self.lon[a], self.lat[b], self.lon[b])


def _haversine_km(lat1, lon1, lat2, lon2) -> np.ndarray:
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dphi, dlmb = p2 - p1, np.radians(np.asarray(lon2) - np.asarray(lon1))
    a = np.sin(dphi / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dlmb / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


@functools.cache
def cities() -> Cities:
    rows = [r.split(",") for line in _CITIES.splitlines() for r in line.split("|")]
    return Cities(
        name=tuple(r[0] for r in rows),
        lat=np.array([float(r[1]) for r in rows]),
        lon=np.array([float(r[2]) for r in rows]),
        population_k=np.array([float(r[3]) for r in rows]),
        region=np.array([REGIONS.index(r[4]) for r in rows], np.int8),
    )


@dataclasses.dataclass(frozen=True)
class Hosts:
    """Every address of the world that pings or is pinged."""

    kind: np.ndarray  # int8[H] PROBE / ANCHOR / SERVER / ANYCAST
    site: np.ndarray  # int32[H]
    as_index: np.ndarray  # int32[H]
    city: np.ndarray  # int32[H]; ANYCAST_CITY for anycast services
    access: np.ndarray  # int8[H]
    access_ms: np.ndarray  # float64[H] stable per-line access delay
    processing_ms: np.ndarray  # float64[H]
    prb_id: np.ndarray  # int64[H]; -1 for servers and anycast services
    v4: np.ndarray  # uint32[H]
    has_v6: np.ndarray  # bool[H]
    v6_hi: np.ndarray  # uint64[H] first 8 bytes
    v6_lo: np.ndarray  # uint64[H] last 8 bytes
    anycast_service: np.ndarray  # int32[H]; -1 unless ANYCAST

    def __len__(self) -> int:
        return len(self.kind)

    def addr_bytes(self, ip_version: int, hosts=None) -> np.ndarray:
        """uint8[N, 16] addresses of `hosts` (all when None) in one family."""
        idx = np.arange(len(self)) if hosts is None else np.asarray(hosts)
        out = np.zeros((len(idx), 16), np.uint8)
        if ip_version == 4:
            out[:, :4] = self.v4[idx].astype(">u4").view(np.uint8).reshape(-1, 4)
        else:
            out[:, :8] = self.v6_hi[idx].astype(">u8").view(np.uint8).reshape(-1, 8)
            out[:, 8:] = self.v6_lo[idx].astype(">u8").view(np.uint8).reshape(-1, 8)
        return out


@dataclasses.dataclass(frozen=True)
class Location:
    """What `SyntheticInternet.locate` knows about addresses (arrays of length N)."""

    host: np.ndarray  # int32; -1 when the address is not a host of this world
    site: np.ndarray  # int32; -1 when no prefix of this world holds it
    asn: np.ndarray  # int64; -1 unknown
    as_kind: np.ndarray  # int8; -1 unknown
    city: np.ndarray  # int32; ANYCAST_CITY for anycast, -1 unknown
    access: np.ndarray  # int8; -1 unless a known host
    anycast: np.ndarray  # bool


@dataclasses.dataclass(frozen=True)
class Streams:
    """Measurement streams (msm_id x source), sorted by source host."""

    src: np.ndarray  # int32[S] host
    dst: np.ndarray  # int32[S] host
    ip_version: np.ndarray  # int8[S]
    interval_s: np.ndarray  # int64[S]
    phase_s: np.ndarray  # int64[S] first ping, seconds after the start
    msm_id: np.ndarray  # int64[S]
    kind: np.ndarray  # int8[S] 0 builtin, 1 anchoring, 2 anchor mesh, 3 user-defined


STREAM_KIND_NAMES = ("builtin", "anchoring", "anchor_mesh", "user")


def _public_v4_slash16s() -> np.ndarray:
    """Every IPv4 /16 (as a<<8|b) whose addresses are all globally routable."""
    a, b = np.divmod(np.arange(1 << 16), 256)
    bad = (a == 0) | (a == 10) | (a == 127) | (a >= 224)
    bad |= (a == 100) & (b >= 64) & (b < 128)
    bad |= (a == 169) & (b == 254)
    bad |= (a == 172) & (b >= 16) & (b < 32)
    bad |= (a == 192) & np.isin(b, [0, 31, 52, 88, 168, 175])
    bad |= (a == 198) & np.isin(b, [18, 19, 51])
    bad |= (a == 203) & (b == 0)
    return np.flatnonzero(~bad).astype(np.uint32)


def _top_k(rng: np.random.Generator, weights: np.ndarray, k: int) -> np.ndarray:
    """k distinct indices drawn without replacement proportionally to weights (Gumbel top-k)."""
    keys = np.log(np.maximum(weights, 1e-300)) + rng.gumbel(size=len(weights))
    keys[weights <= 0] = -np.inf
    k = min(k, int((weights > 0).sum()))
    return np.argsort(-keys, kind="stable")[:k]


# ---------------------------------------------------------------- the world


class SyntheticInternet:
    """A seeded synthetic Internet: world tables, row generation and the ground truth."""

    def __init__(self, seed: int = 0, config: WorldConfig | None = None):
        self.seed = int(seed)
        self.config = config or WorldConfig()
        self.cities = cities()
        rng = np.random.default_rng([self.seed, 0])
        self._build_ases(rng)
        self._build_sites(rng)
        self._build_hosts(rng)
        self._build_catchments(rng)
        self._build_streams(rng)
        self._build_lookup()

    # ------------------------------------------------------------ construction

    def _build_ases(self, rng: np.random.Generator) -> None:
        cfg, c = self.config, self.cities
        n_city = len(c.name)
        dist = c.distance_km(np.arange(n_city)[:, None], np.arange(n_city)[None, :])
        self.city_distance_km = dist
        pop = c.population_k
        region_pop = np.zeros(len(REGIONS))
        np.add.at(region_pop, c.region, pop**0.8)
        self.city_weight = _REGION_SHARE[c.region] * pop**0.8 / region_pop[c.region]

        n_regular = cfg.num_ases
        kind = rng.choice(5, n_regular, p=np.asarray(cfg.as_kind_shares) / sum(cfg.as_kind_shares))
        home = rng.choice(n_city, n_regular, p=self.city_weight)
        presence = []
        for i in range(n_regular):
            k, h = kind[i], home[i]
            if k in (TRANSIT, CLOUD):
                count = int(rng.integers(5, 60 if k == TRANSIT else 30))
                w = pop * np.where(c.region == c.region[h], 3.0, 1.0)
            else:
                count = 1 + int(rng.poisson({RESIDENTIAL: 3, MOBILE: 6, ACADEMIC: 0.5}[k]))
                w = (c.region == c.region[h]) * pop**0.8 / (1.0 + dist[h] / 300.0)
            w = w.copy()
            w[h] = 0.0
            presence.append(np.concatenate([[h], _top_k(rng, w, count - 1)]))
        # Every city gets datacenters, residential and mobile networks.
        present = np.zeros((n_regular, n_city), bool)
        for i, p in enumerate(presence):
            present[i, p] = True
        for kinds in ((TRANSIT, CLOUD), (RESIDENTIAL,), (MOBILE,)):
            of_kind = np.isin(kind, kinds)
            for city in np.flatnonzero(~present[of_kind].any(axis=0)):
                same = np.flatnonzero(of_kind & (c.region[home] == c.region[city]))
                pick = int(rng.choice(same if len(same) else np.flatnonzero(of_kind)))
                presence[pick] = np.append(presence[pick], city)

        # Anycast services: cloud ASes whose one prefix is announced from many cities.
        n_any = cfg.num_anycast
        self.anycast_instances = [
            _top_k(rng, pop * np.where(c.region == 0, 2.0, 1.0), int(rng.integers(5, 40)))
            for _ in range(n_any)
        ]
        self.as_kind = np.concatenate([kind, np.full(n_any, CLOUD)]).astype(np.int8)
        self.as_home = np.concatenate([home, [inst[0] for inst in self.anycast_instances]])
        self.as_anycast = np.concatenate([np.zeros(n_regular, bool), np.ones(n_any, bool)])
        self.as_presence = presence + [np.array([ANYCAST_CITY]) for _ in range(n_any)]
        n_as = n_regular + n_any
        asn = rng.choice(np.arange(1000, 64_000), n_as, replace=False)
        self.asn = asn.astype(np.int64)
        access_as = np.isin(self.as_kind, (RESIDENTIAL, MOBILE))
        self.as_congested = access_as & (rng.random(n_as) < cfg.congested_share)
        self.as_congestion_ms = np.where(self.as_congested, rng.uniform(15, 45, n_as), 0.0)

    def _build_sites(self, rng: np.random.Generator) -> None:
        n_as = len(self.as_kind)
        site_as = np.concatenate([np.full(len(p), i) for i, p in enumerate(self.as_presence)])
        site_city = np.concatenate(self.as_presence)
        rank = np.concatenate([np.arange(len(p)) for p in self.as_presence])
        self.site_as = site_as.astype(np.int32)
        self.site_city = site_city.astype(np.int32)
        # IPv4: one public /16 per AS, a /24 per site (an odd multiplier makes it a bijection).
        slash16 = rng.choice(_public_v4_slash16s(), n_as, replace=False)
        as_mult = rng.integers(0, 128, n_as) * 2 + 1
        as_off = rng.integers(0, 256, n_as)
        third = (rank * as_mult[site_as] + as_off[site_as]) % 256
        self.site_v4 = ((slash16[site_as].astype(np.uint32) << 8) | third).astype(np.uint32)
        # IPv6: one /32 per AS from its region's RIR block, a /48 per site.
        region = self.cities.region[self.as_home]
        low20 = rng.choice(1 << 20, n_as, replace=False).astype(np.uint64)
        slash32 = (_REGION_V6_BLOCK[region] << np.uint64(16)) | low20
        as_mult6 = rng.integers(0, 1 << 15, n_as) * 2 + 1
        as_off6 = rng.integers(0, 1 << 16, n_as)
        word = ((rank * as_mult6[site_as] + as_off6[site_as]) % 65536).astype(np.uint64)
        self.site_v6 = (slash32[site_as] << np.uint64(16)) | word  # the /48 as 48 bits

    def _sites_by(self, kinds) -> dict[int, np.ndarray]:
        ok = np.isin(self.as_kind[self.site_as], kinds) & ~self.as_anycast[self.site_as]
        idx = np.flatnonzero(ok)
        return {int(ci): idx[self.site_city[idx] == ci] for ci in np.unique(self.site_city[idx])}

    def _build_hosts(self, rng: np.random.Generator) -> None:
        cfg, c = self.config, self.cities
        n_city = len(c.name)
        dc_sites = self._sites_by((TRANSIT, CLOUD))
        anchor_sites = self._sites_by((TRANSIT, CLOUD, ACADEMIC))
        groups = {
            "residential": self._sites_by((RESIDENTIAL,)),
            "datacenter": dc_sites,
            "academic": self._sites_by((ACADEMIC,)),
            "mobile": self._sites_by((MOBILE,)),
            "satellite": self._sites_by((RESIDENTIAL,)),
        }

        def place(city, table):
            # A city without such sites borrows the nearest city that has them.
            have = np.array(sorted(table))
            out = np.empty(len(city), np.int32)
            for i, ci in enumerate(city):
                ci = int(ci)
                if ci not in table:
                    ci = int(have[np.argmin(self.city_distance_km[ci, have])])
                out[i] = rng.choice(table[ci])
            return out

        kinds, sites, access = [], [], []
        # Anchors: datacenters (and a few campuses).
        a_city = rng.choice(n_city, cfg.num_anchors, p=self.city_weight)
        kinds.append(np.full(cfg.num_anchors, ANCHOR))
        sites.append(place(a_city, anchor_sites))
        access.append(np.full(cfg.num_anchors, DATACENTER))
        # Probes: placed by population, mostly at home.
        p_city = rng.choice(n_city, cfg.num_probes, p=self.city_weight)
        shares = np.asarray(cfg.probe_kind_shares) / sum(cfg.probe_kind_shares)
        p_group = rng.choice(len(groups), cfg.num_probes, p=shares)
        p_site = np.empty(cfg.num_probes, np.int32)
        p_access = np.empty(cfg.num_probes, np.int8)
        for g, (name, table) in enumerate(groups.items()):
            m = p_group == g
            p_site[m] = place(p_city[m], table)
            if name == "residential":
                region = c.region[p_city[m]]
                u = rng.random(m.sum())
                mix = np.array([_RESIDENTIAL_MIX[r] for r in REGIONS])[region]
                p_access[m] = np.where(
                    u < mix[:, 0], FIBRE, np.where(u < mix[:, 0] + mix[:, 1], CABLE, DSL)
                )
            else:
                p_access[m] = {
                    "datacenter": DATACENTER,
                    "academic": DATACENTER,
                    "mobile": CELLULAR,
                    "satellite": SATELLITE,
                }[name]
        kinds.append(np.full(cfg.num_probes, PROBE))
        sites.append(p_site)
        access.append(p_access)
        # Servers: user-defined targets in datacenters, placed by population.
        s_city = rng.choice(n_city, cfg.num_servers, p=c.population_k / c.population_k.sum())
        kinds.append(np.full(cfg.num_servers, SERVER))
        sites.append(place(s_city, dc_sites))
        access.append(np.full(cfg.num_servers, DATACENTER))
        # Anycast services: one host each on their AS's only site.
        any_as = np.flatnonzero(self.as_anycast)
        any_site = np.array([np.flatnonzero(self.site_as == a)[0] for a in any_as], np.int32)
        kinds.append(np.full(len(any_as), ANYCAST))
        sites.append(any_site)
        access.append(np.full(len(any_as), DATACENTER))

        kind = np.concatenate(kinds).astype(np.int8)
        site = np.concatenate(sites).astype(np.int32)
        acc = np.concatenate(access).astype(np.int8)
        n = len(kind)
        acc_ms = ACCESS_DELAY_MS[acc] * np.exp(_ACCESS_SIGMA[acc] * rng.standard_normal(n))
        processing = rng.uniform(0.02, 0.3, n)
        # RIPE Atlas numbers anchors' probes 6001-7999; ordinary probes anything else.
        n_prb = cfg.num_anchors + cfg.num_probes
        prb = np.full(n, -1, np.int64)
        prb[: cfg.num_anchors] = rng.choice(np.arange(6001, 8000), cfg.num_anchors, replace=False)
        probe_pool = np.setdiff1d(np.arange(1, 80_000), prb[: cfg.num_anchors])
        prb[cfg.num_anchors : n_prb] = rng.choice(probe_pool, cfg.num_probes, replace=False)

        # Addresses: slot j of a site is .{1 + (97 j + off) % 254} (97 is coprime with 254).
        order = np.argsort(site, kind="stable")
        slot = np.empty(n, np.int64)
        counts = np.bincount(site, minlength=len(self.site_as))
        if counts.max() > 254:
            raise ValueError(f"a site holds {counts.max()} hosts; more than a /24 allows")
        starts = np.cumsum(counts) - counts
        slot[order] = np.arange(n) - np.repeat(starts, counts)
        site_off = _hash(self.seed, 11, np.arange(len(self.site_as))) % np.uint64(254)
        last = 1 + (slot * 97 + site_off[site].astype(np.int64)) % 254
        v4 = (self.site_v4[site].astype(np.uint32) << 8) | last.astype(np.uint32)
        is_probe = kind == PROBE
        v6_share = np.where(is_probe, cfg.ipv6_probe_share, cfg.ipv6_server_share)
        has_v6 = (kind == ANCHOR) | (kind == ANYCAST) | (rng.random(n) < v6_share)
        # IPv6 interface ids: random (SLAAC privacy) for probes, small numbers for servers.
        subnet = np.where(is_probe, rng.integers(0, 1 << 16, n), 0).astype(np.uint64)
        iid_random = rng.integers(0, np.iinfo(np.int64).max, n).astype(np.uint64)
        v6_lo = np.where(is_probe, iid_random, slot.astype(np.uint64) + np.uint64(1))
        v6_hi = (self.site_v6[site] << np.uint64(16)) | subnet
        any_service = np.full(n, -1, np.int32)
        any_service[kind == ANYCAST] = np.arange(len(any_as))
        self.hosts = Hosts(
            kind=kind,
            site=site,
            as_index=self.site_as[site],
            city=self.site_city[site],
            access=acc,
            access_ms=acc_ms,
            processing_ms=processing,
            prb_id=prb,
            v4=v4,
            has_v6=has_v6,
            v6_hi=v6_hi.astype(np.uint64),
            v6_lo=v6_lo.astype(np.uint64),
            anycast_service=any_service,
        )

    def _build_catchments(self, rng: np.random.Generator) -> None:
        """catchment[service, city]: the instance city that answers a source in `city`."""
        n_city = len(self.cities.name)
        out = np.empty((len(self.anycast_instances), n_city), np.int32)
        for s, inst in enumerate(self.anycast_instances):
            # BGP picks by policy, not distance: mostly the nearest, sometimes a farther one.
            d = self.city_distance_km[:, inst] * (1 + 0.8 * rng.random((n_city, len(inst))) ** 4)
            out[s] = inst[np.argmin(d, axis=1)]
        self.catchment = out

    def _build_streams(self, rng: np.random.Generator) -> None:
        cfg, h = self.config, self.hosts
        anchors = np.flatnonzero(h.kind == ANCHOR)
        probes = np.flatnonzero(h.kind == PROBE)
        servers = np.flatnonzero(h.kind == SERVER)
        services = np.flatnonzero(h.kind == ANYCAST)
        region = self.cities.region
        src, dst, ver, interval, kind, msm = [], [], [], [], [], []

        def add(s, d, v, iv, k, m):
            s = np.asarray(s)
            src.append(s), dst.append(np.broadcast_to(d, s.shape))
            ver.append(np.broadcast_to(v, s.shape)), interval.append(np.broadcast_to(iv, s.shape))
            kind.append(np.full(s.shape, k)), msm.append(np.broadcast_to(m, s.shape))

        def both_families(s, d, k, m4, m6):
            add(s, d, 4, 240, k, m4)
            six = h.has_v6[s] & h.has_v6[d]
            add(s[six], d[six], 6, 240, k, m6[six])

        # Built-ins: every probe and anchor pings one or two anycast services.
        sources = np.concatenate([anchors, probes])
        for extra in (False, True):
            s = sources[rng.random(len(sources)) < cfg.builtin_two_services] if extra else sources
            svc = rng.integers(0, len(services), len(s))
            both_families(s, services[svc], 0, 1001 + svc, 2001 + svc)
        # Anchoring: each probe pings an anchor, often in its own region.
        same = rng.random(len(probes)) < cfg.anchoring_same_region
        a_region = region[h.city[anchors]]
        target = np.empty(len(probes), np.int64)
        for r in range(len(REGIONS)):
            pool = anchors[a_region == r]
            m = same & (region[h.city[probes]] == r)
            target[m] = rng.choice(pool if len(pool) else anchors, m.sum())
        target[~same] = rng.choice(anchors, (~same).sum())
        a_rank = np.searchsorted(anchors, target)
        both_families(probes, target, 1, 1_400_000 + 2 * a_rank, 1_400_001 + 2 * a_rank)
        # Anchor mesh: each anchor pings a few partner anchors.
        for _ in range(cfg.anchor_mesh_partners):
            partner = np.arange(len(anchors)) + rng.integers(1, len(anchors), len(anchors))
            partner %= len(anchors)
            both_families(
                anchors, anchors[partner], 2, 1_600_000 + 2 * partner, 1_600_001 + 2 * partner
            )
        # User-defined measurements: a target, a family, an interval, a handful of probes.
        n_user = int(cfg.user_msm_per_probe * len(probes) / 4)
        u_target = np.where(
            rng.random(n_user) < 0.7,
            rng.choice(servers, n_user),
            np.where(
                rng.random(n_user) < 0.5, rng.choice(anchors, n_user), rng.choice(probes, n_user)
            ),
        )
        u_v6 = (rng.random(n_user) < cfg.user_ipv6_share) & h.has_v6[u_target]
        u_interval = rng.choice(
            [60, 120, 240, 300, 600, 900, 1800, 3600],
            n_user,
            p=[0.08, 0.1, 0.3, 0.2, 0.1, 0.1, 0.07, 0.05],
        )
        u_msm = 5_000_000 + rng.choice(94_000_000, n_user, replace=False)
        picks = rng.poisson(cfg.user_msm_per_probe, len(probes))
        u_src = np.repeat(probes, picks)
        u_of = rng.integers(0, n_user, len(u_src))
        ok = (u_src != u_target[u_of]) & (~u_v6[u_of] | h.has_v6[u_src])
        u_src, u_of = u_src[ok], u_of[ok]
        add(u_src, u_target[u_of], np.where(u_v6[u_of], 6, 4), u_interval[u_of], 3, u_msm[u_of])

        src = np.concatenate(src)
        order = np.argsort(src, kind="stable")
        interval = np.concatenate(interval).astype(np.int64)[order]
        self.streams = Streams(
            src=src[order].astype(np.int32),
            dst=np.concatenate(dst)[order].astype(np.int32),
            ip_version=np.concatenate(ver)[order].astype(np.int8),
            interval_s=interval,
            phase_s=(rng.random(len(order)) * interval).astype(np.int64),
            msm_id=np.concatenate(msm)[order].astype(np.int64),
            kind=np.concatenate(kind)[order].astype(np.int8),
        )

    def _build_lookup(self) -> None:
        self._v4_keys, self._v4_sites = _sorted_keys(self.site_v4.astype(np.uint64))
        self._v6_keys, self._v6_sites = _sorted_keys(self.site_v6)
        h = self.hosts
        self._h4_keys, self._h4_hosts = _sorted_keys(h.v4.astype(np.uint64))
        v6_hosts = np.flatnonzero(h.has_v6)
        self._h6_keys, self._h6_hosts = _sorted_keys(
            _mix64(h.v6_hi[v6_hosts] ^ _mix64(h.v6_lo[v6_hosts])), v6_hosts
        )

    # ------------------------------------------------------------ addresses -> truth

    def locate(self, addr_bytes: np.ndarray, ip_version) -> Location:
        """The host, prefix, AS, city and access behind uint8[N, 16] addresses."""
        addr = np.asarray(addr_bytes, np.uint8).reshape(-1, 16)
        ver = np.broadcast_to(np.asarray(ip_version), (len(addr),))
        be = addr.astype(np.uint64)
        hi = np.zeros(len(addr), np.uint64)
        lo = np.zeros(len(addr), np.uint64)
        for i in range(8):
            hi = (hi << np.uint64(8)) | be[:, i]
            lo = (lo << np.uint64(8)) | be[:, 8 + i]
        v4 = hi >> np.uint64(32)
        is4 = ver == 4
        site = np.where(
            is4,
            _lookup(self._v4_keys, self._v4_sites, v4 >> np.uint64(8)),
            _lookup(self._v6_keys, self._v6_sites, hi >> np.uint64(16)),
        )
        host = np.where(
            is4,
            _lookup(self._h4_keys, self._h4_hosts, v4),
            _lookup(self._h6_keys, self._h6_hosts, _mix64(hi ^ _mix64(lo))),
        )
        # The 64-bit key of an IPv6 host is a hash: confirm the whole address.
        h = self.hosts
        hc = np.maximum(host, 0)
        exact = np.where(
            is4, h.v4[hc] == v4, h.has_v6[hc] & (h.v6_hi[hc] == hi) & (h.v6_lo[hc] == lo)
        )
        host = np.where((host >= 0) & exact & (site >= 0), host, UNKNOWN).astype(np.int32)
        known = site >= 0
        sc = np.maximum(site, 0)
        as_i = self.site_as[sc]
        return Location(
            host=host,
            site=site.astype(np.int32),
            asn=np.where(known, self.asn[as_i], UNKNOWN),
            as_kind=np.where(known, self.as_kind[as_i], UNKNOWN).astype(np.int8),
            city=np.where(known, self.site_city[sc], UNKNOWN).astype(np.int32),
            access=np.where(host >= 0, h.access[np.maximum(host, 0)], UNKNOWN).astype(np.int8),
            anycast=known & self.as_anycast[as_i],
        )

    def _hosts_of(self, addr_bytes, ip_version) -> np.ndarray:
        return self.locate(addr_bytes, ip_version).host

    def _answering_city(self, src_host: np.ndarray, dst_host: np.ndarray) -> np.ndarray:
        """Destination city, with anycast resolved to the source's catchment instance."""
        h = self.hosts
        svc = h.anycast_service[dst_host]
        src_city = h.city[src_host]
        resolved = self.catchment[np.maximum(svc, 0), np.maximum(src_city, 0)]
        return np.where(svc >= 0, resolved, h.city[dst_host])

    def _noise_free(self, src, dst, ver, t_s) -> tuple[np.ndarray, np.ndarray]:
        """(noise-free RTT ms, great-circle km) for host pairs at Unix seconds t_s (or None)."""
        h = self.hosts
        s_city, d_city = h.city[src], self._answering_city(src, dst)
        km = self.city_distance_km[s_city, d_city]
        stretch, extra_km = self._path(h.as_index[src], h.as_index[dst], s_city, d_city, ver, t_s)
        prop_ms = 2.0 * (km * stretch + extra_km) / FIBRE_KM_PER_MS
        rtt = prop_ms + h.access_ms[src] + h.access_ms[dst] + h.processing_ms[src]
        return rtt + h.processing_ms[dst], km

    def _path(self, as_a, as_b, city_a, city_b, ver, t_s) -> tuple[np.ndarray, np.ndarray]:
        """Path stretch (>= 1) and extra metro km of the route between two sites at t_s."""
        lo_as, hi_as = np.minimum(as_a, as_b), np.maximum(as_a, as_b)
        lo_c, hi_c = np.minimum(city_a, city_b), np.maximum(city_a, city_b)
        km = self.city_distance_km[city_a, city_b]
        pair = _hash(self.seed, 21, lo_as, hi_as, ver)
        # Detours matter most on short paths (a route via another city's exchange).
        region = self.cities.region
        excess = np.exp(np.log(0.78) + 0.25 * _normal(pair)) * (1.0 + 250.0 / (km + 150.0))
        excess *= _REGION_DETOUR[region[city_a], region[city_b]]
        excess *= 0.85 + 0.3 * _unit(_hash(self.seed, 22, lo_c, hi_c))
        extra_km = 40.0 + 260.0 * _unit(_hash(self.seed, 23, lo_as, hi_as, lo_c, hi_c))
        if t_s is not None:
            # Route changes: every few days a pair may switch to a longer backup path.
            epoch_s = (1.0 + 5.0 * _unit(_hash(self.seed, 24, lo_as, hi_as))) * DAY_S
            offset = _unit(_hash(self.seed, 25, lo_as, hi_as)) * epoch_s
            epoch = np.floor((np.asarray(t_s) + offset) / epoch_s)
            state = _hash(self.seed, 26, lo_as, hi_as, ver, epoch)
            alt = _unit(state) < 0.25
            grow = 0.1 + 0.4 * _unit(_mix64(state))
            excess = np.where(alt, excess * (1.0 + grow) + 0.1, excess)
            extra_km = np.where(alt, extra_km + 300.0 * grow, extra_km)
        return 1.0 + excess, extra_km

    def noise_free_rtt_ms(self, src_bytes, dst_bytes, ip_version, event_time=None) -> np.ndarray:
        """The true latency without queueing or tail: path x stretch + access + processing.

        `event_time` (Unix seconds, or datetime64) selects the route state; None gives the
        primary route. NaN where an address is not a host of this world.
        """
        src = self._hosts_of(src_bytes, ip_version)
        dst = self._hosts_of(dst_bytes, ip_version)
        ver = np.broadcast_to(np.asarray(ip_version), src.shape)
        t_s = None if event_time is None else _seconds_array(event_time)
        rtt, _ = self._noise_free(np.maximum(src, 0), np.maximum(dst, 0), ver, t_s)
        return np.where((src >= 0) & (dst >= 0), rtt, np.nan)

    def fibre_floor_ms(self, src_bytes, dst_bytes, ip_version) -> np.ndarray:
        """2 x great-circle distance / (200 km/ms) between the endpoints; NaN if unknown."""
        src = self._hosts_of(src_bytes, ip_version)
        dst = self._hosts_of(dst_bytes, ip_version)
        s, d = np.maximum(src, 0), np.maximum(dst, 0)
        km = self.city_distance_km[self.hosts.city[s], self._answering_city(s, d)]
        return np.where((src >= 0) & (dst >= 0), 2.0 * km / FIBRE_KM_PER_MS, np.nan)

    def local_hour(self, city, t_s) -> np.ndarray:
        """Solar local hour [0, 24) in `city` at Unix seconds t_s."""
        return np.mod(np.asarray(t_s) / 3600.0 + self.cities.lon[city] / 15.0, 24.0)

    # ------------------------------------------------------------ rows

    @functools.cached_property
    def _address_text(self) -> dict[int, pa.Array]:
        h = self.hosts
        v4 = [str(ipaddress.IPv4Address(int(a))) for a in h.v4]
        v6 = [
            str(ipaddress.IPv6Address((int(a) << 64) | int(b))) if ok else ""
            for a, b, ok in zip(h.v6_hi, h.v6_lo, h.has_v6)
        ]
        return {4: pa.array(v4, pa.string()), 6: pa.array(v6, pa.string())}

    def source_rate_per_s(self) -> np.ndarray:
        """Expected pings per second of each host as a source."""
        s = self.streams
        return np.bincount(s.src, weights=1.0 / s.interval_s, minlength=len(self.hosts))

    def generate(self, rows: int, start_time=DEFAULT_START, duration_s: int = DAY_S) -> pa.Table:
        """Exactly `rows` ROW_SCHEMA rows; each chunk sorted by time (see `iter_tables`)."""
        tables = list(self.iter_tables(rows, start_time, duration_s))
        return pa.concat_tables(tables) if tables else ROW_SCHEMA.empty_table()

    def iter_tables(
        self,
        rows: int,
        start_time=DEFAULT_START,
        duration_s: int = DAY_S,
        chunk_rows: int = 2_000_000,
    ) -> Iterator[pa.Table]:
        """`rows` rows in chunks of whole sources over [start, start + duration).

        Sources join in a seeded order until the rows are reached; the duration grows when
        every source together pings too rarely. Each chunk is sorted by (time, source, msm).
        """
        start = _to_seconds(start_time)
        rate = self.source_rate_per_s()
        order = self._source_order(rate > 0)
        # Rows are lost to offline probes and missing results: aim a little high.
        keep = (1 - self.config.missing_result) * (1 - 1.5 * self.config.offline_per_block)
        duration_s = int(max(duration_s, np.ceil(rows / (rate.sum() * keep * 0.97))))
        expected = np.concatenate([[0.0], np.cumsum(rate[order] * duration_s * keep)])
        done, chunk_index, lo = 0, 0, 0
        while done < rows and lo < len(order):
            want = min(rows - done, chunk_rows)
            hi = int(np.searchsorted(expected, expected[lo] + want * 1.02, side="left"))
            hi = min(max(hi, lo + 1), len(order))
            table = self._rows_for_sources(
                order[lo:hi], start, duration_s, chunk_index, limit=rows - done
            )
            done += len(table)
            lo, chunk_index = hi, chunk_index + 1
            if len(table):
                yield table
        if done < rows:
            raise RuntimeError(f"world yields only {done} rows of {rows}; raise duration_s")

    def _source_order(self, is_source: np.ndarray) -> np.ndarray:
        """Sources in a seeded order whose every prefix holds each kind of source in proportion.

        Stratified by (host kind, access, IPv6): a 1M-row sample has only ~1,000 sources, and
        a plain shuffle would let the few satellite probes swing the upper percentiles.
        """
        h = self.hosts
        rng = np.random.default_rng([self.seed, 1])
        sources = rng.permutation(np.flatnonzero(is_source))
        stratum = (h.kind[sources].astype(np.int64) * 8 + h.access[sources]) * 2
        stratum += h.has_v6[sources]
        _, inverse, counts = np.unique(stratum, return_inverse=True, return_counts=True)
        rank = np.empty(len(sources), np.int64)
        for g in range(len(counts)):
            rank[inverse == g] = np.arange(counts[g])
        key = (rank + rng.random(len(sources))) / counts[inverse]
        return sources[np.argsort(key, kind="stable")]

    def _rows_for_sources(self, sources, start, duration_s, chunk_index, limit) -> pa.Table:
        """Every row of `sources`' streams, cut to the first `limit` in (source order, time)."""
        cfg, h, st = self.config, self.hosts, self.streams
        rng = np.random.default_rng([self.seed, 2, chunk_index])
        lo = np.searchsorted(st.src, sources, side="left")
        hi = np.searchsorted(st.src, sources, side="right")
        sid = np.concatenate([np.arange(a, b) for a, b in zip(lo, hi)]).astype(np.int64)
        rank = np.repeat(np.arange(len(sources)), hi - lo)
        count = np.maximum(0, -(-(duration_s - st.phase_s[sid]) // st.interval_s[sid]))
        stream, rank = np.repeat(sid, count), np.repeat(rank, count)
        k = np.arange(len(stream)) - np.repeat(np.cumsum(count) - count, count)
        jitter = rng.integers(0, 3, len(stream))
        t_rel = st.phase_s[stream] + k * st.interval_s[stream] + jitter
        src = st.src[stream]
        # Rows that never exist: the probe was offline, or a single result never arrived.
        block = (start + t_rel) // 10_800
        offline = _unit(_hash(self.seed, 31, src, block)) < cfg.offline_per_block
        keep = (t_rel < duration_s) & ~offline & (rng.random(len(stream)) >= cfg.missing_result)
        stream, rank, t_s = stream[keep], rank[keep], start + t_rel[keep]
        if len(stream) > limit:
            first = np.lexsort((t_s, rank))[:limit]
            stream, t_s = stream[first], t_s[first]
        src, dst, ver, msm = (
            st.src[stream],
            st.dst[stream],
            st.ip_version[stream],
            st.msm_id[stream],
        )
        rtt, failed = self._sample_rtt(src, dst, ver, t_s, rng)
        rtt = np.where(failed, FAILED_RTT, rtt).astype(np.float32)

        order = np.lexsort((msm, src, t_s))
        src, dst, ver = src[order], dst[order], ver[order]
        return pa.table(
            [
                pa.array(msm[order], pa.int64()),
                pa.array(h.prb_id[src], pa.int64()),
                pa.array(t_s[order] * 1_000_000, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
                _address_column(self._address_text, src, ver),
                _address_column(self._address_text, dst, ver),
                pa.array(ver, pa.int8()),
                pa.array(rtt[order], pa.float32()),
            ],
            schema=ROW_SCHEMA,
        )

    def _sample_rtt(self, src, dst, ver, t_s, rng) -> tuple[np.ndarray, np.ndarray]:
        """Observed RTT (min over 3 packets) and the failure flag of each ping."""
        cfg, h = self.config, self.hosts
        n = len(src)
        base, _ = self._noise_free(src, dst, ver, t_s)
        d_city = self._answering_city(src, dst)
        q_src, cong_src = self._queue_ms(src, h.city[src], t_s)
        q_dst, cong_dst = self._queue_ms(dst, d_city, t_s)
        q_path = 0.1 + 0.01 * (base - h.access_ms[src] - h.access_ms[dst])
        shape = (n, 3)
        noise = rng.exponential(1.0, shape) * q_src[:, None]
        noise += rng.exponential(1.0, shape) * q_dst[:, None]
        noise += rng.exponential(1.0, shape) * q_path[:, None]
        p_loss = np.maximum(_PACKET_LOSS[h.access[src]], _PACKET_LOSS[h.access[dst]])
        p_loss = p_loss + 0.05 * np.maximum(cong_src, cong_dst)
        lost = rng.random(shape) < p_loss[:, None]
        noise = np.where(lost, np.inf, noise)
        rtt = base + noise.min(axis=1)
        # The rare heavy tail: every packet of the ping delayed (bufferbloat, a rerouted burst).
        tail = rng.random(n) < cfg.heavy_tail
        rtt = np.where(tail, rtt + np.exp(np.log(1200.0) + 0.9 * rng.standard_normal(n)), rtt)

        failed = lost.all(axis=1)
        failed |= (
            rng.random(n)
            < cfg.burst_loss * np.where(np.isin(h.access[src], (CELLULAR, SATELLITE)), 3.0, 1.0)
            + 0.03 * cong_src
        )
        failed |= self._outage(src, t_s) | self._outage(dst, t_s) | self._dead(dst, t_s)
        broken6 = (ver == 6) & (_unit(_hash(self.seed, 41, src)) < cfg.broken_ipv6_share)
        failed |= broken6 & (rng.random(n) < 0.5)
        return rtt, failed

    def _queue_ms(self, host, city, t_s) -> tuple[np.ndarray, np.ndarray]:
        """Mean per-packet queueing at one end, and its evening congestion level in [0, 1]."""
        h = self.hosts
        hour = self.local_hour(city, t_s)
        # Busy hours peak in the evening; circular distance from 20:30 local.
        from_peak = np.abs(np.mod(hour - 20.5 + 12.0, 24.0) - 12.0)
        diurnal = 0.5 + np.exp(-0.5 * (from_peak / 3.5) ** 2)
        evening = np.clip(2.0 - from_peak, 0.0, 1.0)  # 1 within 19:30-21:30 +-1 h ramps
        congestion = self.as_congestion_ms[h.as_index[host]] * evening
        return _QUEUE_MS[h.access[host]] * diurnal + congestion, evening * (congestion > 0)

    def _outage(self, host, t_s) -> np.ndarray:
        """Hour-long network outages at one end."""
        return (
            _unit(_hash(self.seed, 42, host, np.asarray(t_s) // 3600)) < self.config.outage_per_hour
        )

    def _dead(self, host, t_s) -> np.ndarray:
        """Targets that stopped answering for a 30-day window (decommissioned, firewalled)."""
        cfg, h = self.config, self.hosts
        share = np.select(
            [h.kind[host] == SERVER, h.kind[host] == PROBE],
            [cfg.dead_server_share, cfg.dead_probe_target_share],
            0.003,
        )
        window = (
            np.asarray(t_s) + (_hash(self.seed, 43, host) % np.uint64(30 * DAY_S)).astype(np.int64)
        ) // (30 * DAY_S)
        return _unit(_hash(self.seed, 44, host, window)) < share


# ---------------------------------------------------------------- helpers


def _sorted_keys(keys: np.ndarray, values=None) -> tuple[np.ndarray, np.ndarray]:
    values = np.arange(len(keys)) if values is None else np.asarray(values)
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    if len(keys) > 1 and (keys[1:] == keys[:-1]).any():
        raise ValueError("duplicate prefix or address in the synthetic world")
    return keys, values[order]


def _lookup(keys: np.ndarray, values: np.ndarray, query: np.ndarray) -> np.ndarray:
    i = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
    return np.where(keys[i] == query, values[i], UNKNOWN)


def _seconds_array(event_time) -> np.ndarray:
    t = np.asarray(event_time)
    if np.issubdtype(t.dtype, np.datetime64):
        return t.astype("datetime64[s]").astype(np.int64)
    return t.astype(np.int64)


def _address_column(text: dict[int, pa.Array], hosts: np.ndarray, ver: np.ndarray) -> pa.Array:
    """Address text of each host in its row's family."""
    both = pa.concat_arrays([text[4], text[6]])
    return both.take(pa.array(hosts.astype(np.int64) + (ver == 6) * len(text[4])))
