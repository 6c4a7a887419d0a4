#!/usr/bin/env bash
# Cloud TPU VM pod slice: create it, install the code on every worker, run one command on
# all workers at once, follow the log, delete it.
#
#   export TPU_NAME=resgen ZONE=us-central2-b ACCELERATOR=v4-64 PROJECT=my-project
#   launch/tpu_pod.sh create
#   launch/tpu_pod.sh install            # copies this checkout, pip installs jax[tpu]
#   launch/tpu_pod.sh run --config=configs/imagenet.py --workdir=gs://BUCKET/imagenet \
#       --config.data.data_dir=gs://BUCKET/tfds
#   launch/tpu_pod.sh logs               # worker 0's log (only process 0 writes metrics)
#   launch/tpu_pod.sh delete
#
# Every worker runs the same `python -m resgen_jax.main ...`; JAX finds the other workers
# by itself on a pod slice (train/distributed.py), and the workdir must be shared storage
# (a gs:// bucket) since every worker writes its checkpoint shards there.
# DRY_RUN=1 prints the gcloud commands instead of running them.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR="${ACCELERATOR:-v4-64}"
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"
REMOTE_DIR="${REMOTE_DIR:-resgen_jax}"
LOG="${LOG:-resgen.log}"
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}

run() {  # prints, and runs unless DRY_RUN=1
  echo "+ $(printf '%q ' "$@")"
  [[ "${DRY_RUN:-0}" == 1 ]] || "$@"
}

on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all \
    --command="$1"
}

command="${1:?usage: $0 create|install|run ARGS...|logs|delete}"
shift
case "$command" in
  create)
    run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG \
      --accelerator-type="$ACCELERATOR" --version="$RUNTIME"
    ;;
  install)
    repo="$(cd "$(dirname "$0")/.." && pwd)"
    archive="$(mktemp -d)/resgen_jax.tar.gz"
    run tar -czf "$archive" -C "$repo" --exclude=.git .
    run gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:~/resgen_jax.tar.gz" \
      --zone="$ZONE" $PROJECT_FLAG --worker=all
    on_all_workers "mkdir -p $REMOTE_DIR && tar -xzf resgen_jax.tar.gz -C $REMOTE_DIR && \
      cd $REMOTE_DIR && pip install -q -r requirements.txt && pip install -q -U 'jax[tpu]'"
    ;;
  run)
    args="$(printf ' %q' "$@")"
    on_all_workers "cd $REMOTE_DIR && nohup python3 -m resgen_jax.main$args > ~/$LOG 2>&1 &"
    ;;
  logs)
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=0 \
      --command="tail -n 100 -f ~/$LOG"
    ;;
  delete)
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --quiet
    ;;
  *)
    echo "unknown command '$command': create | install | run ARGS... | logs | delete" >&2
    exit 2
    ;;
esac
