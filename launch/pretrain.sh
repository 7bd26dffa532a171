#!/usr/bin/env bash
# launch/pretrain.sh [LAUNCH FLAGS] CONFIG.yaml [dotted.key=value ...]
#
# Runs `ptrain pretrain CONFIG key=value ...` on every rank through the `deepspeed` launcher
# (always `--no_local_rank --module ptrain pretrain`: ranks read RANK / LOCAL_RANK / WORLD_SIZE from
# the environment). Without a CUDA GPU it starts N CPU ranks over gloo (DS_ACCELERATOR=cpu), so the
# laptop run and the cluster run take the same code path. The config is validated before any rank
# starts. Re-running the same command resumes from the newest COMPLETE checkpoint of run_dir.
#
# Launch settings: an environment variable, or the flag in brackets (flags come before CONFIG):
#   NUM_GPUS      [--gpus N]          ranks per node: GPUs to use (default: all visible), or CPU ranks (default 2)
#   HOSTFILE      [--hostfile FILE]   multi-node: lines "hostname slots=N"; ranks start on every host
#   LAUNCHER      [--launcher NAME]   multi-node runner: pdsh (default, needs passwordless ssh) | openmpi |
#                                     mvapich | mpich | impi | slurm
#   LAUNCHER_ARGS [--launcher-args S] extra arguments for that runner (e.g. "--partition=gpu" for slurm)
#   NUM_NODES     [--nodes N]         use the first N hosts of the hostfile
#   NO_SSH=1      [--no-ssh]          no ssh: run this script once on every node (like torchrun) with
#   NODE_RANK     [--node-rank R]     ... this node's index in the hostfile (0 = the master's node)
#   MASTER_ADDR   [--master-addr A]   address of node 0 (default 127.0.0.1; set it for multi-node)
#   MASTER_PORT   [--master-port P]   rendezvous port (default 29500)
#   DS_ACCELERATOR                    cpu | cuda; default: cuda when nvidia-smi lists a GPU, else cpu
#   OMP_NUM_THREADS                   CPU ranks: threads per rank (default: cores / ranks)
#
# Examples:
#   launch/pretrain.sh configs/demo/pretrain_tiny.yaml                      # 2 CPU ranks, tiny CLIP
#   NUM_GPUS=1 launch/pretrain.sh configs/demo/pretrain_tiny.yaml engine.zero_stage=0
#   launch/pretrain.sh configs/pretrain/howto100m_vitb32_meanP.yaml data.sources=[/data/howto100m_shards]
#   launch/pretrain.sh --gpus 4 configs/pretrain/howto100m_vitb32_seqTransf.yaml engine.micro_batch_size=64
#   HOSTFILE=hosts.txt launch/pretrain.sh configs/pretrain/howto100m_vitb32_tdb_tab.yaml        # pdsh over ssh
#   HOSTFILE=hosts.txt LAUNCHER=slurm launch/pretrain.sh configs/pretrain/howto100m_vitb32_meanP.yaml
#   # no ssh: on each of 2 nodes (hosts.txt lists both), with node 0 at 10.0.0.1:
#   launch/pretrain.sh --hostfile hosts.txt --no-ssh --node-rank 0 --master-addr 10.0.0.1 CONFIG.yaml
#   launch/pretrain.sh --hostfile hosts.txt --no-ssh --node-rank 1 --master-addr 10.0.0.1 CONFIG.yaml
#
# Exit status: 0 done; otherwise the failing rank's status (2 bad config or input, 3 non-finite loss or
# gradient, 4 out of memory, 5 lost peers, 247 a rank killed by SIGKILL, e.g. by the OOM killer); what
# happened and the newest complete checkpoint to resume from are printed on failure.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"

NUM_GPUS="${NUM_GPUS:-}"
HOSTFILE="${HOSTFILE:-}"
LAUNCHER="${LAUNCHER:-pdsh}"
LAUNCHER_ARGS="${LAUNCHER_ARGS:-}"
NUM_NODES="${NUM_NODES:-}"
NO_SSH="${NO_SSH:-0}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"

usage() { sed -n '2,40p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
need() { [[ $# -ge 2 && -n "$2" ]] || { echo "launch/pretrain.sh: $1 needs a value" >&2; exit 2; }; }

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
    *) echo "launch/pretrain.sh: unknown flag $1 (config values go after CONFIG as key=value)" >&2; exit 2 ;;
  esac
done
if [[ $# -lt 1 || "$1" == *=* ]]; then
  echo "usage: launch/pretrain.sh [LAUNCH FLAGS] CONFIG.yaml [dotted.key=value ...]   (--help for more)" >&2
  exit 2
fi
config="$1"; shift

# The venv's tools when it is not activated.
if ! command -v deepspeed >/dev/null 2>&1 && [[ -x "$repo/.venv/bin/deepspeed" ]]; then
  export PATH="$repo/.venv/bin:$PATH"
fi
python="$(command -v python3 || command -v python)"

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

# Validate the config (and learn run_dir) before starting any rank.
run_dir="$("$python" - "$config" "$@" <<'EOF'
import sys
from ptrain.config import ConfigError, load_config
from ptrain.schema import PretrainConfig
try:
    print(load_config(PretrainConfig, sys.argv[1], sys.argv[2:]).run_dir)
except ConfigError as e:
    print(f"launch/pretrain.sh: {e}", file=sys.stderr)
    sys.exit(2)
EOF
)" || exit 2
case "$run_dir" in /*) ;; *) run_dir="$PWD/$run_dir" ;; esac

args=(--master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
[[ -n "$NUM_GPUS" ]] && args+=(--num_gpus "$NUM_GPUS")
if [[ -n "$HOSTFILE" ]]; then
  [[ -f "$HOSTFILE" ]] || { echo "launch/pretrain.sh: hostfile $HOSTFILE not found (lines: 'host slots=N')" >&2; exit 2; }
  args+=(--hostfile "$HOSTFILE" --launcher "$LAUNCHER")
  [[ -n "$LAUNCHER_ARGS" ]] && args+=(--launcher_args "$LAUNCHER_ARGS")
  [[ -n "$NUM_NODES" ]] && args+=(--num_nodes "$NUM_NODES")
else
  # why: without this, deepspeed would read a stale /job/hostfile if one exists
  args+=(--hostfile /dev/null)
fi
if [[ "$NO_SSH" == 1 ]]; then
  [[ -n "$HOSTFILE" ]] || { echo "launch/pretrain.sh: --no-ssh needs --hostfile listing every node" >&2; exit 2; }
  args+=(--no_ssh --node_rank "$NODE_RANK")
fi

echo "launch/pretrain.sh: $DS_ACCELERATOR, ranks/node ${NUM_GPUS:-all}, hostfile ${HOSTFILE:-none}, master $MASTER_ADDR:$MASTER_PORT, run_dir $run_dir" >&2
set +e
deepspeed "${args[@]}" --no_local_rank --module ptrain pretrain "$config" "$@"
status=$?
set -e
if [[ $status -ne 0 ]]; then
  latest="$(ls -d "$run_dir"/checkpoints/step_*/COMPLETE 2>/dev/null | sort | tail -n 1 || true)"
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
  echo "launch/pretrain.sh: training failed (exit $status): $why." >&2
  if [[ -n "$latest" ]]; then
    echo "launch/pretrain.sh: newest complete checkpoint: $(dirname "$latest"); re-run the same command to resume from it." >&2
  else
    echo "launch/pretrain.sh: no complete checkpoint in $run_dir/checkpoints yet; a re-run starts from step 0." >&2
  fi
fi
exit $status
