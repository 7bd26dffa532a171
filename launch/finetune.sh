#!/usr/bin/env bash
# launch/finetune.sh [LAUNCH FLAGS] CONFIG.yaml init=EXPORT_OR_CLIP [dotted.key=value ...]
#
# Runs `ptrain finetune CONFIG key=value ...` on every rank through the `deepspeed` launcher, exactly as
# launch/pretrain.sh runs `ptrain pretrain` (same launch settings, same forms; see its header for the details):
#   launch/finetune.sh [LAUNCH FLAGS] CONFIG init=EXPORT [k=v ...]   this script starts the deepspeed launcher
#   deepspeed [launcher flags] launch/finetune.sh CONFIG init=EXPORT  the launcher runs this file as a rank
#   deepspeed [launcher flags] --module ptrain finetune CONFIG ...    ... or the module
#   torchrun [flags] -m ptrain finetune CONFIG ...                    torchrun's ranks
#
# Launch settings: an environment variable, or the flag in brackets (flags come before CONFIG):
#   NUM_GPUS [--gpus N], HOSTFILE [--hostfile FILE], LAUNCHER [--launcher NAME], LAUNCHER_ARGS [--launcher-args S],
#   NUM_NODES [--nodes N], NO_SSH=1 [--no-ssh], NODE_RANK [--node-rank R], MASTER_ADDR [--master-addr A],
#   MASTER_PORT [--master-port P], DS_ACCELERATOR (cpu | cuda), OMP_NUM_THREADS
#
# Examples:
#   launch/finetune.sh configs/finetune/msrvtt_seqTransf.yaml init=runs/howto100m_vitb32_seqTransf
#   launch/finetune.sh --gpus 8 configs/finetune/msvd_tdb_tab.yaml init=exports/c2v_msvd data.sources=[/data/msvd_train]
#
# Exit status: as launch/pretrain.sh (0 done; 2 bad config or input; 3 non-finite; 4 out of memory; 5 lost peers).
""":"
# ---- bash: launch the ranks (the shared logic is launch/launcher.sh) --------------------------------
PTRAIN_VERB=finetune
PTRAIN_SCRIPT="${BASH_SOURCE[0]}"
# shellcheck source=launcher.sh
. "$(dirname "${BASH_SOURCE[0]}")/launcher.sh"
exit 0
: <<'PYTHON'
"""
# ---- Python: a launcher (deepspeed, torchrun) runs this file as one rank --------------------------------
import sys

from ptrain.cli import main

sys.exit(main(["finetune", *sys.argv[1:]]))
PYTHON
