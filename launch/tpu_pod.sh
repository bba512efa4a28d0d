#!/usr/bin/env bash
# Run the main job on a Cloud TPU pod slice: one process per TPU VM worker, joined by jax.distributed (JAX reads
# the pod's topology from the TPU metadata; no coordinator address to give).
#
#   launch/tpu_pod.sh create | setup | sync | run | logs | stop | delete
#
# Variables (see launch/README.md):
#   TPU_NAME          name of the TPU VM (required)
#   ZONE              e.g. us-central2-b (required)
#   PROJECT           GCP project (default: gcloud's configured project)
#   ACCELERATOR_TYPE  e.g. v4-32 (create only; default v4-32)
#   RUNTIME_VERSION   TPU VM image (create only; default tpu-ubuntu2204-base)
#   REMOTE_DIR        checkout directory on every worker (default: mmdiff_jax, relative to the home directory)
#   CONFIG            experiment config: a shipped name or a path relative to the repository (run; default digits_image_label)
#   WORKDIR           run directory visible to every worker: a shared mount such as gcsfuse or Filestore (run; required)
#   EXTRA_FLAGS       more flags for python -m mmdiff_jax.main, e.g. "--config.mesh.fsdp=4" (run; optional)
set -euo pipefail

command=${1:-}
: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
remote_dir=${REMOTE_DIR:-mmdiff_jax}
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

project_flags=()
if [[ -n "${PROJECT:-}" ]]; then
  project_flags=(--project "$PROJECT")
fi

on_workers() {  # run a shell command on every worker of the slice, in parallel
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${project_flags[@]}" --worker=all --command "$1"
}

case "$command" in
  create)
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" "${project_flags[@]}" \
      --accelerator-type "${ACCELERATOR_TYPE:-v4-32}" --version "${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
    ;;
  sync)  # the committed tree of this checkout (git archive of HEAD) to every worker
    archive=$(mktemp -t mmdiff_jax.XXXXXX.tar.gz)
    git -C "$repo_root" archive --format=tar.gz -o "$archive" HEAD
    gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:mmdiff_jax.tar.gz" --zone "$ZONE" "${project_flags[@]}" \
      --worker=all
    rm -f "$archive"
    on_workers "mkdir -p $remote_dir && tar -xzf mmdiff_jax.tar.gz -C $remote_dir && rm mmdiff_jax.tar.gz"
    ;;
  setup)  # a virtual environment with the pinned requirements plus JAX's TPU runtime, on every worker
    on_workers "cd $remote_dir && python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt \
      && .venv/bin/pip install -q 'jax[tpu]==$(grep -E '^jax==' "$repo_root/requirements.txt" | cut -d= -f3)'"
    ;;
  run)  # start the job in the background on every worker; its pid goes to run.pid for `stop`
    : "${WORKDIR:?set WORKDIR to a directory every worker sees (shared mount)}"
    config=${CONFIG:-digits_image_label}
    on_workers "cd $remote_dir && nohup .venv/bin/python -m mmdiff_jax.main --config $config --workdir $WORKDIR \
      --distributed=on ${EXTRA_FLAGS:-} > run.log 2>&1 < /dev/null & echo \$! > $remote_dir/run.pid"
    ;;
  logs)  # the last lines of every worker's log
    on_workers "tail -n ${LINES_SHOWN:-20} $remote_dir/run.log"
    ;;
  stop)  # SIGTERM to the recorded pid only: the job saves a checkpoint and exits 0; rerun `run` to resume
    on_workers "if [ -f $remote_dir/run.pid ]; then kill \$(cat $remote_dir/run.pid) || true; rm $remote_dir/run.pid; fi"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone "$ZONE" "${project_flags[@]}" --quiet
    ;;
  *)
    echo "usage: $0 create|setup|sync|run|logs|stop|delete   (variables: see the top of this file)" >&2
    exit 2
    ;;
esac
