#!/usr/bin/env bash
# Cloud TPU VM launcher for pingllm: create a TPU VM (or pod slice), install pingllm on every
# worker, run `python -m pingllm.main` on all workers at once, resume after preemption, fetch
# logs, delete. `launch/tpu_vm.sh --help` lists every setting.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
RESUMABLE_EXIT=75

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh COMMAND [OPTIONS] [-- EXTRA ARGS]

Commands
  create    Create the TPU VM (--queued: a queued resource, granted when capacity frees up).
  setup     Install pingllm with its [tpu] extra on every worker: copy this checkout (default)
            or git-clone --repo-url, then create <remote-dir>/.venv (Python 3.11, via uv) and
            pip install -e '.[tpu]'.
  train     Run `python -m pingllm.main` on all workers at once (jax.distributed finds its
            peers by itself on TPU VMs). Output goes to <output-dir>/<run-name>/ on GCS.
            Each worker writes <remote-dir>/logs/<run-name>/worker-<id>.log; without
            --detach, the log is also streamed here. Arguments after `--` go to the trainer.
  resume    Run the same training again (same run name): the trainer continues from the
            latest checkpoint. Without gin files/bindings it reuses those of the last
            `train` of this run from this machine. --recreate first deletes, creates and
            sets up the TPU VM again (what a preempted spot VM needs).
  stop      SIGTERM the run's trainer on every worker: it saves a checkpoint and exits 75.
  status    Describe the TPU VM (and queued resource); with a run name, each worker's run
            state (running / exit status) and last log line.
  logs      Copy every worker's log of the run to <local-log-dir>/<tpu-name>/<run-name>/.
            --tail N prints the last N lines of each worker's log instead.
  ssh       Open a shell on --worker (default 0), or run the command given after `--`.
  delete    Delete the TPU VM (with --queued: the queued resource and its TPU VM).

Options (each also read from the environment variable in brackets; flags win)
  --name NAME               TPU VM name [TPU_NAME] (required)
  --zone ZONE               zone, e.g. us-central2-b [ZONE] (required)
  --project PROJECT         GCP project; gcloud's default when unset [PROJECT]
  --accelerator-type TYPE   e.g. v4-8, v4-32, v5litepod-16, v6e-8 [ACCELERATOR_TYPE] (v4-8)
  --runtime-version V       TPU software version [RUNTIME_VERSION]; by default the one
                            the accelerator type needs: v4 tpu-ubuntu2204-base,
                            v5litepod (v5e) v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5,
                            v6e v2-alpha-tpuv6e
  --spot                    Spot capacity (cheaper, can be preempted) [SPOT=1]
  --preemptible             Legacy preemptible TPU VM (not with --queued) [PREEMPTIBLE=1]
  --queued                  Use a queued resource named like the TPU VM [QUEUED=1]
  --run-name NAME           run name: output and log directory [RUN_NAME] (train/resume)
  --output-dir gs://...     BASE_OUTPUT_DIRECTORY of the trainer [BASE_OUTPUT_DIRECTORY]
  --bucket BUCKET           shorthand: output dir gs://BUCKET/outputs/latency_network [BUCKET]
  --gin_file FILE           gin file, relative to the repo (repeatable)
                            (gin/latency_network.gin when none is given)
  --gin_bindings BINDING    gin binding, e.g. 'STEPS=1000' or 'RUN_NOTE="a b"' (repeatable)
  --env KEY=VALUE           environment variable for the trainer (repeatable)
  --detach                  train/resume: start and return; follow with `logs`/`status`
  --recreate                resume: delete, create and set up the TPU VM first
  --repo-url URL            setup: git-clone this instead of copying the checkout [REPO_URL]
  --repo-ref REF            setup: branch, tag or commit to check out (main) [REPO_REF]
  --remote-dir DIR          checkout on the workers, relative to $HOME (pingllm) [REMOTE_DIR]
  --python-version V        Python of the workers' venv (3.11) [PYTHON_VERSION]
  --extras EXTRAS           pip extras installed by setup (tpu) [EXTRAS]
  --local-log-dir DIR       where `logs` puts the logs (tpu_logs) [LOCAL_LOG_DIR]
  --tail N                  logs: print the last N lines instead of copying
  --worker W                ssh: worker index or `all` (0)
  --dry-run                 print every gcloud command instead of running it [DRY_RUN=1]
  -h, --help                this text

Examples
  export TPU_NAME=ping-v4 ZONE=us-central2-b PROJECT=my-project BUCKET=my-bucket
  launch/tpu_vm.sh create --accelerator-type v4-32 --spot
  launch/tpu_vm.sh setup
  launch/tpu_vm.sh train --run-name lat1 --gin_file gin/latency_network.gin \
      --gin_bindings 'STEPS=200000' --detach
  launch/tpu_vm.sh logs --run-name lat1 --tail 20
  launch/tpu_vm.sh resume --run-name lat1 --recreate --detach   # after a preemption
  launch/tpu_vm.sh delete
EOF
}

die() {
  echo "tpu_vm.sh: $*" >&2
  exit 2
}

# Quotes one word for a POSIX shell, readably: bare when safe, else in single quotes.
shell_quote() {
  if [[ -n "$1" && "$1" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"
  fi
}

# Joins words into one shell command line that splits back into exactly these words.
join_quoted() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(shell_quote "$word")"
  done
  printf '%s' "$out"
}

gcloud_run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    join_quoted gcloud "$@"
    echo
  else
    gcloud "$@"
  fi
}

# ---------------------------------------------------------------- worker side
# These run ON a TPU worker, inside the checkout (train's --command calls them).

worker_id() {
  if [[ -n "${WORKER_ID:-}" ]]; then
    echo "$WORKER_ID"
    return
  fi
  local id
  id="$(curl -sf --max-time 3 -H 'Metadata-Flavor: Google' \
    http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number \
    2>/dev/null || true)"
  if [[ "$id" =~ ^[0-9]+$ ]]; then
    echo "$id"
  elif [[ "$(hostname)" =~ -w-([0-9]+)$ ]]; then
    echo "${BASH_REMATCH[1]}"
  else
    echo 0
  fi
}

# worker-run [--no-follow] RUN_NAME -- COMMAND...: runs COMMAND with its output in
# logs/RUN_NAME/worker-<id>.log, its pid in .pid and its exit status in .status. SIGTERM,
# SIGINT and SIGHUP become one SIGTERM to COMMAND, so the trainer saves before it exits.
worker_run() {
  local follow=1
  if [[ "${1:-}" == --no-follow ]]; then
    follow=0
    shift
  fi
  local run_name="${1:?worker-run: run name}"
  shift
  [[ "${1:-}" == -- ]] && shift
  (($#)) || die "worker-run: no command"
  local id dir log pidfile statusfile
  id="$(worker_id)"
  dir="logs/$run_name"
  log="$dir/worker-$id.log"
  pidfile="$dir/worker-$id.pid"
  statusfile="$dir/worker-$id.status"
  mkdir -p "$dir"
  if [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    die "run $run_name is already running on worker $id (pid $(cat "$pidfile")); use stop first"
  fi
  rm -f "$statusfile"
  echo "=== $(date -u +%FT%TZ) worker $id ($(hostname)): $(join_quoted "$@")" >>"$log"
  local start_byte
  start_byte=$(($(wc -c <"$log") + 1))
  # The trap is set before the start so that a signal in between is not lost.
  local pid="" stop_requested=0
  trap 'stop_requested=1; if [[ -n "$pid" ]]; then kill -TERM "$pid" 2>/dev/null || true; fi' \
    TERM INT HUP
  "$@" >>"$log" 2>&1 </dev/null &
  pid=$!
  echo "$pid" >"$pidfile"
  if ((stop_requested)); then
    kill -TERM "$pid" 2>/dev/null || true
  fi
  local tail_pid=""
  if ((follow)); then
    # Only tail writes to the ssh session: when it drops, training and bookkeeping go on.
    tail -c "+$start_byte" -f --pid="$pid" "$log" 2>/dev/null | sed -u "s/^/[worker $id] /" &
    tail_pid=$!
  fi
  while kill -0 "$pid" 2>/dev/null; do
    wait "$pid" 2>/dev/null || true
  done
  local status=0
  wait "$pid" 2>/dev/null || status=$?
  trap - TERM INT HUP
  if [[ -n "$tail_pid" ]]; then
    wait "$tail_pid" 2>/dev/null || true
  fi
  echo "$status" >"$statusfile"
  rm -f "$pidfile"
  local note=""
  if ((status == RESUMABLE_EXIT)); then
    note=" (checkpoint saved; \`launch/tpu_vm.sh resume\` continues)"
  fi
  echo "=== $(date -u +%FT%TZ) worker $id: exit status $status$note" >>"$log"
  return "$status"
}

# worker-stop RUN_NAME: SIGTERM this worker's trainer of the run, if it is running.
worker_stop() {
  local run_name="${1:?worker-stop: run name}" id pidfile
  id="$(worker_id)"
  pidfile="logs/$run_name/worker-$id.pid"
  if [[ -f "$pidfile" ]] && kill -TERM "$(cat "$pidfile")" 2>/dev/null; then
    echo "worker $id: sent SIGTERM to pid $(cat "$pidfile")"
  else
    echo "worker $id: run $run_name is not running"
  fi
}

# worker-status RUN_NAME: one line about this worker's run, then its last log line.
worker_status() {
  local run_name="${1:?worker-status: run name}" id dir
  id="$(worker_id)"
  dir="logs/$run_name"
  if [[ -f "$dir/worker-$id.pid" ]] && kill -0 "$(cat "$dir/worker-$id.pid")" 2>/dev/null; then
    echo "worker $id: running (pid $(cat "$dir/worker-$id.pid"))"
  elif [[ -f "$dir/worker-$id.status" ]]; then
    echo "worker $id: exited with status $(cat "$dir/worker-$id.status")"
  else
    echo "worker $id: not started"
  fi
  if [[ -f "$dir/worker-$id.log" ]]; then
    tail -n 1 "$dir/worker-$id.log"
  fi
}

case "${1:-}" in
  worker-run) shift; worker_run "$@"; exit ;;
  worker-stop) shift; worker_stop "$@"; exit ;;
  worker-status) shift; worker_status "$@"; exit ;;
esac

# ---------------------------------------------------------------- settings

TPU_NAME="${TPU_NAME:-}"
ZONE="${ZONE:-}"
PROJECT="${PROJECT:-}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-8}"
RUNTIME_VERSION="${RUNTIME_VERSION:-}"
SPOT="${SPOT:-0}"
PREEMPTIBLE="${PREEMPTIBLE:-0}"
QUEUED="${QUEUED:-0}"
RUN_NAME="${RUN_NAME:-}"
BUCKET="${BUCKET:-}"
BASE_OUTPUT_DIRECTORY="${BASE_OUTPUT_DIRECTORY:-}"
REPO_URL="${REPO_URL:-}"
REPO_REF="${REPO_REF:-main}"
REMOTE_DIR="${REMOTE_DIR:-pingllm}"
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
EXTRAS="${EXTRAS:-tpu}"
LOCAL_LOG_DIR="${LOCAL_LOG_DIR:-tpu_logs}"
STATE_DIR="${STATE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/pingllm/tpu_vm}"
QUEUED_WAIT_SECONDS="${QUEUED_WAIT_SECONDS:-86400}"
DRY_RUN="${DRY_RUN:-0}"
DETACH=0
RECREATE=0
TAIL=""
WORKER=0
GIN_FILES=()
GIN_BINDINGS=()
TRAINER_ENV=()
EXTRA_ARGS=()

COMMAND=""
while (($#)); do
  # --flag=value is the same as --flag value.
  if [[ "$1" == --*=* ]]; then
    set -- "${1%%=*}" "${1#*=}" "${@:2}"
  fi
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --) shift; EXTRA_ARGS=("$@"); break ;;
    --name | --tpu | --tpu-name) TPU_NAME="${2?}"; shift 2 ;;
    --zone) ZONE="${2?}"; shift 2 ;;
    --project) PROJECT="${2?}"; shift 2 ;;
    --accelerator-type) ACCELERATOR_TYPE="${2?}"; shift 2 ;;
    --runtime-version | --version) RUNTIME_VERSION="${2?}"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --preemptible) PREEMPTIBLE=1; shift ;;
    --queued) QUEUED=1; shift ;;
    --run-name | --run_name) RUN_NAME="${2?}"; shift 2 ;;
    --output-dir | --base-output-directory) BASE_OUTPUT_DIRECTORY="${2?}"; shift 2 ;;
    --bucket) BUCKET="${2?}"; shift 2 ;;
    --gin_file | --gin-file) GIN_FILES+=("${2?}"); shift 2 ;;
    --gin_bindings | --gin-bindings | --gin_binding | --gin-binding)
      GIN_BINDINGS+=("${2?}"); shift 2 ;;
    --env) TRAINER_ENV+=("${2?}"); shift 2 ;;
    --detach) DETACH=1; shift ;;
    --recreate) RECREATE=1; shift ;;
    --repo-url) REPO_URL="${2?}"; shift 2 ;;
    --repo-ref) REPO_REF="${2?}"; shift 2 ;;
    --remote-dir) REMOTE_DIR="${2?}"; shift 2 ;;
    --python-version) PYTHON_VERSION="${2?}"; shift 2 ;;
    --extras) EXTRAS="${2?}"; shift 2 ;;
    --local-log-dir) LOCAL_LOG_DIR="${2?}"; shift 2 ;;
    --tail) TAIL="${2?}"; shift 2 ;;
    --worker) WORKER="${2?}"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -*) die "unknown option $1 (see --help)" ;;
    *)
      [[ -z "$COMMAND" ]] || die "unexpected argument $1 (trainer arguments go after --)"
      COMMAND="$1"
      shift
      ;;
  esac
done

if [[ -z "$BASE_OUTPUT_DIRECTORY" && -n "$BUCKET" ]]; then
  BASE_OUTPUT_DIRECTORY="gs://${BUCKET#gs://}/outputs/latency_network"
fi

# The TPU software version an accelerator type needs (v5e, v5p and v6e have their own).
default_runtime_version() {
  case "$1" in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) return 1 ;;
  esac
}

require() {
  local name
  for name in "$@"; do
    [[ -n "${!name}" ]] || die "$name is not set (flag or environment; see --help)"
  done
}

location_flags() {
  LOCATION=("--zone=$ZONE")
  if [[ -n "$PROJECT" ]]; then
    LOCATION+=("--project=$PROJECT")
  fi
}

check_run_settings() {
  require RUN_NAME BASE_OUTPUT_DIRECTORY
  [[ "$RUN_NAME" =~ ^[A-Za-z0-9._-]+$ && ! "$RUN_NAME" =~ ^\.+$ ]] ||
    die "RUN_NAME may hold only letters, digits, . _ - (and not be . or ..)"
  # Every worker writes its shards of each checkpoint: they need one shared place.
  [[ "$BASE_OUTPUT_DIRECTORY" =~ ^gs://[^\"\\]+$ ]] ||
    die "BASE_OUTPUT_DIRECTORY must be a gs:// path (got '$BASE_OUTPUT_DIRECTORY')"
}

# ---------------------------------------------------------------- commands

cmd_create() {
  require TPU_NAME ZONE ACCELERATOR_TYPE
  if [[ -z "$RUNTIME_VERSION" ]]; then
    RUNTIME_VERSION="$(default_runtime_version "$ACCELERATOR_TYPE")" ||
      die "no known runtime version for accelerator type '$ACCELERATOR_TYPE': give --runtime-version"
  fi
  location_flags
  if [[ "$QUEUED" == 1 ]]; then
    [[ "$PREEMPTIBLE" == 1 ]] && die "--preemptible does not exist for queued resources; use --spot"
    local args=(compute tpus queued-resources create "$TPU_NAME" "${LOCATION[@]}"
      "--node-id=$TPU_NAME" "--accelerator-type=$ACCELERATOR_TYPE"
      "--runtime-version=$RUNTIME_VERSION")
    [[ "$SPOT" == 1 ]] && args+=(--spot)
    gcloud_run "${args[@]}"
    echo "Queued. \`launch/tpu_vm.sh status\` shows its state; setup works once it is ACTIVE." >&2
  else
    local args=(compute tpus tpu-vm create "$TPU_NAME" "${LOCATION[@]}"
      "--accelerator-type=$ACCELERATOR_TYPE" "--version=$RUNTIME_VERSION")
    [[ "$SPOT" == 1 ]] && args+=(--spot)
    [[ "$PREEMPTIBLE" == 1 ]] && args+=(--preemptible)
    gcloud_run "${args[@]}"
  fi
}

wait_until_active() {
  [[ "$QUEUED" == 1 && "$DRY_RUN" != 1 ]] || return 0
  local waited=0 state
  while true; do
    state="$(gcloud compute tpus queued-resources describe "$TPU_NAME" "${LOCATION[@]}" \
      --format='value(state.state)')"
    echo "queued resource $TPU_NAME: $state" >&2
    case "$state" in
      ACTIVE) return 0 ;;
      FAILED | SUSPENDED) die "queued resource $TPU_NAME is $state" ;;
    esac
    ((waited < QUEUED_WAIT_SECONDS)) || die "queued resource not ACTIVE after ${waited}s"
    sleep 30
    waited=$((waited + 30))
  done
}

ssh_all() {
  gcloud_run compute tpus tpu-vm ssh "$TPU_NAME" "${LOCATION[@]}" --worker=all --quiet \
    "--command=$1"
}

# Packs the files git knows about (tracked and untracked-but-not-ignored, as they are in the
# working tree) so uncommitted edits reach the workers, and nothing ignored (.venv, outputs).
pack_checkout() {
  local tarball="$1"
  if git -C "$REPO_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$REPO_ROOT" &&
      git ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' f; do [[ -e "$f" ]] && printf '%s\0' "$f"; done |
        tar --null -T - -czf "$tarball")
  else
    tar -C "$REPO_ROOT" --exclude=.venv --exclude=.git --exclude=outputs \
      --exclude="$LOCAL_LOG_DIR" -czf "$tarball" .
  fi
}

cmd_setup() {
  require TPU_NAME ZONE
  location_flags
  local dir
  dir="$(shell_quote "$REMOTE_DIR")"
  local fetch
  if [[ -n "$REPO_URL" ]]; then
    local url ref
    url="$(shell_quote "$REPO_URL")"
    ref="$(shell_quote "$REPO_REF")"
    fetch="if [ -d $dir/.git ]; then git -C $dir fetch --quiet origin $ref && git -C $dir checkout --quiet --force FETCH_HEAD; else git clone --quiet $url $dir && git -C $dir checkout --quiet $ref; fi"
  else
    local tmp
    tmp="$(mktemp -d)"
    # shellcheck disable=SC2064  # expand $tmp now: it is local to this function
    trap "rm -rf '$tmp'" EXIT
    [[ "$DRY_RUN" == 1 ]] || pack_checkout "$tmp/pingllm-src.tgz"
    gcloud_run compute tpus tpu-vm scp "$tmp/pingllm-src.tgz" "$TPU_NAME:pingllm-src.tgz" \
      "${LOCATION[@]}" --worker=all --quiet
    fetch="mkdir -p $dir && tar -xzf pingllm-src.tgz -C $dir && rm -f pingllm-src.tgz"
  fi
  # uv brings its own Python 3.11: TPU VM images ship Ubuntu's 3.10.
  # shellcheck disable=SC2016  # $HOME and $PATH are the worker's, expanded there
  local install='export PATH="$HOME/.local/bin:$PATH" && { command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; }'
  install+=" && { [ -x .venv/bin/python ] || uv venv --python $(shell_quote "$PYTHON_VERSION") .venv; }"
  install+=" && uv pip install --python .venv/bin/python -e $(shell_quote ".[$EXTRAS]")"
  install+=" && .venv/bin/python -c 'import jax, pingllm; print(\"jax\", jax.__version__)'"
  ssh_all "set -e; $fetch && cd $dir && $install"
}

state_file() {
  printf '%s/%s/%s.args' "$STATE_DIR" "$TPU_NAME" "$RUN_NAME"
}

# Records the trainer arguments of this run, so `resume` can repeat them exactly.
save_run_args() {
  [[ "$DRY_RUN" == 1 ]] && return 0
  local file item
  file="$(state_file)"
  mkdir -p "$(dirname "$file")"
  {
    for item in ${GIN_FILES[@]+"${GIN_FILES[@]}"}; do printf 'f%s\0' "$item"; done
    for item in ${GIN_BINDINGS[@]+"${GIN_BINDINGS[@]}"}; do printf 'b%s\0' "$item"; done
    for item in ${TRAINER_ENV[@]+"${TRAINER_ENV[@]}"}; do printf 'e%s\0' "$item"; done
    for item in ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}; do printf 'a%s\0' "$item"; done
  } >"$file"
}

load_run_args() {
  local file item
  file="$(state_file)"
  [[ -f "$file" ]] || die "no saved arguments for run $RUN_NAME on $TPU_NAME ($file): give the same --gin_file/--gin_bindings as train"
  while IFS= read -r -d '' item; do
    case "$item" in
      f*) GIN_FILES+=("${item:1}") ;;
      b*) GIN_BINDINGS+=("${item:1}") ;;
      e*) TRAINER_ENV+=("${item:1}") ;;
      a*) EXTRA_ARGS+=("${item:1}") ;;
    esac
  done <"$file"
}

# The command each worker runs: worker-run wrapping the trainer with its arguments.
train_remote_command() {
  local trainer=()
  if ((${#TRAINER_ENV[@]})); then
    trainer+=(env "${TRAINER_ENV[@]}")
  fi
  trainer+=(.venv/bin/python -m pingllm.main)
  local item
  for item in "${GIN_FILES[@]}"; do trainer+=("--gin_file=$item"); done
  for item in ${GIN_BINDINGS[@]+"${GIN_BINDINGS[@]}"}; do trainer+=("--gin_bindings=$item"); done
  # The launcher's own bindings come last so they win: logs, state and outputs share one name.
  trainer+=("--gin_bindings=BASE_OUTPUT_DIRECTORY=\"$BASE_OUTPUT_DIRECTORY\"")
  trainer+=("--gin_bindings=RUN_NAME=\"$RUN_NAME\"")
  trainer+=(${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"})
  local dir
  dir="$(shell_quote "$REMOTE_DIR")"
  if [[ "$DETACH" == 1 ]]; then
    printf 'cd %s && nohup setsid bash launch/tpu_vm.sh worker-run --no-follow %s -- %s >/dev/null 2>&1 </dev/null &' \
      "$dir" "$(shell_quote "$RUN_NAME")" "$(join_quoted "${trainer[@]}")"
  else
    printf 'cd %s && bash launch/tpu_vm.sh worker-run %s -- %s' \
      "$dir" "$(shell_quote "$RUN_NAME")" "$(join_quoted "${trainer[@]}")"
  fi
}

cmd_train() {
  require TPU_NAME ZONE
  check_run_settings
  location_flags
  if ((${#GIN_FILES[@]} == 0)); then
    GIN_FILES=(gin/latency_network.gin)
  fi
  save_run_args
  ssh_all "$(train_remote_command)"
}

cmd_resume() {
  require TPU_NAME ZONE
  check_run_settings
  location_flags
  if ((${#GIN_FILES[@]} + ${#GIN_BINDINGS[@]} + ${#EXTRA_ARGS[@]} + ${#TRAINER_ENV[@]} == 0)); then
    load_run_args
  fi
  if [[ "$RECREATE" == 1 ]]; then
    cmd_delete || echo "delete failed (already gone?); creating anew" >&2
    cmd_create
    wait_until_active
    cmd_setup
  fi
  cmd_train
}

cmd_stop() {
  require TPU_NAME ZONE RUN_NAME
  location_flags
  ssh_all "cd $(shell_quote "$REMOTE_DIR") && bash launch/tpu_vm.sh worker-stop $(shell_quote "$RUN_NAME")"
}

cmd_status() {
  require TPU_NAME ZONE
  location_flags
  if [[ "$QUEUED" == 1 ]]; then
    gcloud_run compute tpus queued-resources describe "$TPU_NAME" "${LOCATION[@]}"
  fi
  gcloud_run compute tpus tpu-vm describe "$TPU_NAME" "${LOCATION[@]}"
  if [[ -n "$RUN_NAME" ]]; then
    ssh_all "cd $(shell_quote "$REMOTE_DIR") && bash launch/tpu_vm.sh worker-status $(shell_quote "$RUN_NAME")"
  fi
}

cmd_logs() {
  require TPU_NAME ZONE RUN_NAME
  location_flags
  local remote="$REMOTE_DIR/logs/$RUN_NAME"
  if [[ -n "$TAIL" ]]; then
    [[ "$TAIL" =~ ^[0-9]+$ ]] || die "--tail takes a number of lines"
    ssh_all "tail -n $TAIL $(shell_quote "$remote")/worker-*.log"
  else
    local dest="$LOCAL_LOG_DIR/$TPU_NAME"
    [[ "$DRY_RUN" == 1 ]] || mkdir -p "$dest"
    gcloud_run compute tpus tpu-vm scp --recurse "$TPU_NAME:$remote" "$dest" "${LOCATION[@]}" \
      --worker=all --quiet
    [[ "$DRY_RUN" == 1 ]] || echo "logs in $dest/$RUN_NAME/" >&2
  fi
}

cmd_ssh() {
  require TPU_NAME ZONE
  location_flags
  local args=(compute tpus tpu-vm ssh "$TPU_NAME" "${LOCATION[@]}" "--worker=$WORKER")
  if ((${#EXTRA_ARGS[@]})); then
    args+=("--command=$(join_quoted "${EXTRA_ARGS[@]}")")
  fi
  gcloud_run "${args[@]}"
}

cmd_delete() {
  require TPU_NAME ZONE
  location_flags
  if [[ "$QUEUED" == 1 ]]; then
    gcloud_run compute tpus queued-resources delete "$TPU_NAME" "${LOCATION[@]}" --force --quiet
  else
    gcloud_run compute tpus tpu-vm delete "$TPU_NAME" "${LOCATION[@]}" --quiet
  fi
}

case "$COMMAND" in
  create) cmd_create ;;
  setup) cmd_setup ;;
  train) cmd_train ;;
  resume) cmd_resume ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  logs) cmd_logs ;;
  ssh) cmd_ssh ;;
  delete) cmd_delete ;;
  "") usage >&2; exit 2 ;;
  *) die "unknown command $COMMAND (see --help)" ;;
esac
