"""tpu_scripts/: the exact gcloud / Slurm calls, run against fakes that record their argv.

No network and no cloud: fake gcloud, sbatch, srun and scontrol (and python, python3 where a
remote or per-task command is executed here) sit first on PATH and append one JSON line per call.
"""

import json
import os
import pathlib
import shlex
import signal
import stat
import subprocess
import time

import pytest

SCRIPTS = pathlib.Path(__file__).resolve().parent.parent / 'tpu_scripts'
ENV_KEYS = ('JAX_COORDINATOR_ADDRESS', 'EFFJAX_NUM_PROCESSES', 'EFFJAX_PROCESS_ID',
            'JAX_LOCAL_DEVICE_IDS')

# Records {prog, argv, env, cwd} as one JSON line and prints canned output for the calls that are
# read back (queued-resources describe: the next of $FAKE_STATES; scontrol: $FAKE_HOSTS). Bash, not
# Python, because it starts in milliseconds.
FAKE = r'''#!/bin/bash
j() { local s=${1//\\/\\\\}; s=${s//\"/\\\"}; printf '"%s"' "${s//$'\n'/\\n}"; }
{
  printf '{"prog": '; j "${0##*/}"; printf ', "cwd": '; j "$PWD"; printf ', "argv": ['
  sep=''; for a in "$@"; do printf '%s' "$sep"; j "$a"; sep=', '; done
  printf '], "env": {'; sep=''
  for k in ENV_KEYS; do
    if [[ -n ${!k+x} ]]; then printf '%s' "$sep"; j "$k"; printf ': '; j "${!k}"; sep=', '; fi
  done
  printf '}}\n'
} >> "$FAKE_LOG"
if [[ ${0##*/} == gcloud && "$3 $4" == 'queued-resources describe' ]]; then
  IFS=, read -ra states <<< "${FAKE_STATES:-ACTIVE}"
  n=$(cat "$FAKE_LOG.describe" 2>/dev/null || echo 0)
  echo $((n + 1)) > "$FAKE_LOG.describe"
  ((n < ${#states[@]})) || n=$((${#states[@]} - 1))
  echo "${states[n]}"
fi
if [[ ${0##*/} == scontrol ]]; then tr , '\n' <<< "${FAKE_HOSTS:-node1}"; fi
'''.replace('ENV_KEYS', ' '.join(ENV_KEYS))

# A training process that lives until SIGTERM (for launch.sh's and stop.sh's remote commands).
FAKE_TRAINER = '''#!/bin/bash
echo "$@" >> "$FAKE_LOG.trainer"
trap 'echo TERM >> "$FAKE_LOG.trainer"; exit 0' TERM
for _ in $(seq 300); do sleep 0.1; done
'''


@pytest.fixture
def sh(tmp_path):
  """Runs a script with only the fakes and the system's tools on PATH; returns (proc, calls)."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  for name in ('gcloud', 'sbatch', 'srun', 'scontrol', 'python'):
    (bin_dir / name).write_text(FAKE)
    (bin_dir / name).chmod(0o755)
  log = tmp_path / 'calls.jsonl'
  base = {'PATH': f'{bin_dir}:/usr/bin:/bin', 'HOME': str(tmp_path), 'TMPDIR': str(tmp_path),
          'FAKE_LOG': str(log), 'LANG': 'C'}

  def call(script, *args, env=None, cwd=None):
    for stale in (log, pathlib.Path(f'{log}.describe')):
      stale.unlink(missing_ok=True)
    proc = subprocess.run(['bash', str(SCRIPTS / script), *args], env={**base, **(env or {})},
                          cwd=cwd or tmp_path, capture_output=True, text=True, timeout=20)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc, calls

  call.base = base
  call.log = log
  return call


TPU = {'TPU_NAME': 'exp1', 'TPU_ZONE': 'us-west4-a'}
LOC = ['--zone=us-west4-a']


def argvs(calls):
  return [[c['prog'], *c['argv']] for c in calls]


def ssh(worker, command, name='exp1', loc=LOC):
  return ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', name, *loc, f'--worker={worker}',
          f'--command={command}']


@pytest.mark.parametrize('tpu_type, gcloud_type, runtime', [
    ('v4-32', 'v4-32', 'tpu-ubuntu2204-base'),
    ('v5litepod-16', 'v5litepod-16', 'v2-alpha-tpuv5-lite'),
    ('v5e-8', 'v5litepod-8', 'v2-alpha-tpuv5-lite'),
    ('v5p-128', 'v5p-128', 'v2-alpha-tpuv5'),
    ('v6e-256', 'v6e-256', 'v2-alpha-tpuv6e'),
])
def test_create_per_generation_defaults(sh, tpu_type, gcloud_type, runtime):
  proc, calls = sh('create.sh', f'--type={tpu_type}', env=TPU)
  assert proc.returncode == 0, proc.stderr
  assert argvs(calls) == [['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'exp1', *LOC,
                           f'--accelerator-type={gcloud_type}', f'--version={runtime}']]


def test_create_spot_project_runtime_and_extra_flags_from_options(sh):
  proc, calls = sh('create.sh', '--name', 'big', '--zone=us-central2-b', '--project=my-proj',
                   '--type=v4-64', '--runtime=tpu-vm-base', '--spot', '--', '--internal-ips')
  assert proc.returncode == 0, proc.stderr
  assert argvs(calls) == [['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'big',
                           '--zone=us-central2-b', '--project=my-proj', '--accelerator-type=v4-64',
                           '--version=tpu-vm-base', '--spot', '--internal-ips']]
  assert 'v4-64 (8 host(s))' in proc.stderr


def test_create_preemptible_from_environment(sh):
  proc, calls = sh('create.sh', env={**TPU, 'TPU_TYPE': 'v6e-8', 'TPU_PREEMPTIBLE': '1'})
  assert proc.returncode == 0, proc.stderr
  assert argvs(calls)[0][-2:] == ['--version=v2-alpha-tpuv6e', '--preemptible']


def test_queued_create_polls_until_active_then_delete(sh):
  env = {**TPU, 'TPU_QUEUED': '1', 'TPU_POLL_SECONDS': '0',
         'FAKE_STATES': 'ACCEPTED,WAITING_FOR_RESOURCES,PROVISIONING,ACTIVE'}
  proc, calls = sh('create.sh', '--type=v5litepod-16', '--spot', env=env)
  assert proc.returncode == 0, proc.stderr
  describe = ['gcloud', 'compute', 'tpus', 'queued-resources', 'describe', 'exp1', *LOC,
              '--format=value(state.state)']
  assert argvs(calls) == [
      ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'exp1', *LOC, '--node-id=exp1',
       '--accelerator-type=v5litepod-16', '--runtime-version=v2-alpha-tpuv5-lite', '--spot'],
      describe, describe, describe, describe]
  assert 'WAITING_FOR_RESOURCES' in proc.stderr and 'ACTIVE' in proc.stderr

  proc, calls = sh('delete.sh', '--queued', '--yes', env=TPU)
  assert proc.returncode == 0, proc.stderr
  assert argvs(calls) == [['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', 'exp1',
                           *LOC, '--force', '--quiet']]


def test_queued_create_stops_on_failure_and_no_wait_skips_polling(sh):
  env = {**TPU, 'TPU_POLL_SECONDS': '0', 'FAKE_STATES': 'PROVISIONING,FAILED'}
  proc, calls = sh('create.sh', '--queued', '--type=v5p-8', env=env)
  assert proc.returncode == 1
  assert 'queued resource exp1 is FAILED' in proc.stderr
  assert len(calls) == 3
  proc, calls = sh('create.sh', '--queued', '--no-wait', '--type=v5p-8', env=env)
  assert proc.returncode == 0, proc.stderr
  assert [c['argv'][3] for c in calls] == ['create']


def test_delete_direct_asks_gcloud_to_confirm(sh):
  proc, calls = sh('delete.sh', env=TPU)
  assert proc.returncode == 0, proc.stderr
  assert argvs(calls) == [['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'exp1', *LOC]]


INSTALL = ("cd ~/effjax && python3 -m pip install -q -e '.[tpu]' && "
           "python3 -c 'import effjax, jax; "
           "print(\"effjax ready, jax\", jax.__version__)'")


def test_setup_copies_the_checkout_to_every_worker_and_installs(sh, tmp_path):
  src = tmp_path / 'src'
  (src / 'effjax').mkdir(parents=True)
  (src / 'setup.cfg').write_text('[metadata]\n')
  (src / 'effjax' / 'main.py').write_text('')
  (src / '.git').mkdir()
  (src / '.git' / 'HEAD').write_text('ref\n')
  proc, calls = sh('setup.sh', f'--src={src}', env=TPU)
  assert proc.returncode == 0, proc.stderr
  tarball = tmp_path / 'effjax-src-exp1.tar.gz'
  assert argvs(calls) == [
      ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', str(tarball), 'exp1:/tmp/effjax-src.tar.gz',
       *LOC, '--worker=all'],
      ssh('all', 'set -e; mkdir -p ~/effjax && tar -C ~/effjax -xzf /tmp/effjax-src.tar.gz && '
          + INSTALL)]
  names = subprocess.run(['tar', '-tzf', str(tarball)], capture_output=True, text=True).stdout
  assert './effjax/main.py' in names and './setup.cfg' in names and '.git' not in names


def test_setup_with_git_clones_on_the_workers(sh):
  proc, calls = sh('setup.sh', '--git=https://example.com/effjax.git', '--ref=v1.2',
                   env={**TPU, 'TPU_PROJECT': 'p-1'})
  assert proc.returncode == 0, proc.stderr
  assert argvs(calls) == [ssh(
      'all', 'set -e; if [ -d ~/effjax/.git ]; then git -C ~/effjax fetch -q origin; else '
      'git clone -q https://example.com/effjax.git ~/effjax; fi && '
      'git -C ~/effjax checkout -q v1.2 && ' + INSTALL,
      loc=[*LOC, '--project=p-1'])]


READ_PID = 'p=$(cat ~/effjax.pid 2>/dev/null || true)'
ALIVE = '[ -n "$p" ] && ps -o args= -p "$p" 2>/dev/null | grep -q effjax.main'


def launch_command(extra=''):
  cmd = ('python3 -m effjax.main --config=configs/default.py --workdir=gs://bucket/runs/a '
         '--config.distributed.initialize=True' + extra)
  return (f'cd ~/effjax || exit 1; {READ_PID}; if {ALIVE}; then echo "$(hostname): effjax is '
          'still running (pid $p); run stop.sh first" >&2; exit 1; fi; echo "=== $(date -u '
          f'+%FT%TZ) launch" >> ~/effjax.log; nohup {cmd} >> ~/effjax.log 2>&1 < /dev/null & '
          'echo $! > ~/effjax.pid; echo "$(hostname): started pid $!, log ~/effjax.log"')


def stop_command(signal_name='TERM', wait=True):
  waiting = f'while {ALIVE}; do sleep 1; done; echo "$(hostname): stopped"; ' if wait else ''
  return (f'{READ_PID}; if {ALIVE}; then kill -{signal_name} $p; echo "$(hostname): sent '
          f'SIG{signal_name} to pid $p"; {waiting}else echo "$(hostname): effjax is not running"; '
          'fi')


STOP = stop_command()


def test_launch_watch_stop_on_all_workers(sh):
  proc, calls = sh('launch.sh', 'configs/default.py', 'gs://bucket/runs/a',
                   '--config.mesh.fsdp=4', '--config.model.name=a b', env=TPU)
  assert proc.returncode == 0, proc.stderr
  assert argvs(calls) == [ssh('all', launch_command(" --config.mesh.fsdp=4 "
                                                    "--config.model.name='a b'"))]
  # The same with --config/--workdir spelled as options.
  proc, calls = sh('launch.sh', '--config=configs/default.py', '--workdir=gs://bucket/runs/a',
                   env=TPU)
  assert argvs(calls) == [ssh('all', launch_command())]

  proc, calls = sh('watch.sh', env=TPU)
  assert argvs(calls) == [ssh('0', 'tail -n 100 -F ~/effjax.log')]
  proc, calls = sh('watch.sh', '--worker=all', '--lines=5', env=TPU)
  assert argvs(calls) == [ssh('all', 'tail -n 5 -F ~/effjax.log')]

  proc, calls = sh('stop.sh', env=TPU)
  assert proc.returncode == 0, proc.stderr
  assert argvs(calls) == [ssh('all', STOP)]
  proc, calls = sh('stop.sh', '--kill', '--no-wait', env=TPU)
  assert argvs(calls) == [ssh('all', stop_command('KILL', wait=False))]


def test_remote_launch_and_stop_commands_work_in_a_shell(sh, tmp_path):
  """What launch.sh and stop.sh send, run here: starts, refuses a second run, SIGTERM stops."""
  home = tmp_path / 'home'
  (home / 'effjax').mkdir(parents=True)
  bin_dir = tmp_path / 'bin'
  (bin_dir / 'python3').write_text(FAKE_TRAINER)
  (bin_dir / 'python3').chmod(0o755)
  env = {**sh.base, 'HOME': str(home)}
  cwd = tmp_path  # not home: the commands must not depend on where they start
  trainer_log = pathlib.Path(str(sh.log) + '.trainer')
  pid = None
  try:
    first = subprocess.run(['bash', '-c', launch_command(' --config.x=1')], env=env, cwd=cwd,
                           capture_output=True, text=True, timeout=10)
    assert first.returncode == 0, first.stderr
    assert 'started pid' in first.stdout
    pid = int((home / 'effjax.pid').read_text())
    for _ in range(50):
      if trainer_log.exists():
        break
      time.sleep(0.05)
    assert trainer_log.read_text().split() == [
        '-m', 'effjax.main', '--config=configs/default.py', '--workdir=gs://bucket/runs/a',
        '--config.distributed.initialize=True', '--config.x=1']
    again = subprocess.run(['bash', '-c', launch_command()], env=env, cwd=cwd, capture_output=True,
                           text=True, timeout=10)
    assert again.returncode == 1 and 'still running' in again.stderr
    stop = subprocess.run(['bash', '-c', STOP], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=10)
    assert stop.returncode == 0, stop.stderr
    assert 'sent SIGTERM' in stop.stdout and 'stopped' in stop.stdout
    assert trainer_log.read_text().splitlines()[-1] == 'TERM'
    assert '=== ' in (home / 'effjax.log').read_text()
    pid = None
    stop = subprocess.run(['bash', '-c', STOP], env=env, cwd=cwd, capture_output=True, text=True)
    assert 'not running' in stop.stdout
  finally:
    if pid is not None:
      try:
        os.kill(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass


def test_dry_run_prints_every_command_and_runs_none(sh, tmp_path):
  proc, calls = sh('create.sh', '--dry-run', '--queued', '--type=v5litepod-16', env=TPU)
  assert proc.returncode == 0, proc.stderr
  assert calls == []
  assert proc.stdout.splitlines() == [
      'gcloud compute tpus queued-resources create exp1 --zone=us-west4-a --node-id=exp1 '
      '--accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite',
      "gcloud compute tpus queued-resources describe exp1 --zone=us-west4-a "
      "--format='value(state.state)'"]

  proc, calls = sh('setup.sh', env={**TPU, 'DRY_RUN': '1'})
  assert proc.returncode == 0, proc.stderr
  assert calls == [] and not (tmp_path / 'effjax-src-exp1.tar.gz').exists()
  lines = proc.stdout.splitlines()
  assert lines[0].startswith(f'tar -C {SCRIPTS.parent} --exclude=.git')
  assert [shlex.split(line) for line in lines[1:]] == [
      ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', str(tmp_path / 'effjax-src-exp1.tar.gz'),
       'exp1:/tmp/effjax-src.tar.gz', *LOC, '--worker=all'],
      ssh('all', 'set -e; mkdir -p ~/effjax && tar -C ~/effjax -xzf /tmp/effjax-src.tar.gz && '
          + INSTALL)]

  for script, args in [('launch.sh', ['configs/default.py', 'gs://bucket/runs/a']),
                       ('stop.sh', []), ('watch.sh', []), ('delete.sh', [])]:
    proc, calls = sh(script, '--dry-run', *args, env=TPU)
    assert proc.returncode == 0, proc.stderr
    assert calls == []
    [line] = proc.stdout.splitlines()
    assert shlex.split(line)[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm',
                                     'delete' if script == 'delete.sh' else 'ssh']
  assert shlex.split(line)[-1] != ''
  proc, _ = sh('launch.sh', '--dry-run', 'configs/default.py', 'gs://bucket/runs/a', env=TPU)
  assert shlex.split(proc.stdout) == ssh('all', launch_command())


@pytest.mark.parametrize('script, args, env, message', [
    ('create.sh', ['--type=v9-8'], TPU,
     "error: unknown accelerator type 'v9-8'; allowed: v4-N"),
    ('create.sh', ['--type=v5litepod-12'], TPU,
     "error: unknown accelerator type 'v5litepod-12'; v5litepod-N needs N one of 1, 4, 8, 16"),
    ('create.sh', ['--type=v4-12'], TPU, "v4-N needs N a multiple of 8 up to 4096"),
    ('create.sh', [], TPU, 'error: no accelerator type: give --type=TYPE or set TPU_TYPE'),
    ('create.sh', ['--type=v4-8'], {'TPU_ZONE': 'us-central2-b'},
     'error: no TPU name: give --name=NAME or set TPU_NAME'),
    ('launch.sh', ['c.py', 'w'], {'TPU_ZONE': 'us-central2-b'}, 'error: no TPU name'),
    ('delete.sh', [], {'TPU_NAME': 'exp1'}, 'error: no zone: give --zone=ZONE or set TPU_ZONE'),
    ('create.sh', ['--type=v4-8', '--name=Bad_Name'], TPU, "error: TPU name 'Bad_Name': must be"),
    ('create.sh', ['--type=v4-8', '--zone=uswest4'], TPU, "error: zone 'uswest4': must look like"),
    ('create.sh', ['--type=v4-8', '--spot', '--preemptible'], TPU,
     'error: --spot and --preemptible exclude each other'),
    ('create.sh', ['--type=v4-8', '--queued', '--preemptible'], TPU,
     'error: --preemptible does not apply to queued resources; use --spot'),
    ('create.sh', ['--type=v4-8', '--runtime=a b'], TPU, "error: runtime version 'a b'"),
    ('stop.sh', ['--bogus'], TPU, "error: unknown option '--bogus'; stop.sh takes"),
    ('stop.sh', ['extra'], TPU, "error: unexpected argument 'extra'"),
    ('create.sh', ['--type=v4-8'], {**TPU, 'TPU_SPOT': 'yes'},
     "error: TPU_SPOT='yes': must be 0 or 1"),
    ('launch.sh', ['configs/default.py'], TPU, 'error: no workdir'),
    ('launch.sh', [], TPU, 'error: no config'),
    ('setup.sh', ['--ref=v1'], TPU, 'error: --ref=v1 needs --git=URL'),
    ('watch.sh', ['--worker=x'], TPU, "error: --worker='x'"),
    ('create.sh', ['--zone'], TPU, 'error: option --zone needs a value'),
    ('slurm_launch.sh', ['--per=socket', 'c.py', 'w'], {}, "error: --per='socket': must be node"),
    ('slurm_launch.sh', ['--nodes=0', 'c.py', 'w'], {}, "error: --nodes='0': must be a positive"),
    ('slurm_launch.sh', ['c.py'], {}, 'error: no workdir'),
    ('slurm_launch.sh', ['--name=x', 'c.py', 'w'], {}, "error: unknown option '--name=x'"),
])
def test_bad_input_exits_with_one_line_and_runs_nothing(sh, script, args, env, message):
  proc, calls = sh(script, *args, env=env)
  assert proc.returncode == 2
  assert calls == []
  assert proc.stdout == ''
  [line] = proc.stderr.splitlines()
  assert line.startswith(f'{script}: error: ') and message in line


# --- Slurm ------------------------------------------------------------------------------------


def test_slurm_submit_then_job_then_tasks(sh, tmp_path):
  """sbatch's --wrap, run as the job would, runs srun; each srun task runs effjax.main."""
  proc, calls = sh('slurm_launch.sh', '--nodes=2', '--gpus-per-node=8', '--partition=gpu',
                   '--time=4:00:00', 'configs/default.py', 'runs/a b', '--config.mesh.fsdp=16')
  assert proc.returncode == 0, proc.stderr
  script = str(SCRIPTS / 'slurm_launch.sh')
  wrap = (f"bash {script} --nodes=2 --gpus-per-node=8 --per=node --python=python -- "
          f"configs/default.py '{tmp_path}/runs/a b' --config.mesh.fsdp=16")
  assert argvs(calls) == [[
      'sbatch', '--job-name=effjax', '--nodes=2', '--ntasks-per-node=1', '--gpus-per-node=8',
      '--output=slurm-%x-%j.out', '--signal=TERM@120', f'--chdir={SCRIPTS.parent}',
      '--partition=gpu', '--time=4:00:00', f'--wrap={wrap}']]

  job_env = {**sh.base, 'SLURM_JOB_ID': '4100', 'SLURM_JOB_NODELIST': 'gpu[07-08]',
             'FAKE_HOSTS': 'gpu07,gpu08'}
  sh.log.unlink()
  job = subprocess.run(['sh', '-c', wrap], env=job_env, capture_output=True, text=True,
                       timeout=20)
  assert job.returncode == 0, job.stderr
  calls = [json.loads(line) for line in sh.log.read_text().splitlines()]
  step = ['srun', '--nodes=2', '--ntasks=2', '--ntasks-per-node=1', '--kill-on-bad-exit=1',
          'bash', script, '--task', '--nodes=2', '--gpus-per-node=8', '--per=node',
          '--python=python', '--', 'configs/default.py', f'{tmp_path}/runs/a b',
          '--config.mesh.fsdp=16']
  assert argvs(calls) == [['scontrol', 'show', 'hostnames', 'gpu[07-08]'], step]
  assert calls[1]['env'] == {'JAX_COORDINATOR_ADDRESS': f'gpu07:{61440 + 4100 % 4096}',
                             'EFFJAX_NUM_PROCESSES': '2'}

  sh.log.unlink()
  task_env = {**job_env, **calls[1]['env'], 'SLURM_PROCID': '1', 'SLURM_LOCALID': '0'}
  task = subprocess.run(step[5:], env=task_env, capture_output=True, text=True, timeout=20)
  assert task.returncode == 0, task.stderr
  [call] = [json.loads(line) for line in sh.log.read_text().splitlines()]
  assert argvs([call]) == [['python', '-m', 'effjax.main', '--config=configs/default.py',
                            f'--workdir={tmp_path}/runs/a b', '--config.mesh.fsdp=16',
                            '--config.distributed.initialize=True']]
  assert call['env'] == {'JAX_COORDINATOR_ADDRESS': 'gpu07:61444', 'EFFJAX_NUM_PROCESSES': '2',
                         'EFFJAX_PROCESS_ID': '1', 'JAX_LOCAL_DEVICE_IDS': '0,1,2,3,4,5,6,7'}
  assert call['cwd'] == str(SCRIPTS.parent)


def test_slurm_one_process_per_gpu_inside_an_allocation(sh):
  env = {'SLURM_JOB_ID': '77', 'SLURM_JOB_NODELIST': 'a1,b2', 'SLURM_JOB_NUM_NODES': '2',
         'SLURM_GPUS_ON_NODE': '4', 'FAKE_HOSTS': 'a1,b2'}
  proc, calls = sh('slurm_launch.sh', '--per=gpu', '--port=12345', '/abs/c.py', '/shared/w',
                   env=env)
  assert proc.returncode == 0, proc.stderr
  assert argvs(calls)[1][:5] == ['srun', '--nodes=2', '--ntasks=8', '--ntasks-per-node=4',
                                 '--kill-on-bad-exit=1']
  assert calls[1]['env'] == {'JAX_COORDINATOR_ADDRESS': 'a1:12345', 'EFFJAX_NUM_PROCESSES': '8'}
  task = argvs(calls)[1][5:]
  assert task[2:7] == ['--task', '--nodes=2', '--gpus-per-node=4', '--per=gpu', '--python=python']
  proc, calls = sh(*task[1:], env={**env, **calls[1]['env'], 'SLURM_PROCID': '6',
                                   'SLURM_LOCALID': '2'})
  assert proc.returncode == 0, proc.stderr
  assert calls[0]['env']['EFFJAX_PROCESS_ID'] == '6'
  assert calls[0]['env']['JAX_LOCAL_DEVICE_IDS'] == '2'


def test_slurm_dry_run_prints_and_runs_nothing(sh):
  proc, calls = sh('slurm_launch.sh', '--dry-run', '--nodes=2', '/abs/c.py', '/shared/w')
  assert proc.returncode == 0, proc.stderr
  assert calls == []
  [line] = proc.stdout.splitlines()
  assert shlex.split(line)[:3] == ['sbatch', '--job-name=effjax', '--nodes=2']

  proc, calls = sh('slurm_launch.sh', '--per=gpu', '/abs/c.py', '/shared/w',
                   env={'DRY_RUN': '1', 'SLURM_JOB_ID': '5', 'SLURM_JOB_NODELIST': 'n[1-2]',
                        'SLURM_JOB_NUM_NODES': '2'})
  assert proc.returncode == 0, proc.stderr
  assert calls == []
  lines = proc.stdout.splitlines()
  assert lines[0] == "scontrol show hostnames 'n[1-2]'"
  assert lines[1].startswith('JAX_COORDINATOR_ADDRESS="$(scontrol show hostnames '
                             '"$SLURM_JOB_NODELIST" | head -n 1):61445" EFFJAX_NUM_PROCESSES=16 '
                             'srun --nodes=2 --ntasks=16 --ntasks-per-node=8 ')


def test_scripts_are_executable_and_help_exits_zero(sh):
  for script in ('create.sh', 'setup.sh', 'launch.sh', 'watch.sh', 'stop.sh', 'delete.sh',
                 'slurm_launch.sh'):
    assert os.stat(SCRIPTS / script).st_mode & stat.S_IXUSR, script
    proc, calls = sh(script, '--help')
    assert proc.returncode == 0 and proc.stdout.startswith('usage: '), script
    assert calls == []
