#!/usr/bin/env bash
# launch/pretrain.sh [LAUNCH FLAGS] CONFIG.yaml [dotted.key=value ...]
#
# Runs `ptrain pretrain CONFIG key=value ...` on every rank through the `deepspeed` launcher
# (`--no_local_rank --module ptrain pretrain`: ranks read RANK / LOCAL_RANK / WORLD_SIZE from the
# environment). Without a CUDA GPU it starts N CPU ranks over gloo (DS_ACCELERATOR=cpu), so the
# laptop run and the cluster run take the same code path. The config is validated before any rank
# starts. Re-running the same command resumes from the newest COMPLETE checkpoint of run_dir.
#
# Every documented form works (the file is both a bash script and a Python program):
#   launch/pretrain.sh [LAUNCH FLAGS] CONFIG [k=v ...]         this script starts the deepspeed launcher
#   deepspeed [launcher flags] launch/pretrain.sh CONFIG [k=v]   the launcher runs this file as a rank
#   deepspeed [launcher flags] --module ptrain pretrain CONFIG   ... or the module
#   torchrun [flags] -m ptrain pretrain CONFIG                   torchrun's ranks
# Started inside a rank that a launcher already started (RANK/WORLD_SIZE/LOCAL_RANK set, no
# --local_rank argument) it refuses to start a second, nested launcher.
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
""":"
# ---- bash: launch the ranks (the shared logic is launch/launcher.sh) --------------------------------
PTRAIN_VERB=pretrain
PTRAIN_SCRIPT="${BASH_SOURCE[0]}"
# shellcheck source=launcher.sh
. "$(dirname "${BASH_SOURCE[0]}")/launcher.sh"
exit 0
: <<'PYTHON'
"""
# ---- Python: a launcher (deepspeed, torchrun) runs this file as one rank --------------------------------
import sys

from ptrain.cli import main

sys.exit(main(["pretrain", *sys.argv[1:]]))
PYTHON
