# launch/launcher.sh: the deepspeed launcher around one ptrain training verb, sourced by launch/pretrain.sh (and
# the other training launchers) with PTRAIN_VERB and PTRAIN_SCRIPT set; see launch/pretrain.sh for the usage.
# shellcheck shell=bash
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
me="launch/$PTRAIN_VERB.sh"

# The venv's tools when it is not activated.
if ! command -v deepspeed >/dev/null 2>&1 && [[ -x "$repo/.venv/bin/deepspeed" ]]; then
  export PATH="$repo/.venv/bin:$PATH"
fi
python="$(command -v python3 || command -v python)"

# Rank mode: `deepspeed --no_python ... launch/VERB.sh` runs this file with --local_rank=N as a rank.
for arg in "$@"; do
  if [[ "$arg" == --local_rank=* || "$arg" == --local_rank || "$arg" == --local-rank=* ]]; then
    exec "$python" -m ptrain "$PTRAIN_VERB" "$@"   # the CLI takes --local_rank out (LOCAL_RANK is in the env)
  fi
done
# A launcher inside a launched rank would start a second world inside the first: refuse.
if [[ -n "${RANK:-}" && -n "${WORLD_SIZE:-}" && -n "${LOCAL_RANK:-}" ]]; then
  echo "$me: this process is already rank $RANK of $WORLD_SIZE started by a launcher (RANK, WORLD_SIZE and" \
       "LOCAL_RANK are set), so starting the deepspeed launcher here would nest one world inside another." \
       "Run \`ptrain $PTRAIN_VERB CONFIG ...\` in the rank instead (or let the launcher run this file:" \
       "\`deepspeed [flags] $me CONFIG\`), or start $me from a plain shell." >&2
  exit 2
fi

NUM_GPUS="${NUM_GPUS:-}"
HOSTFILE="${HOSTFILE:-}"
LAUNCHER="${LAUNCHER:-pdsh}"
LAUNCHER_ARGS="${LAUNCHER_ARGS:-}"
NUM_NODES="${NUM_NODES:-}"
NO_SSH="${NO_SSH:-0}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"

usage() { sed -n '2,/^""":"/p' "$PTRAIN_SCRIPT" | sed '$d' | sed 's/^# \{0,1\}//'; }
need() { [[ $# -ge 2 && -n "$2" ]] || { echo "$me: $1 needs a value" >&2; exit 2; }; }

while [[ $# -gt 0 && "$1" == --* ]]; do
  case "$1" in
    --gpus) need "$@"; NUM_GPUS="$2"; shift 2 ;;
    --hostfile) need "$@"; HOSTFILE="$2"; shift 2 ;;
    --launcher) need "$@"; LAUNCHER="$2"; shift 2 ;;
    --launcher-args) need "$@"; LAUNCHER_ARGS="$2"; shift 2 ;;
    --nodes) need "$@"; NUM_NODES="$2"; shift 2 ;;
    --no-ssh) NO_SSH=1; shift ;;
    --node-rank) need "$@"; NODE_RANK="$2"; shift 2 ;;
    --master-addr) need "$@"; MASTER_ADDR="$2"; shift 2 ;;
    --master-port) need "$@"; MASTER_PORT="$2"; shift 2 ;;
    --help) usage; exit 0 ;;
    *) echo "$me: unknown flag $1 (config values go after CONFIG as key=value)" >&2; exit 2 ;;
  esac
done
if [[ $# -lt 1 || "$1" == *=* ]]; then
  echo "usage: launch/pretrain.sh [LAUNCH FLAGS] CONFIG.yaml [dotted.key=value ...]   (--help for more)" >&2
  exit 2
fi
config="$1"; shift

# CPU or GPU: DeepSpeed's CPU accelerator when no CUDA device is visible.
if [[ -z "${DS_ACCELERATOR:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then
    export DS_ACCELERATOR=cuda
  else
    export DS_ACCELERATOR=cpu
  fi
fi
if [[ "$DS_ACCELERATOR" == cpu ]]; then
  # why: one node without a hostfile gets 2 CPU ranks by default; with a hostfile its slots decide
  [[ -z "$HOSTFILE" ]] && NUM_GPUS="${NUM_GPUS:-2}"
  cores="$(nproc 2>/dev/null || echo 2)"
  per_node="${NUM_GPUS:-$(awk '/slots=/{sub(/.*slots=/, ""); print $1; exit}' "$HOSTFILE" 2>/dev/null || echo 1)}"
  per_node="${per_node:-1}"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cores / per_node > 0 ? cores / per_node : 1 ))}"
fi

# Launch flags first (cheap), then the config.
args=(--master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
[[ -n "$NUM_GPUS" ]] && args+=(--num_gpus "$NUM_GPUS")
if [[ -n "$HOSTFILE" ]]; then
  [[ -f "$HOSTFILE" ]] || { echo "$me: hostfile $HOSTFILE not found (lines: 'host slots=N')" >&2; exit 2; }
  args+=(--hostfile "$HOSTFILE" --launcher "$LAUNCHER")
  [[ -n "$LAUNCHER_ARGS" ]] && args+=(--launcher_args "$LAUNCHER_ARGS")
  [[ -n "$NUM_NODES" ]] && args+=(--num_nodes "$NUM_NODES")
else
  # why: without this, deepspeed would read a stale /job/hostfile if one exists
  args+=(--hostfile /dev/null)
fi
if [[ "$NO_SSH" == 1 ]]; then
  [[ -n "$HOSTFILE" ]] || { echo "$me: --no-ssh needs --hostfile listing every node" >&2; exit 2; }
  args+=(--no_ssh --node_rank "$NODE_RANK")
fi

# Validate before starting any rank: the config, everything the verb's preflight can check from it (shards, backbone,
# run_dir writable, the checkpoint to resume), and that MASTER_PORT is free when the master is this machine.
check_port=1
[[ "$NO_SSH" == 1 && "$NODE_RANK" != 0 ]] && check_port=0   # the master is another node: its port is not ours to see
run_dir="$("$python" - "$PTRAIN_VERB" "$MASTER_ADDR" "$MASTER_PORT" "$check_port" "$config" "$@" <<'EOF'
import importlib
import sys

from ptrain.cli import VERBS, resolve
from ptrain.config import ConfigError, load_config

verb, addr, port, check_port, config, overrides = *sys.argv[1:6], sys.argv[6:]
me = f"launch/{verb}.sh"
answer, sys.stdout = sys.stdout, sys.stderr  # stdout carries run_dir only
try:
    cfg = load_config(resolve(VERBS[verb][0]), config, overrides)
except ConfigError as e:
    print(f"{me}: {e}", file=sys.stderr)
    sys.exit(2)
if not port.isdigit() or not 0 < int(port) < 65536:
    print(f"{me}: MASTER_PORT={port!r} is not a port number (1-65535); set --master-port P", file=sys.stderr)
    sys.exit(2)
preflight = getattr(importlib.import_module(VERBS[verb][1].split(":")[0]), "preflight", None)
try:
    if preflight is not None:
        preflight(cfg)
    if check_port == "1":
        from ptrain.distributed import check_master_port

        check_master_port(addr, int(port))
except (ValueError, FileNotFoundError, FileExistsError) as e:
    print(f"{me}: {e}", file=sys.stderr)
    sys.exit(2)
print(cfg.run_dir, file=answer)
EOF
)" || exit 2
case "$run_dir" in /*) ;; *) run_dir="$PWD/$run_dir" ;; esac

echo "$me: $DS_ACCELERATOR, ranks/node ${NUM_GPUS:-all}, hostfile ${HOSTFILE:-none}, master $MASTER_ADDR:$MASTER_PORT, run_dir $run_dir" >&2
set +e
deepspeed "${args[@]}" --no_local_rank --module ptrain "$PTRAIN_VERB" "$config" "$@"
status=$?
set -e
if [[ $status -ne 0 ]]; then
  # the newest checkpoint whose files are all there and parse (a damaged newer one is skipped on resume too)
  latest="$("$python" -c 'import sys; from ptrain.checkpoint import latest_intact; print(latest_intact(sys.argv[1]) or "")' \
    "$run_dir" 2>/dev/null || true)"
  case $status in
    2) why="a bad config or input (the message above names it)" ;;
    3) why="a non-finite loss or gradient (the rank's message above has the step)" ;;
    4) why="out of memory on a rank (the rank's message above says what to lower)" ;;
    5) why="a rank lost its peers (a node or process went away; the message above has the step)" ;;
    *)
      # the deepspeed launcher exits with a dead rank's negative return code: 256 - N for signal N
      sig=0
      if (( status > 128 && status < 256 )); then sig=$(( status > 192 ? 256 - status : status - 128 )); fi
      if (( sig > 0 )); then
        name="$(kill -l "$sig" 2>/dev/null || echo "$sig")"
        why="a rank was killed by signal $sig (SIG$name): the kernel's OOM killer (see dmesg), the scheduler, a lost node, or a kill; the other ranks were stopped"
      else
        why="an error on a rank (its traceback is above)"
      fi ;;
  esac
  echo "$me: training failed (exit $status): $why." >&2
  if [[ -n "$latest" ]]; then
    fix=""; [[ $status -eq 2 ]] && fix="fix that, then "
    echo "$me: newest complete checkpoint: $latest; ${fix}re-run the same command to resume from it." >&2
  else
    echo "$me: no complete checkpoint in $run_dir/checkpoints yet; a re-run starts from step 0." >&2
  fi
fi
exit $status
