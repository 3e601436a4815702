#!/usr/bin/env bash
# Train on a Slurm GPU cluster, N nodes x G GPUs, one process per node or per GPU:
#   slurm_launch.sh --nodes=2 --gpus-per-node=8 [--per=node|gpu] [--partition=P] [--account=A]
#                   [--time=T] [--job-name=J] [--output=F] [--port=P] [--python=PY] [--dry-run]
#                   CONFIG WORKDIR [--config.x=y ...]
# Outside a job it submits itself with sbatch; inside one (sbatch or salloc, $SLURM_JOB_ID set) it
# starts one task per process with srun, having set what effjax/parallel/distributed.py reads:
#   $JAX_COORDINATOR_ADDRESS  first host of $SLURM_JOB_NODELIST, port 61440 + job id % 4096
#   $EFFJAX_NUM_PROCESSES     nodes x (1, or G with --per=gpu)
#   $EFFJAX_PROCESS_ID        each task's $SLURM_PROCID
#   $JAX_LOCAL_DEVICE_IDS     the GPUs of a process: 0..G-1 per node, $SLURM_LOCALID per GPU
# (the last because JAX's own Slurm detection would otherwise give every process only GPU
# $SLURM_LOCALID, i.e. GPU 0 alone when there is one process per node). Every task then runs
#   python -m effjax.main --config=CONFIG --workdir=WORKDIR --config.distributed.initialize=True ...
# from the repository root, which must be at the same path on every node (a shared filesystem), as
# must WORKDIR. The job asks Slurm for SIGTERM 120 s before its time limit: effjax checkpoints and
# exits 0, and resubmitting the same command resumes. Other sbatch settings: SBATCH_* variables.
set -euo pipefail
USAGE="usage: $(basename "$0") [--nodes=N] [--gpus-per-node=G] [--per=node|gpu] [--partition=P] [--account=A] [--time=T] [--job-name=J] [--output=F] [--port=P] [--python=PY] [--dry-run] CONFIG WORKDIR [--config.x=y ...]"
VALUE_OPTS=(--nodes --gpus-per-node --per --partition --account --time --job-name --output --port
            --python --config --workdir)
FLAG_OPTS=(--task)
source "$(dirname "$0")/common.sh"
COMMON_VALUE_OPTS=()
COMMON_FLAG_OPTS=(--dry-run)
usage() { echo "$USAGE"; echo "See tpu_scripts/README.md."; }
parse_args "$@"

_count() {  # _count OPTION VALUE: VALUE, checked to be a positive whole number
  [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1='$2': must be a positive whole number"
  echo "$2"
}
in_job=0
[[ -n ${SLURM_JOB_ID:-} ]] && in_job=1
nodes=$(_count --nodes "${OPT[--nodes]:-${SLURM_JOB_NUM_NODES:-1}}")
gpus=$(_count --gpus-per-node "${OPT[--gpus-per-node]:-${SLURM_GPUS_ON_NODE:-8}}")
per=${OPT[--per]:-node}
case $per in
  node) tasks_per_node=1 ;;
  gpu) tasks_per_node=$gpus ;;
  *) die "--per='$per': must be node (one process per node) or gpu (one process per GPU)" ;;
esac
python=${OPT[--python]:-${PYTHON:-python}}

parse_run_target "on a filesystem every node sees"
if [[ $in_job == 0 && -z ${OPT[--task]:-} ]]; then  # the job starts in the repository root
  [[ $config != /* && -f $config ]] && config=$PWD/$config
  [[ $workdir != /* && $workdir != *://* ]] && workdir=$PWD/$workdir
fi
main_args=(--config="$config" --workdir="$workdir" ${rest[@]+"${rest[@]}"})
pass_on=("$config" "$workdir" ${rest[@]+"${rest[@]}"})  # the same, for another run of this script
script=$SCRIPT_DIR/$SCRIPT_NAME

if [[ -n ${OPT[--task]:-} ]]; then  # one task of the srun step: become its effjax process
  [[ -n ${SLURM_PROCID:-} ]] || die "--task runs inside srun only (no \$SLURM_PROCID)"
  export EFFJAX_PROCESS_ID=$SLURM_PROCID
  if [[ -z ${JAX_LOCAL_DEVICE_IDS:-} ]]; then
    if [[ $per == gpu ]]; then
      export JAX_LOCAL_DEVICE_IDS=${SLURM_LOCALID:?--per=gpu needs \$SLURM_LOCALID from srun}
    else
      export JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((gpus - 1)))
    fi
  fi
  cd "$REPO_ROOT"
  if [[ $DRY_RUN == 1 ]]; then
    run "$python" -m effjax.main "${main_args[@]}" --config.distributed.initialize=True
    exit 0
  fi
  exec "$python" -m effjax.main "${main_args[@]}" --config.distributed.initialize=True
fi

# The options the job passes on to itself (and each task), fully spelled out.
own=(--nodes="$nodes" --gpus-per-node="$gpus" --per="$per" --python="$python")
[[ -n ${OPT[--port]:-} ]] && own+=(--port="${OPT[--port]}")

if [[ $in_job == 0 ]]; then
  submit=(sbatch --job-name="${OPT[--job-name]:-effjax}" --nodes="$nodes"
          --ntasks-per-node="$tasks_per_node" --gpus-per-node="$gpus"
          --output="${OPT[--output]:-slurm-%x-%j.out}" --signal=TERM@120 --chdir="$REPO_ROOT")
  [[ -n ${OPT[--partition]:-} ]] && submit+=(--partition="${OPT[--partition]}")
  [[ -n ${OPT[--account]:-} ]] && submit+=(--account="${OPT[--account]}")
  [[ -n ${OPT[--time]:-} ]] && submit+=(--time="${OPT[--time]}")
  run "${submit[@]}" --wrap="$(quote bash "$script" "${own[@]}" -- "${pass_on[@]}")"
  exit 0
fi

# Inside the job: the coordinator is process 0, on the first node.
port=${OPT[--port]:-$((61440 + SLURM_JOB_ID % 4096))}
[[ $port =~ ^[0-9]+$ ]] && ((port > 0 && port < 65536)) || die "--port='$port': must be a TCP port (1-65535)"
[[ -n ${SLURM_JOB_NODELIST:-} ]] || die "\$SLURM_JOB_ID is set but \$SLURM_JOB_NODELIST is not"
if [[ $DRY_RUN == 1 ]]; then
  run scontrol show hostnames "$SLURM_JOB_NODELIST"
  first='$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
else
  first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  [[ -n $first ]] || die "scontrol show hostnames '$SLURM_JOB_NODELIST' printed no host"
fi
num=$((nodes * tasks_per_node))
step=(srun --nodes="$nodes" --ntasks="$num" --ntasks-per-node="$tasks_per_node"
       --kill-on-bad-exit=1 bash "$script" --task "${own[@]}" -- "${pass_on[@]}")
if [[ $DRY_RUN == 1 ]]; then
  echo "JAX_COORDINATOR_ADDRESS=\"$first:$port\" EFFJAX_NUM_PROCESSES=$num $(quote "${step[@]}")"
  exit 0
fi
export JAX_COORDINATOR_ADDRESS=$first:$port EFFJAX_NUM_PROCESSES=$num
note "$num process(es) on $nodes node(s), coordinator $JAX_COORDINATOR_ADDRESS"
exec "${step[@]}"
