#!/usr/bin/env bash
# Launch `pretrain.train` under torchrun on this node; run it once per node for multi-node jobs.
#
#   launch/torchrun.sh --config configs/tiny.yaml [section.key=value ...]
#
# Environment (all optional):
#   NPROC_PER_NODE   processes on this node (default: number of GPUs, else 1)
#   NNODES           nodes in the job (default 1: a standalone single-node run)
#   NODE_RANK        this node's rank; when set, ranks are static and node 0 hosts the rendezvous at
#                    MASTER_ADDR:MASTER_PORT, without restarts; when unset (also under SLURM), the c10d
#                    rendezvous there numbers the nodes, and restarts the group after a failure
#   MASTER_ADDR, MASTER_PORT   rendezvous host and port (default 127.0.0.1:29500)
#   RDZV_ID          rendezvous id for c10d (default SLURM_JOB_ID, else "pretrain")
#   SHUTDOWN_TIMEOUT seconds torchrun waits for workers to checkpoint after a signal (default 110)
#   MAX_RESTARTS     how often torchrun starts the workers again after one fails (default 3, 0 with NODE_RANK;
#                    0: never); a restarted worker resumes the newest checkpoint (docs/scaling.md, Automatic restart)
#   PYTHON           interpreter (default: .venv/bin/python if present, else python3)
#   DRY_RUN=1        print the command instead of running it
set -euo pipefail
cd "$(dirname "$0")/.."

gpus=$(nvidia-smi -L 2>/dev/null | wc -l || true)
NPROC_PER_NODE=${NPROC_PER_NODE:-$([ "${gpus:-0}" -gt 0 ] && echo "$gpus" || echo 1)}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-pretrain}}
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}

restarts=3
if [ "$NNODES" = 1 ]; then
  rdzv=(--standalone)
elif [ -n "$NODE_RANK" ]; then
  # The static rendezvous keeps one store for the whole job: restarted workers would find the failed
  # attempt's addresses there and never connect, so a static job has no restarts by default.
  rdzv=(--nnodes "$NNODES" --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
  restarts=0
else
  rdzv=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID")
  # under SLURM, node 0 (MASTER_ADDR) hosts the rendezvous: said, not guessed from the node's addresses
  if [ -n "${SLURM_NODEID:-}" ]; then
    rdzv+=(--rdzv-conf "is_host=$([ "$SLURM_NODEID" = 0 ] && echo 1 || echo 0)")
  fi
fi
MAX_RESTARTS=${MAX_RESTARTS:-$restarts}

# torchrun forwards SIGUSR1 (SLURM's pre-timeout warning) and SIGTERM to every worker; the workers finish
# the step, checkpoint and exit 0 within SHUTDOWN_TIMEOUT (see pretrain/training/preemption.py). SIGINT is not in the
# list: pretrain.torchrun, which runs torchrun, relays Ctrl-C to the workers itself (they checkpoint, exit 0,
# and so does torchrun; Ctrl-C again stops them now), where torchrun would end in a traceback and status 1.
# A worker that dies (a crash, the OOM killer) or fails (a rank that hung fails the others after dist.timeout)
# stops the group; torchrun starts it again up to MAX_RESTARTS times, and the new workers resume the newest
# complete checkpoint. A signalled stop is no failure: the workers checkpoint and exit 0 (SIGUSR1 on a worker),
# or torchrun ends on the signal it forwarded; neither uses a restart.
cmd=("$PYTHON" -m pretrain.torchrun "${rdzv[@]}" --nproc-per-node "$NPROC_PER_NODE"
  --max-restarts "$MAX_RESTARTS"
  --signals-to-handle SIGTERM,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout "${SHUTDOWN_TIMEOUT:-110}"
  -m pretrain.train "$@")

if [ -n "${DRY_RUN:-}" ]; then
  echo "${cmd[*]}"
else
  exec "${cmd[@]}"
fi
