#!/usr/bin/env bash
# sbatch wrapper: one torchrun per node, c10d rendezvous on the first node, all GPUs of each node.
#
#   sbatch --nodes 2 scripts/slurm.sh train --config config/lens.yaml distributed.strategy=fsdp
#   sbatch --nodes 1 scripts/slurm.sh dump --config config/lens.yaml
#
# Everything after the script name is passed to `consistency-lens`. Slurm sends SIGTERM before a
# preemption or time limit; the trainer then checkpoints, and `--resume` continues the run.
#SBATCH --job-name=consistency-lens
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --signal=TERM@120
#SBATCH --output=slurm-%j.out
set -euo pipefail

HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}

srun --kill-on-bad-exit=1 python -m torch.distributed.run \
    --nnodes "$SLURM_JOB_NUM_NODES" \
    --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv_id "$SLURM_JOB_ID" \
    --rdzv_backend c10d \
    --rdzv_endpoint "$HEAD_NODE:29500" \
    -m consistency_lens "$@"
