"""Training throughput and time to first step: pingllm vs the MaxText peer, same CPU, alternating.

    .venv/bin/python benchmarks/bench_vs_maxtext.py                 # both sizes, 2 rounds each
    .venv/bin/python benchmarks/bench_vs_maxtext.py --sizes 1 --rounds 3

Needs the peer installed once: /work/shared/peers/maxtext/setup_peer.sh (PY312=<python3.12>).
pingllm runs its CPU configuration: scanned layers with the scan fully unrolled
(ModelConfig.scan_unroll = num_layers; `--pingllm_binding ModelConfig.scan_unroll=1` for the
plain loop). MaxText runs the peer's own config (scan_layers true, remat minimal_with_context).
Each round runs, for each size: pingllm fresh, MaxText fresh (run_peer.sh, FRESH=1), pingllm
resumed, MaxText resumed, so slow drift in the machine's load hits both alike. Both are
launched by this script and measured the same way:

* fresh run: a new run directory and an emptied persistent compilation cache on both sides
  (pingllm's default <base_output_directory>/.jax_cache, its executable cache of serialized
  start-up programs, .jax_cache/executables, with it; MaxText's jax_cache_dir, which its
  decoupled config leaves "", set to a directory of its own, with the same zero thresholds
  through JAX's environment variables, so that MaxText caches its small programs too).
  --no_cache runs both without a cache (pingllm ENABLE_COMPILATION_CACHE=False).
* resumed runs: the same command again with RESUME_STEPS more steps, twice ("resume", then
  "resume2"): each restores its own last checkpoint, with the compilation cache the earlier
  starts filled (MaxText resumes by itself, with learning_rate_schedule_steps fixed so that
  its train step does not change with `steps`: with its default, every start compiled a new
  train step and missed its cache).
* time to first step (TTFS): wall clock from launching the interpreter to the log line of the
  first completed step (absl timestamps: pingllm's "time to first step", MaxText's first
  "completed step: N").
* step tokens/s: median over steady-state steps (excluding the first two) of each one's own
  per-step figure: MaxText's "Tokens/s/device" (measured between dispatches), pingllm's
  steps/s of LOG_PERIOD=1 windows (dispatch to dispatch, including fetching the next batch
  through the real tokenizing pipeline, so pingllm's figure carries work MaxText's does not).
* span tokens/s: (last step - step 2) x tokens per step / (log time of last - log time of step 2),
  checkpoint saves and everything else included: the end-to-end figure.
* pingllm step-only: the same jitted train step timed alone (no data pipeline, no checkpoints,
  no logging) in a separate process, on one fixed batch.
* CPU: the run's own CPU seconds (process tree, from /proc) and the other processes' CPU over
  the run (/proc/stat busy jiffies minus the run's), in cores; ratios from runs with high
  "other" load mean less.
* FLOP/s: model FLOPs per token (pingllm.model.flops_per_token: 6 N + attention, the same shape
  for both) x tokens/s, as a fraction of a 1024^3 float32 matmul's FLOP/s measured in this
  invocation (pingllm.metrics.measured_matmul_flops); a bfloat16 matmul is measured beside it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import statistics as st
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER = "/work/shared/peers/maxtext"
PY = sys.executable

SIZES = {
    1: dict(emb=128, layers=2, heads=4, head_dim=32, mlp=512, seq=256, batch=4, steps=30),
    2: dict(emb=256, layers=4, heads=4, head_dim=64, mlp=1024, seq=512, batch=4, steps=20),
}
CHECKPOINT_PERIOD = 10
DROPOUT = 0.1  # MaxText peer: latency_peer.yml dropout_rate 0.1 (enable_dropout true)
RESUME_STEPS = 10  # steps a resumed run adds
SCHEDULE_STEPS = 1000  # MaxText's learning_rate_schedule_steps (gin/quickstart.gin's length)
SKIP = 2  # leading steps left out of steady state (compile / async warm-up), as summarize_log.py

ABSL = re.compile(r"^I(\d{4}) (\d\d:\d\d:\d\d\.\d+)")
PING_FIRST = re.compile(r"time to first step ([\d.]+)s \(data ([\d.]+)s, restore ([\d.]+)s, "
                        r"first batch ([\d.]+)s, compile ([\d.]+)s\)")
PING_STEP = re.compile(r"step (\d+)/\d+ .*\| ([\d.]+) steps/s")
PEER_STEP = re.compile(r"completed step: (\d+), seconds: ([\d.]+), TFLOP/s/device: ([\d.]+), "
                       r"Tokens/s/device: ([\d.]+)")


def log_time(line: str, year: int) -> float | None:
    m = ABSL.match(line)
    if not m:
        return None
    stamp = dt.datetime.strptime(f"{year}{m.group(1)} {m.group(2)}", "%Y%m%d %H:%M:%S.%f")
    return stamp.timestamp()  # local time, as absl writes it


def busy_jiffies() -> int:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return v[0] + v[1] + v[2] + v[5] + v[6] + v[7]  # user nice system irq softirq steal


def tree_cpu(root: int, seen: dict[int, float]) -> float:
    """CPU seconds of `root` and its descendants (max seen per pid, so exited children count)."""
    hz = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    stats = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(name)
        children.setdefault(int(fields[1]), []).append(pid)
        stats[pid] = (int(fields[11]) + int(fields[12])) / hz
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            seen[pid] = max(seen.get(pid, 0.0), stats[pid])
        todo.extend(children.get(pid, []))
    return sum(seen.values())


def peer_log(wrapper_log: str) -> str | None:
    """MaxText's own log file, named by run_peer.sh's first output line ('log: PATH')."""
    with open(wrapper_log, errors="replace") as f:
        m = re.search(r"^log: (\S+)", f.read(), re.M)
    return m.group(1) if m else None


def run_measured(cmd, log_path, env, first_step_marker, watch=lambda p: p) -> dict:
    """Launches cmd (stdout+stderr to log_path); wall, own CPU, others' CPU, CPU at first step.

    `watch(log_path)` names the file whose lines mark the first step (None: not yet known).
    """
    b0, t0 = busy_jiffies(), time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    seen: dict[int, float] = {}
    cpu_at_first, pos = None, 0
    while proc.poll() is None:
        cpu = tree_cpu(proc.pid, seen)
        watched = watch(log_path)
        if cpu_at_first is None and watched and os.path.exists(watched):
            with open(watched, errors="replace") as f:
                f.seek(pos)
                chunk = f.read()
            if first_step_marker.search(chunk):
                cpu_at_first = cpu
            else:
                pos += max(0, len(chunk.encode()) - 400)  # rescan a little: lines may be partial
        time.sleep(0.1)
    t1, b1 = time.time(), busy_jiffies()
    own = sum(seen.values())
    total = (b1 - b0) / os.sysconf("SC_CLK_TCK")
    return dict(rc=proc.returncode, t0=t0, wall=t1 - t0, cpu=own, cpu_at_first_step=cpu_at_first,
                other_cores=max(0.0, total - own) / (t1 - t0), ncpu=os.cpu_count())


def steady(values):
    return values[SKIP:] or values


def span_tokens_per_s(steps: list[tuple[int, float]], tokens: int) -> float | None:
    """(step, log time) pairs -> tokens/s from step SKIP to the last, everything included."""
    s = [x for x in steps if x[0] >= SKIP]
    if len(s) < 2 or s[-1][1] <= s[0][1]:
        return None
    return (s[-1][0] - s[0][0]) * tokens / (s[-1][1] - s[0][1])


def _model_bindings(size: dict) -> list[str]:
    """The model shape both pingllm runs use; MaxText's plain model, objective and windows
    (none of the quickstart's slot embedding, result weighting, smoothed RTT target or window
    augmentations)."""
    return [
        f"ModelConfig.num_layers={size['layers']}", f"ModelConfig.emb_dim={size['emb']}",
        f"ModelConfig.num_heads={size['heads']}", f"ModelConfig.head_dim={size['head_dim']}",
        f"ModelConfig.mlp_dim={size['mlp']}", f"ModelConfig.dropout_rate={DROPOUT}",
        'ModelConfig.dtype="bfloat16"', f"ModelConfig.scan_unroll={size['layers']}",
        "OptimizerConfig.novel_result_weight=1.0", "OptimizerConfig.rtt_label_sigma=0.0",
        "ModelConfig.field_slot_embedding=False",
        "DataConfig.dedupe_rate=0.0", "DataConfig.anonymise_source_rate=0.0",
        f"MAX_TARGET_LENGTH={size['seq']}",
    ]


def _env_without_cache_settings() -> dict:
    """This process's environment minus JAX cache variables (a test suite's, say)."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}


def run_pingllm(size: dict, args, tag: str, resume: int = 0) -> dict:
    tokens = size["batch"] * size["seq"]
    out = os.path.join(args.out, "pingllm")
    steps = size["steps"] + resume * RESUME_STEPS
    bindings = [
        *_model_bindings(size),
        f"GLOBAL_BATCH_SIZE={size['batch']}", f"STEPS={steps}", "LOG_PERIOD=1",
        f"CHECKPOINT_PERIOD={CHECKPOINT_PERIOD}", "EVAL_INTERVAL=0",
        f'BASE_OUTPUT_DIRECTORY="{out}"', f'DATASET_PATH="{args.dataset_path}"',
        f'RUN_NAME="{tag}"', "DataConfig.synthetic_rows=100000", *args.pingllm_binding,
    ]
    if args.no_cache:
        bindings.append("ENABLE_COMPILATION_CACHE=False")
    if not resume:  # a new run directory and an empty cache (the default one, in `out`)
        subprocess.run(["rm", "-rf", os.path.join(out, tag), os.path.join(out, ".jax_cache")],
                       check=True)
    cmd = [PY, "-m", "pingllm.main", "--gin_file=gin/quickstart.gin"]
    cmd += [f"--gin_bindings={b}" for b in bindings]
    log_path = os.path.join(args.out, "logs", f"{tag}{f'_resume{resume}' if resume else ''}.log")
    m = run_measured(cmd, log_path, _env_without_cache_settings(),
                     re.compile(r"time to first step"))
    year = dt.datetime.fromtimestamp(m["t0"]).year
    steps, rates, first = [], [], None
    for line in open(log_path, errors="replace"):
        ts = log_time(line, year)
        if (f := PING_FIRST.search(line)) and ts:
            first = dict(ttfs=ts - m["t0"], own_ttfs=float(f[1]), data=float(f[2]),
                         restore=float(f[3]), first_batch=float(f[4]), compile=float(f[5]))
            steps.append((1, ts))
        elif (s := PING_STEP.search(line)) and ts:
            steps.append((int(s[1]), ts))
            if float(s[2]) > 0:
                rates.append((int(s[1]), float(s[2])))
    per_step = [r * tokens for n, r in rates if n > SKIP]
    text = open(log_path, errors="replace").read()
    cache = re.search(r"compilation cache: (\d+) programs, (\d+) loaded from the cache", text)
    if first and cache:
        first.update(programs=int(cache[1]), from_cache=int(cache[2]))
    exe = re.search(r"executable cache: (\d+) loaded .*?, (\d+) traced and compiled", text)
    if first and exe:
        first.update(exe_loaded=int(exe[1]), exe_traced=int(exe[2]))
    return dict(m, who="pingllm", tag=tag, log=log_path, first=first, steps_logged=len(steps),
                tok_s_median=st.median(per_step) if per_step else None,
                tok_s_span=span_tokens_per_s(steps, tokens))


def run_maxtext(size: dict, args, tag: str, resume: int = 0) -> dict:
    tokens = size["batch"] * size["seq"]
    steps = size["steps"] + resume * RESUME_STEPS
    env = dict(_env_without_cache_settings(), OUT_DIR=os.path.join(args.out, "maxtext"),
               RUN_NAME=tag, FRESH="0" if resume else "1",
               EMB=str(size["emb"]), LAYERS=str(size["layers"]), HEADS=str(size["heads"]),
               HEAD_DIM=str(size["head_dim"]), MLP=str(size["mlp"]), SEQ=str(size["seq"]),
               BATCH=str(size["batch"]), STEPS=str(steps),
               CKPT_PERIOD=str(CHECKPOINT_PERIOD))
    if args.peer_venv:
        env["VENV"] = args.peer_venv
    # A fixed schedule length: by default MaxText's schedule spans `steps`, which a resumed run
    # raises, and the schedule's constants are in the train step: every start would then
    # compile a new program and miss its cache. (pingllm's LEARNING_RATE_SCHEDULE_STEPS is fixed.)
    extra = [f"dropout_rate={DROPOUT}", "dtype=bfloat16",
             f"learning_rate_schedule_steps={SCHEDULE_STEPS}"]
    if not args.no_cache:
        cache = os.path.join(args.out, "maxtext_cache")
        if not resume:
            subprocess.run(["rm", "-rf", cache], check=True)
        extra.append(f"jax_cache_dir={cache}")
        env.update(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    log_path = os.path.join(args.out, "logs", f"{tag}{f'_resume{resume}' if resume else ''}.log")
    m = run_measured([os.path.join(PEER, "run_peer.sh"), *extra], log_path, env,
                     re.compile(r"completed step: \d+,"), watch=peer_log)
    year = dt.datetime.fromtimestamp(m["t0"]).year
    steps, rates = [], []
    for line in open(peer_log(log_path) or log_path, errors="replace"):
        ts = log_time(line, year)
        if (s := PEER_STEP.search(line)) and ts:
            steps.append((int(s[1]), ts))
            rates.append(float(s[4]))
    first = dict(ttfs=steps[0][1] - m["t0"], step=steps[0][0]) if steps else None
    per_step = steady(rates)
    return dict(m, who="maxtext", tag=tag, log=log_path, first=first, steps_logged=len(steps),
                tok_s_median=st.median(per_step) if per_step else None,
                tok_s_span=span_tokens_per_s(steps, tokens))


STEP_ONLY = r"""
import json, sys, time
import jax, numpy as np
from pingllm import config as config_lib, trainer, train_state
cfg = config_lib.load(["gin/quickstart.gin"], json.loads(sys.argv[1]))
setup = trainer.build(cfg)
B, L = cfg.data.global_batch_size, cfg.model.max_target_length
rng = np.random.default_rng(0)
ids = lambda: rng.integers(1, 267, (B, L)).astype(np.int32)
local = {"inputs": ids(), "targets": ids(), "weights": np.ones((B, L), np.float32),
         "segment_ids": np.ones((B, L), np.int32),
         "fields": rng.integers(1, 6, (B, L)).astype(np.int32)}
batch = trainer.global_batch(setup, local)
key = jax.random.key(1)
step = setup.train_step.lower(setup.abstract_state, batch, key).compile()
state = train_state.init_train_state(cfg.model, setup.optimizer, setup.mesh, setup.rules)
times, cpus = [], []
for _ in range(int(sys.argv[2])):
    c, t = time.process_time(), time.perf_counter()
    state, metrics = step(state, batch, key)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t); cpus.append(time.process_time() - c)
print("RESULT " + json.dumps({"times": times, "cpus": cpus}))
"""


def run_step_only(size: dict, args, n_steps: int) -> dict:
    bindings = [
        *_model_bindings(size),
        f"GLOBAL_BATCH_SIZE={size['batch']}", "EVAL_INTERVAL=0", *args.pingllm_binding,
    ]
    b0, t0 = busy_jiffies(), time.time()
    out = subprocess.run([PY, "-c", STEP_ONLY, json.dumps(bindings), str(n_steps)], cwd=REPO,
                         capture_output=True, text=True, timeout=900)
    wall = time.time() - t0
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if not line:
        sys.exit(f"step-only run failed:\n{out.stderr[-3000:]}")
    r = json.loads(line[0][len("RESULT "):])
    tokens = size["batch"] * size["seq"]
    # All processes' CPU (this one included) over the subprocess's life, in cores.
    busy = (busy_jiffies() - b0) / os.sysconf("SC_CLK_TCK")
    return dict(busy_cores=busy / wall, step_s=st.median(steady(r["times"])),
                cpu_s=st.median(steady(r["cpus"])), tok_s=tokens / st.median(steady(r["times"])),
                wall=wall,
                times=[round(t, 4) for t in r["times"]])


MATMUL = r"""
import json, time
import jax, jax.numpy as jnp
from pingllm import metrics
def bf16(n=1024, seconds=0.3):
    a = jnp.ones((n, n), jnp.bfloat16); f = jax.jit(lambda x: x @ x); f(a).block_until_ready()
    runs, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds or runs < 3:
        f(a).block_until_ready(); runs += 1
    return 2 * n**3 * runs / (time.perf_counter() - t)
print("RESULT " + json.dumps({"f32": metrics.measured_matmul_flops(), "bf16": bf16()}))
"""


def measure_matmul() -> dict:
    out = subprocess.run([PY, "-c", MATMUL], cwd=REPO, capture_output=True, text=True, timeout=300)
    return json.loads([x for x in out.stdout.splitlines() if x.startswith("RESULT ")][0][7:])


def prepare_datasets(args, seqs) -> None:
    """Builds the synthetic tfds dataset per sequence length once, outside every timed run."""
    code = (
        "import sys\nfrom pingllm import config as c\nfrom pingllm.data import pipeline\n"
        "for L in sys.argv[2:]:\n"
        "    cfg = c.load(['gin/quickstart.gin'], [f'MAX_TARGET_LENGTH={L}', "
        "'DATASET_PATH=\"' + sys.argv[1] + '\"', 'DataConfig.synthetic_rows=100000'])\n"
        "    pipeline.prepare(cfg.data)\n"
    )
    subprocess.run([PY, "-c", code, args.dataset_path, *map(str, seqs)], cwd=REPO, check=True,
                   capture_output=True)


def flops_per_token(size: dict) -> float:
    sys.path.insert(0, REPO)
    from pingllm import model

    cfg = model.ModelConfig(num_layers=size["layers"], emb_dim=size["emb"],
                            num_heads=size["heads"], head_dim=size["head_dim"],
                            mlp_dim=size["mlp"], max_target_length=size["seq"])
    return model.flops_per_token(cfg)


def fmt(x, spec=".0f"):
    return "n/a" if x is None else format(x, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1,2")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default="/tmp/pingllm_bench")
    p.add_argument("--dataset_path", default="/tmp/pingllm_bench/tfds")
    p.add_argument("--peer_venv", default="", help="VENV for run_peer.sh (default: its own)")
    p.add_argument("--no_cache", action="store_true",
                   help="neither uses a persistent compilation cache")
    p.add_argument("--step_only_steps", type=int, default=12)
    p.add_argument("--pingllm_binding", action="append", default=[],
                   help="extra gin binding for pingllm runs (repeatable)")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    prepare_datasets(args, sorted({SIZES[s]["seq"] for s in sizes}))
    with open("/proc/loadavg") as f:
        print(f"start: loadavg {f.read().split()[:3]}, {os.cpu_count()} CPUs", flush=True)

    matmul = [measure_matmul()]
    phases = ("fresh", "resume", "resume2")
    results = {s: {ph: {"pingllm": [], "maxtext": []} for ph in phases} for s in sizes}
    step_only: dict[int, list] = {s: [] for s in sizes}
    for r in range(args.rounds):
        for s in sizes:
            for phase in phases:
                for who, fn in (("pingllm", run_pingllm), ("maxtext", run_maxtext)):
                    res = fn(SIZES[s], args, f"{who}_s{s}_r{r}", resume=phases.index(phase))
                    results[s][phase][who].append(res)
                    print(f"size {s} round {r} {phase:7s} {who:8s} rc {res['rc']} ttfs "
                          f"{fmt(res['first'] and res['first']['ttfs'], '.1f')} s, tok/s median "
                          f"{fmt(res['tok_s_median'])}, span {fmt(res['tok_s_span'])}, wall "
                          f"{res['wall']:.1f} s, cpu {res['cpu']:.1f} s (at first step "
                          f"{fmt(res['cpu_at_first_step'], '.1f')}), other processes "
                          f"{res['other_cores']:.2f} of {res['ncpu']} cores", flush=True)
                    if who == "pingllm" and res["first"]:
                        f = res["first"]
                        print(f"    pingllm start-up: own TTFS {f['own_ttfs']:.2f} s (from "
                              f"train()), data {f['data']:.2f}, restore/init {f['restore']:.2f}, "
                              f"first batch {f['first_batch']:.2f}, compile {f['compile']:.2f}; "
                              f"interpreter + imports + build {f['ttfs'] - f['own_ttfs']:.2f} s; "
                              f"programs from the cache {f.get('from_cache', 'n/a')} of "
                              f"{f.get('programs', 'n/a')}; executable cache: "
                              f"{f.get('exe_loaded', 'n/a')} loaded, "
                              f"{f.get('exe_traced', 'n/a')} traced", flush=True)
            if args.step_only_steps > 0:
                so = run_step_only(SIZES[s], args, args.step_only_steps)
                step_only[s].append(so)
                print(f"size {s} round {r} pingllm step-only: median {so['step_s']:.4f} s/step "
                      f"({so['cpu_s']:.3f} cpu-s), {so['tok_s']:.0f} tok/s; all processes busy "
                      f"{so['busy_cores']:.2f} cores; times {so['times']}", flush=True)
        matmul.append(measure_matmul())

    f32 = st.median(m["f32"] for m in matmul)
    bf16 = st.median(m["bf16"] for m in matmul)
    print(f"\nmatmul 1024^3 (median of {len(matmul)}): float32 {f32 / 1e9:.1f} GFLOP/s, "
          f"bfloat16 {bf16 / 1e9:.1f} GFLOP/s")
    ratio = lambda a, b: fmt(a / b if a and b else None, ".2f")
    for s in sizes:
        size, fpt = SIZES[s], flops_per_token(SIZES[s])
        print(f"\n== size {s}: E{size['emb']} L{size['layers']} H{size['heads']}x"
              f"{size['head_dim']} M{size['mlp']} S{size['seq']} B{size['batch']}, "
              f"{size['steps']} steps (+{RESUME_STEPS} resumed), checkpoint every "
              f"{CHECKPOINT_PERIOD}, dropout {DROPOUT}, bf16 compute; {fpt / 1e6:.2f} MFLOP/token; "
              "compilation cache " + ("off" if args.no_cache
                                      else "on, emptied before each fresh run"))
        med = {}
        for phase in phases:
            for who in ("pingllm", "maxtext"):
                runs = [x for x in results[s][phase][who] if x["rc"] == 0]
                def pick(k, runs=runs):
                    return [x[k] for x in runs if x[k] is not None]

                ttfs = [x["first"]["ttfs"] for x in runs if x["first"]]
                med[phase, who] = m = dict(
                    tok=st.median(pick("tok_s_median")) if pick("tok_s_median") else None,
                    span=st.median(pick("tok_s_span")) if pick("tok_s_span") else None,
                    ttfs=st.median(ttfs) if ttfs else None,
                    cpu_first=(st.median(pick("cpu_at_first_step"))
                               if pick("cpu_at_first_step") else None),
                    other=st.mean(x["other_cores"] for x in runs) if runs else None,
                )
                line = (f"{phase:7s} {who:8s} ({len(runs)} ok of {len(results[s][phase][who])}): "
                        f"TTFS {fmt(m['ttfs'], '.1f')} s ({fmt(m['cpu_first'], '.1f')} cpu-s); "
                        f"other processes {fmt(m['other'], '.2f')} cores avg")
                if phase == "fresh":
                    line += (f"; tok/s median-of-medians {fmt(m['tok'])}, span {fmt(m['span'])}; "
                             f"achieved {fmt(m['tok'] and m['tok'] * fpt / 1e9, '.2f')} GFLOP/s = "
                             f"{fmt(m['tok'] and m['tok'] * fpt / f32, '.3f')} of the f32 matmul")
                print(line)
        p, mx = med["fresh", "pingllm"], med["fresh", "maxtext"]
        pr, mr = med["resume", "pingllm"], med["resume", "maxtext"]
        pr2, mr2 = med["resume2", "pingllm"], med["resume2", "maxtext"]
        if step_only[s]:
            so = st.median(x["tok_s"] for x in step_only[s])
            print(f"pingllm step-only: {so:.0f} tok/s = {so * fpt / 1e9:.2f} GFLOP/s = "
                  f"{so * fpt / f32:.3f} of the f32 matmul ({so * fpt / bf16:.3f} of bf16); "
                  f"vs MaxText median {ratio(so, mx['tok'])}x")
        print(f"ratio pingllm/MaxText: TTFS fresh {ratio(p['ttfs'], mx['ttfs'])}x (target <= 0.5), "
              f"resumed {ratio(pr['ttfs'], mr['ttfs'])}x, resumed again "
              f"{ratio(pr2['ttfs'], mr2['ttfs'])}x (target <= 0.25); TTFS cpu-s fresh "
              f"{ratio(p['cpu_first'], mx['cpu_first'])}x, resumed "
              f"{ratio(pr['cpu_first'], mr['cpu_first'])}x, again "
              f"{ratio(pr2['cpu_first'], mr2['cpu_first'])}x; tok/s median "
              f"{ratio(p['tok'], mx['tok'])}x (target >= 1.25), span "
              f"{ratio(p['span'], mx['span'])}x")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(dict(results=results, step_only=step_only, matmul=matmul), f, indent=1,
                  default=str)


if __name__ == "__main__":
    main()
