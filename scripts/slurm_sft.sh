#!/bin/bash
# Multi-node SFT under Slurm: one `accelerate launch` per node, each starting one process per GPU.
#   sbatch scripts/slurm_sft.sh model=mistral-7b-v0.3 quant=nf4 'sft.data.train=[{path: /data/chat.jsonl}]'
#   RECIPE=recipes/sft_dpo.py sbatch scripts/slurm_sft.sh ...     (the whole SFT -> DPO pipeline)
# Every rank writes into the same run directory: it is fixed here, before launch, from the job id.
#SBATCH --job-name=mistral-align-sft
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one launcher per node
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
# 120 s before the time limit, Slurm sends SIGUSR1 to every task of the job step below (the
# `accelerate launch` on each node). The launcher passes it on to its workers (TORCHELASTIC_* below),
# which save a checkpoint at the next step boundary on every rank and exit with code 3; resubmitting
# with the same MISTRAL_ALIGN_RUN_DIR resumes from it. Add --requeue (and `scontrol requeue`) to do
# that automatically.
#SBATCH --signal=USR1@120
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MISTRAL_ALIGN_RUN_DIR=${MISTRAL_ALIGN_RUN_DIR:-$PWD/runs/sft-slurm-$SLURM_JOB_ID}
export NUM_NODES=$SLURM_NNODES
# torchrun (inside `accelerate launch`) forwards only the signals listed here to its workers, and
# gives them this many seconds to save before it kills them.
export TORCHELASTIC_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-110}
# A node that dies or hangs ends the others within run.dist_timeout_s (default 600 s) with exit code 4
# and one line naming it; resubmitting with the same MISTRAL_ALIGN_RUN_DIR resumes.
# Credentials come from the environment (WANDB_API_KEY, HF_TOKEN); they are never written to configs or logs.

# `exec`: the signal goes to the launcher itself, not to a shell that would not pass it on.
srun --kill-on-bad-exit=1 bash -c '
  exec .venv/bin/accelerate launch \
    --config_file configs/accelerate/multi_node.yaml \
    --num_machines "$SLURM_NNODES" \
    --num_processes $(( SLURM_NNODES * '"$GPUS_PER_NODE"' )) \
    --machine_rank "$SLURM_NODEID" \
    --main_process_ip '"$HEAD_NODE"' \
    --main_process_port 29500 \
    '"${RECIPE:-recipes/sft.py}"' "$@"
' bash "$@"
