#!/usr/bin/env bash
# Put effjax on every worker and install it with the TPU extra (jax[tpu]):
#   setup.sh --name=NAME --zone=ZONE [--src=DIR | --git=URL [--ref=REF]] [--dry-run]
# Default: pack this checkout (or --src DIR) without .git and caches, copy it to every worker and
# unpack it into $REPO_DIR (default ~/effjax; files already there are overwritten, none deleted).
# With --git the workers clone URL themselves (or update an earlier clone) and check out REF.
# Ends with every worker importing effjax and jax, so a broken install shows up here.
set -euo pipefail
USAGE="usage: $(basename "$0") --name=NAME --zone=ZONE [--src=DIR | --git=URL [--ref=REF]] [--dry-run]"
VALUE_OPTS=(--src --git --ref)
FLAG_OPTS=()
source "$(dirname "$0")/common.sh"
parse_args "$@"
tpu_settings
((${#ARGS[@]} == 0)) || die "unexpected argument '${ARGS[0]}' (setup.sh takes options only)"
git_url=${OPT[--git]:-}
ref=${OPT[--ref]:-}
[[ -n $git_url && -n ${OPT[--src]:-} ]] && die "--src and --git exclude each other; choose one"
[[ -n $ref && -z $git_url ]] && die "--ref=$ref needs --git=URL"

install="cd $REPO_DIR && python3 -m pip install -q -e '.[tpu]' && python3 -c 'import effjax, jax; print(\"effjax ready, jax\", jax.__version__)'"
if [[ -n $git_url ]]; then
  url=$(quote "$git_url")
  if [[ -n $ref ]]; then
    r=$(quote "$ref")
    fetch="if [ -d $REPO_DIR/.git ]; then git -C $REPO_DIR fetch -q origin; else git clone -q $url $REPO_DIR; fi && git -C $REPO_DIR checkout -q $r"
  else
    fetch="if [ -d $REPO_DIR/.git ]; then git -C $REPO_DIR pull -q --ff-only; else git clone -q $url $REPO_DIR; fi"
  fi
  tpu_ssh all "set -e; $fetch && $install"
  exit 0
fi

src=${OPT[--src]:-$REPO_ROOT}
[[ -f $src/setup.cfg || -f $src/pyproject.toml ]] || die "--src '$src': not an effjax checkout (no setup.cfg or pyproject.toml)"
tarball=${TMPDIR:-/tmp}/effjax-src-$TPU_NAME.tar.gz
remote_tarball=/tmp/effjax-src.tar.gz
run tar -C "$src" --exclude=.git --exclude=__pycache__ --exclude=.pytest_cache \
  --exclude='*.egg-info' -czf "$tarball" .
run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:$remote_tarball" "${LOCATION[@]}" --worker=all
tpu_ssh all "set -e; mkdir -p $REPO_DIR && tar -C $REPO_DIR -xzf $remote_tarball && $install"
