#!/usr/bin/env bash
# torchrun wrapper for one GPU, one node or many nodes: bash launch.sh CONFIG [NNODES NODE_RANK MASTER_ADDR MASTER_PORT]
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: bash launch.sh CONFIG [NNODES NODE_RANK MASTER_ADDR MASTER_PORT] [--section.key=value ...]

  CONFIG       TOML config, e.g. configs/qwen2.5-0.5b.toml
  NNODES       number of nodes (default 1)
  NODE_RANK    this node's rank, 0 .. NNODES-1 (default 0)
  MASTER_ADDR  address of node 0 (default 127.0.0.1)
  MASTER_PORT  port on node 0 (default: on one node a free port, so that two runs never collide; else 29500)
  --a.b=c      config overrides, passed to validate.py and train.py

One process per GPU of this node (nvidia-smi, or NPROC_PER_NODE with CUDA_VISIBLE_DEVICES); without GPUs,
NPROC_PER_NODE CPU processes (default 1, gloo).
The config and run.out_dir are checked first (`train.py --check`: a bad key or value stops here, once, not
in every restart), then node 0 runs `validate.py --quick` unless SKIP_PREFLIGHT=1. torchrun restarts crashed workers
up to MAX_RESTARTS times (default 3); each restart resumes from the latest checkpoint. SIGTERM or Ctrl-C to this
script reaches torchrun, which stops train.py with an emergency checkpoint. Logs go to <out_dir>/logs/.

  bash launch.sh configs/qwen2.5-0.5b.toml                                  # all GPUs of this node
  bash launch.sh configs/qwen2.5-0.5b.toml 2 0 10.0.0.1 29500               # node 0 of 2
  bash launch.sh configs/qwen2.5-0.5b.toml 2 1 10.0.0.1 29500               # node 1 of 2
USAGE
}

positional=() overrides=()
for a in "$@"; do
  case "$a" in
    -h|--help) usage; exit 0 ;;
    --*) overrides+=("$a") ;;
    *) positional+=("$a") ;;
  esac
done
[ ${#positional[@]} -ge 1 ] || { usage; exit 2; }
CONFIG=${positional[0]}
NNODES=${positional[1]:-1}
NODE_RANK=${positional[2]:-0}
MASTER_ADDR=${positional[3]:-${MASTER_ADDR:-127.0.0.1}}
MASTER_PORT=${positional[4]:-${MASTER_PORT:-}}
[ -f "$CONFIG" ] || { echo "launch.sh: config $CONFIG not found" >&2; exit 2; }
CONFIG=$(realpath "$CONFIG")  # before the cd below
cd "$(dirname "$0")"

if [ -n "${NPROC_PER_NODE:-}" ] && [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  NPROC=$NPROC_PER_NODE
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  NPROC=$(nvidia-smi -L | grep -c '^GPU')
else
  NPROC=${NPROC_PER_NODE:-1}
  overrides+=("--run.device=cpu")
fi

# NCCL: NVLink SHARP (NVLS) off, errors surface as exceptions instead of hangs
export NCCL_NVLS_ENABLE=0 TORCH_NCCL_ASYNC_ERROR_HANDLING=1 NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1

OUT_DIR=$(python train.py --check --config "$CONFIG" ${overrides[@]+"${overrides[@]}"}) || exit $?
mkdir -p "$OUT_DIR/logs"
echo "launch.sh: $NNODES node(s), this is node $NODE_RANK, $NPROC process(es); logs in $OUT_DIR/logs"

if [ "$NODE_RANK" = 0 ] && [ "${SKIP_PREFLIGHT:-0}" != 1 ]; then
  python validate.py --config "$CONFIG" --quick --json "$OUT_DIR/logs/preflight.json" \
    ${overrides[@]+"${overrides[@]}"} 2>&1 | tee "$OUT_DIR/logs/preflight.log"
  [ "${PIPESTATUS[0]}" = 0 ] || { echo "launch.sh: pre-flight failed; see $OUT_DIR/logs/preflight.log" >&2; exit 1; }
fi

if [ "$NNODES" = 1 ] && [ -z "$MASTER_PORT" ]; then
  rendezvous=(--standalone)  # on a free port
else
  rendezvous=(--nnodes "$NNODES" --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}")
fi
# exec: torchrun takes this process's place, so that a SIGTERM or Ctrl-C sent to the launcher reaches it
exec python -m torch.distributed.run "${rendezvous[@]}" --nproc_per_node "$NPROC" --max_restarts "${MAX_RESTARTS:-3}" \
  train.py --config "$CONFIG" ${overrides[@]+"${overrides[@]}"} > >(tee -a "$OUT_DIR/logs/train-node$NODE_RANK.log") 2>&1
