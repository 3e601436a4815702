# Shared by every script here (sourced, never run): option parsing, validation, dry run.
#
# A script sets VALUE_OPTS / FLAG_OPTS (its own options, beyond the common ones) and USAGE, sources
# this file, calls `parse_args "$@"`, then `tpu_settings` (or only the helpers it needs). Options
# win over the environment; either way a bad value stops the script with one line naming it and
# what is allowed, before any command has run.

SCRIPT_NAME=$(basename "$0")
SCRIPT_DIR=$(cd "$(dirname "$0")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)

COMMON_VALUE_OPTS=(--project --zone --name --type --runtime)
COMMON_FLAG_OPTS=(--spot --preemptible --queued --dry-run)
declare -A OPT=()  # option name -> value ('1' for flags)
ARGS=()            # what follows the options: positionals, `--config.*` flags, anything after --

die() {  # die MESSAGE: the one line a bad input gets, then exit 2
  echo "$SCRIPT_NAME: error: $*" >&2
  exit 2
}

note() { echo "$SCRIPT_NAME: $*" >&2; }

_in() {  # _in WORD LIST...: whether WORD is one of LIST
  local word=$1 item
  shift
  for item in "$@"; do [[ $item == "$word" ]] && return 0; done
  return 1
}

quote() {  # quote WORD...: the words as one POSIX shell line (plain words stay plain)
  local out=() word
  local prefix
  for word in "$@"; do
    prefix=''
    if [[ $word =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then  # --flag='value', as one would type it
      prefix=${BASH_REMATCH[1]}
      word=${BASH_REMATCH[2]}
    fi
    if [[ $word =~ ^[A-Za-z0-9_@%+=:,./-]+$ || ( -z $word && -n $prefix ) ]]; then
      out+=("$prefix$word")
    else
      out+=("$prefix'${word//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

run() {  # run CMD...: execute, or under a dry run print it (to stdout, ready to paste)
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    quote "$@"
  else
    "$@"
  fi
}

usage() {
  echo "$USAGE"
  echo "Common options (or environment): --project=P (TPU_PROJECT), --zone=Z (TPU_ZONE),"
  echo "  --name=N (TPU_NAME), --type=T (TPU_TYPE), --runtime=R (TPU_RUNTIME), --spot (TPU_SPOT=1),"
  echo "  --preemptible (TPU_PREEMPTIBLE=1), --queued (TPU_QUEUED=1), --dry-run (DRY_RUN=1)."
  echo "See tpu_scripts/README.md."
}

parse_args() {  # parse_args "$@": fill OPT and ARGS; stops at the first positional or --config.*
  local value_opts=("${COMMON_VALUE_OPTS[@]}" ${VALUE_OPTS[@]+"${VALUE_OPTS[@]}"})
  local flag_opts=("${COMMON_FLAG_OPTS[@]}" ${FLAG_OPTS[@]+"${FLAG_OPTS[@]}"})
  local arg name
  while (($#)); do
    arg=$1
    case $arg in
      --) shift; ARGS+=("$@"); break ;;
      -h | --help) usage; exit 0 ;;
      --config.*) ARGS+=("$@"); break ;;
      -*) ;;
      *) ARGS+=("$@"); break ;;
    esac
    shift
    name=${arg%%=*}
    if _in "$name" "${value_opts[@]}"; then
      if [[ $arg == *=* ]]; then
        OPT[$name]=${arg#*=}
      elif (($#)); then
        OPT[$name]=$1
        shift
      else
        die "option $name needs a value"
      fi
    elif _in "$name" "${flag_opts[@]}"; then
      [[ $arg == *=* ]] && die "option $name takes no value (got '$arg')"
      OPT[$name]=1
    else
      die "unknown option '$arg'; $SCRIPT_NAME takes ${value_opts[*]} ${flag_opts[*]} (see --help)"
    fi
  done
  [[ -n ${OPT[--dry-run]:-} ]] && DRY_RUN=1
  DRY_RUN=${DRY_RUN:-0}
  [[ $DRY_RUN == 0 || $DRY_RUN == 1 ]] || die "DRY_RUN='$DRY_RUN': must be 0 or 1"
  return 0
}

parse_run_target() {  # parse_run_target WHERE: sets config, workdir and rest (effjax.main flags)
  # from --config/--workdir or the first two positionals; WHERE says where WORKDIR must live.
  config=${OPT[--config]:-}
  workdir=${OPT[--workdir]:-}
  rest=(${ARGS[@]+"${ARGS[@]}"})
  if [[ -z $config && ${#rest[@]} -gt 0 && ${rest[0]} != --* ]]; then config=${rest[0]}; rest=("${rest[@]:1}"); fi
  if [[ -z $workdir && ${#rest[@]} -gt 0 && ${rest[0]} != --* ]]; then workdir=${rest[0]}; rest=("${rest[@]:1}"); fi
  [[ -n $config ]] || die "no config: give CONFIG (e.g. configs/default.py) as the first argument"
  [[ -n $workdir ]] || die "no workdir: give WORKDIR ($1) after CONFIG"
  local arg
  for arg in ${rest[@]+"${rest[@]}"}; do
    [[ $arg == --* ]] || die "unexpected argument '$arg' after CONFIG WORKDIR (only --flag=value for effjax.main)"
  done
}

_flag() {  # _flag OPTION ENVVAR: 1 if the flag is given or ENVVAR=1, else 0
  local value=${OPT[$1]:-${!2:-0}}
  [[ $value == 0 || $value == 1 ]] || die "$2='$value': must be 0 or 1"
  echo "$value"
}

# --- Cloud TPU --------------------------------------------------------------------------------

# Accelerator types by generation. v4 and v5p count TensorCores (2 per chip), v5e and v6e count
# chips; every host of a multi-host slice has 4 chips.
TPU_CHIP_COUNTS='1 4 8 16 32 64 128 256'
TPU_TYPES_HELP="v4-N (N a multiple of 8 up to 4096), v5litepod-N or v5e-N (N one of ${TPU_CHIP_COUNTS// /, }), v5p-N (N a multiple of 8 up to 12288), v6e-N (N one of ${TPU_CHIP_COUNTS// /, })"

tpu_check_type() {  # tpu_check_type TYPE: sets TPU_TYPE (v5e-N spelled v5litepod-N), TPU_GEN, TPU_HOSTS
  local type=$1 gen n
  [[ $type =~ ^(v4|v5litepod|v5e|v5p|v6e)-([1-9][0-9]*)$ ]] ||
    die "unknown accelerator type '$type'; allowed: $TPU_TYPES_HELP"
  gen=${BASH_REMATCH[1]}
  n=${BASH_REMATCH[2]}
  [[ $gen == v5e ]] && gen=v5litepod
  case $gen in
    v4 | v5p)
      local most=4096
      [[ $gen == v5p ]] && most=12288
      ((n % 8 == 0 && n <= most)) ||
        die "unknown accelerator type '$type'; $gen-N needs N a multiple of 8 up to $most; allowed: $TPU_TYPES_HELP"
      TPU_HOSTS=$((n / 8))
      ;;
    *)
      _in "$n" $TPU_CHIP_COUNTS ||
        die "unknown accelerator type '$type'; $gen-N needs N one of ${TPU_CHIP_COUNTS// /, }; allowed: $TPU_TYPES_HELP"
      TPU_HOSTS=$((n <= 8 ? 1 : n / 4))
      ;;
  esac
  TPU_TYPE=$gen-$n
  TPU_GEN=$gen
}

tpu_default_runtime() {  # tpu_default_runtime GEN: the software version Google lists for JAX
  case $1 in
    v4) echo tpu-ubuntu2204-base ;;
    v5litepod) echo v2-alpha-tpuv5-lite ;;
    v5p) echo v2-alpha-tpuv5 ;;
    v6e) echo v2-alpha-tpuv6e ;;
  esac
}

tpu_settings() {  # tpu_settings [need-type]: read and check name, zone, project (and type, runtime)
  TPU_NAME=${OPT[--name]:-${TPU_NAME:-}}
  TPU_ZONE=${OPT[--zone]:-${TPU_ZONE:-}}
  TPU_PROJECT=${OPT[--project]:-${TPU_PROJECT:-}}
  TPU_SPOT=$(_flag --spot TPU_SPOT)
  TPU_PREEMPTIBLE=$(_flag --preemptible TPU_PREEMPTIBLE)
  TPU_QUEUED=$(_flag --queued TPU_QUEUED)
  [[ -n $TPU_NAME ]] || die "no TPU name: give --name=NAME or set TPU_NAME"
  [[ $TPU_NAME =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
    die "TPU name '$TPU_NAME': must be lower-case letters, digits and hyphens, start with a letter, at most 63 characters"
  [[ -n $TPU_ZONE ]] || die "no zone: give --zone=ZONE or set TPU_ZONE (e.g. us-central2-b for v4, us-west4-a for v5e)"
  [[ $TPU_ZONE =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] ||
    die "zone '$TPU_ZONE': must look like us-central2-b (region-zone letter)"
  if [[ -n $TPU_PROJECT && ! $TPU_PROJECT =~ ^[a-z][-a-z0-9.:]*[a-z0-9]$ ]]; then
    die "project '$TPU_PROJECT': must be a Google Cloud project id (lower-case letters, digits, hyphens)"
  fi
  if [[ $TPU_SPOT == 1 && $TPU_PREEMPTIBLE == 1 ]]; then
    die "--spot and --preemptible exclude each other; choose one (spot is the newer kind)"
  fi
  if [[ $TPU_QUEUED == 1 && $TPU_PREEMPTIBLE == 1 ]]; then
    die "--preemptible does not apply to queued resources; use --spot"
  fi
  if [[ ${1:-} == need-type ]]; then
    TPU_TYPE=${OPT[--type]:-${TPU_TYPE:-}}
    [[ -n $TPU_TYPE ]] || die "no accelerator type: give --type=TYPE or set TPU_TYPE; allowed: $TPU_TYPES_HELP"
    tpu_check_type "$TPU_TYPE"
    TPU_RUNTIME=${OPT[--runtime]:-${TPU_RUNTIME:-$(tpu_default_runtime "$TPU_GEN")}}
    [[ $TPU_RUNTIME =~ ^[A-Za-z0-9][-A-Za-z0-9_.]*$ ]] ||
      die "runtime version '$TPU_RUNTIME': must be one word such as $(tpu_default_runtime "$TPU_GEN") (see gcloud compute tpus tpu-vm versions list)"
  fi
  # Where the code lives on every worker: relative to the home directory unless absolute.
  REPO_DIR=${REPO_DIR:-effjax}
  [[ $REPO_DIR =~ ^[-A-Za-z0-9_./~]+$ ]] || die "REPO_DIR='$REPO_DIR': letters, digits, - _ . / ~ only"
  [[ $REPO_DIR == /* || $REPO_DIR == '~'* ]] || REPO_DIR="~/$REPO_DIR"
  LOCATION=(--zone="$TPU_ZONE")
  [[ -n $TPU_PROJECT ]] && LOCATION+=(--project="$TPU_PROJECT")
  return 0
}

tpu_ssh() {  # tpu_ssh WORKER COMMAND: run the shell COMMAND on one worker (0, 1, ...) or all at once
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${LOCATION[@]}" --worker="$1" --command="$2"
}

# The run's process id and log on every worker (in the home directory, so the same on all).
REMOTE_PID='~/effjax.pid'
REMOTE_LOG='~/effjax.log'
# Remote shell code: read the pid, and test that it is still our run. Asking ps for the command
# line, not `kill -0`, rules out both a zombie and an unrelated process that reused the pid.
REMOTE_READ_PID="p=\$(cat $REMOTE_PID 2>/dev/null || true)"
REMOTE_ALIVE="[ -n \"\$p\" ] && ps -o args= -p \"\$p\" 2>/dev/null | grep -q effjax.main"
