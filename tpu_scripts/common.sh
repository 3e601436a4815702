# Shared settings of the Cloud TPU scripts; override any of them in the environment.
: "${TPU_NAME:=effjax}"
: "${TPU_ZONE:=us-central2-b}"
: "${TPU_TYPE:=v4-8}"               # e.g. v4-32 for a 4-host pod slice
: "${TPU_RUNTIME:=tpu-ubuntu2204-base}"
: "${TPU_PROJECT:=$(gcloud config get-value project 2>/dev/null)}"
: "${REPO_DIR:=effjax}"             # where the code lives on every worker
tpu_ssh() {  # tpu_ssh COMMAND: run COMMAND on every worker of the slice at once
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$TPU_ZONE" --project "$TPU_PROJECT" \
    --worker=all --command "$1"
}
