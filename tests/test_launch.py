"""Tests of launch/tpu_vm.py and launch/gpu.py: the commands their `--dry_run` prints, that they run
exactly those commands (through stand-in gcloud/ssh/python executables that log their argv), and
that bad inputs exit with status 2 and say what is wrong. Needs neither gcloud nor ssh.

The scripts are copied into a throwaway repository with a tiny config, so the tests depend on no
other file of the checkout and on no tool on PATH.
"""

from __future__ import annotations

import json
import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest

_SRC = pathlib.Path(__file__).resolve().parent.parent
_SHARED = '/gcs/ppf-bucket/runs/xl2'  # the bucket as `setup --gcs_bucket` mounts it.


@pytest.fixture
def repo(tmp_path: pathlib.Path) -> pathlib.Path:
  root = tmp_path / 'repo'
  (root / 'launch').mkdir(parents=True)
  for name in ('common.py', 'tpu_vm.py', 'gpu.py'):
    shutil.copy(_SRC / 'launch' / name, root / 'launch' / name)
  (root / 'requirements.txt').write_text('jax==9.8.7\nflax==1.0\n')
  (root / 'configs').mkdir()
  (root / 'configs' / 'tiny.py').write_text('def get_config(arg=None):\n  return None\n')
  (root / 'ppflow_jax').mkdir()
  (root / 'ppflow_jax' / '__init__.py').write_text('')
  # The only PATH entry: no gcloud, ssh or srun unless a test adds one; `env` starts local runs.
  (root / 'bin').mkdir()
  (root / 'bin' / 'env').symlink_to(shutil.which('env'))
  return root


def launch(repo: pathlib.Path, script: str, *args: str):
  """Runs launch/<script> in `repo` -> (exit status, commands as argv lists, stdout, stderr)."""
  p = subprocess.run([sys.executable, str(repo / 'launch' / script), *args], cwd=repo,
                     capture_output=True, text=True, env={'PATH': str(repo / 'bin')}, timeout=60)
  commands = [shlex.split(line) for line in p.stdout.splitlines() if line and line[0] != '#']
  return p.returncode, commands, p.stdout, p.stderr


def fake_tool(repo: pathlib.Path, name: str) -> pathlib.Path:
  """Puts a `name` on PATH that appends its argv, cwd and XLA env vars to a JSON-lines log."""
  log = repo / f'{name}.log'
  tool = repo / 'bin' / name
  tool.write_text(
      f'#!{sys.executable}\nimport json, os, sys\n'
      f'with open({str(log)!r}, "a") as f:\n'
      '  f.write(json.dumps(dict(argv=sys.argv[1:], cwd=os.getcwd(), env={k: v for k, v in '
      'os.environ.items() if k.startswith(("XLA", "CUDA"))})) + "\\n")\n')
  tool.chmod(0o755)
  return log


def records(log: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in log.read_text().splitlines()]


def tpu_run(*extra: str, accelerator: str = 'v5p-64', workdir: str = _SHARED,
            config: str = 'configs/tiny.py') -> list[str]:
  return ['run', '--name=ppf', '--zone=us-east5-a', f'--accelerator_type={accelerator}',
          f'--config={config}', f'--workdir={workdir}', *extra]


def remote_main(gcloud_argv: list[str]) -> list[str]:
  """The argv of the `ppflow_jax.main` process inside a `gcloud ... ssh --command=...`."""
  (command,) = [a[len('--command='):] for a in gcloud_argv if a.startswith('--command=')]
  prefix = 'cd ppflow_jax && '
  assert command.startswith(prefix), command
  return shlex.split(command[len(prefix):])


# --- tpu_vm.py ---------------------------------------------------------------------------------

@pytest.mark.parametrize('accelerator,workers', [
    ('v4-8', 1), ('v4-32', 4), ('v3-32', 4), ('v5p-64', 8), ('v5litepod-8', 1),
    ('v5litepod-16', 4), ('v6e-4', 1), ('v6e-256', 64)])
def test_tpu_create_counts_workers(repo, accelerator, workers):
  rc, cmds, out, _ = launch(repo, 'tpu_vm.py', 'create', '--name=ppf', '--zone=us-central2-b',
                            f'--accelerator_type={accelerator}', '--dry_run')
  assert rc == 0
  assert f'({workers} worker VMs)' in out
  assert cmds == [['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'ppf', '--zone=us-central2-b',
                   f'--accelerator-type={accelerator}',
                   f'--version={cmds[0][-1].split("=")[1]}']]


def test_tpu_create_spot_queued_and_runtime(repo):
  rc, cmds, _, _ = launch(repo, 'tpu_vm.py', 'create', '--name=ppf', '--zone=us-east5-a',
                          '--accelerator_type=v5p-64', '--spot', '--queued', '--project=proj',
                          '--dry_run')
  assert rc == 0
  assert cmds == [['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'ppf',
                   '--zone=us-east5-a', '--project=proj', '--node-id=ppf',
                   '--accelerator-type=v5p-64', '--runtime-version=v2-alpha-tpuv5', '--spot']]
  _, cmds, _, _ = launch(repo, 'tpu_vm.py', 'create', '--name=ppf', '--zone=us-east5-a',
                         '--accelerator_type=v6e-16', '--version=my-image', '--dry_run')
  assert '--version=my-image' in cmds[0] and '--spot' not in cmds[0]


def test_tpu_setup_copies_checkout_and_installs_pinned_jax(repo):
  rc, cmds, _, _ = launch(repo, 'tpu_vm.py', 'setup', '--name=ppf', '--zone=us-east5-a',
                          '--dry_run')
  assert rc == 0
  tar, scp, ssh = cmds
  assert tar[:2] == ['tar', 'czf'] and tar[-3:] == ['ppflow_jax', 'configs', 'requirements.txt']
  assert tar[tar.index('-C') + 1] == str(repo)
  assert scp[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp']
  assert scp[5] == tar[2] and scp[6] == 'ppf:ppflow_jax_bundle.tgz' and '--worker=all' in scp
  assert ssh[4:6] == ['ssh', 'ppf'] and '--worker=all' in ssh
  remote = next(a for a in ssh if a.startswith('--command='))
  assert 'tar xzf ppflow_jax_bundle.tgz -C ppflow_jax' in remote
  assert '.venv/bin/pip install -q -r requirements.txt' in remote
  assert '"jax[tpu]==9.8.7"' in remote  # the pin of requirements.txt


def test_tpu_setup_mounts_bucket_on_every_worker(repo):
  rc, cmds, out, _ = launch(repo, 'tpu_vm.py', 'setup', '--name=ppf', '--zone=us-east5-a',
                            '--gcs_bucket=ppf-bucket', '--dry_run')
  assert rc == 0 and len(cmds) == 4  # tar, scp, install, mount.
  mount = cmds[3]
  assert mount[4:6] == ['ssh', 'ppf'] and '--worker=all' in mount
  remote = next(a for a in mount if a.startswith('--command='))[len('--command='):]
  # gcsfuse comes from Google's apt repository, only where it is missing.
  assert remote.startswith('if ! command -v gcsfuse > /dev/null; then ')
  assert ('https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main' in remote
          and 'sudo tee /etc/apt/sources.list.d/gcsfuse.list' in remote)
  assert 'sudo apt-get install -y -qq gcsfuse; fi' in remote
  # Mounted once, by the login user, with directories that exist only as object prefixes, and
  # directory renames allowed (orbax renames each finished checkpoint).
  assert remote.endswith('if ! mountpoint -q /gcs/ppf-bucket; then sudo mkdir -p /gcs/ppf-bucket '
                         '&& sudo chown "$(id -u):$(id -g)" /gcs/ppf-bucket && '
                         'gcsfuse --implicit-dirs --rename-dir-limit=100000 ppf-bucket '
                         '/gcs/ppf-bucket; fi')
  assert 'mount gs://ppf-bucket at /gcs/ppf-bucket on every worker' in out
  _, cmds, _, _ = launch(repo, 'tpu_vm.py', 'setup', '--name=ppf', '--zone=us-east5-a',
                         '--gcs_bucket=ppf-bucket', '--mount_point=/mnt/b', '--dry_run')
  assert cmds[3][-1].endswith(' ppf-bucket /mnt/b; fi')
  _, cmds, _, _ = launch(repo, 'tpu_vm.py', 'setup', '--name=ppf', '--zone=us-east5-a',
                         '--dry_run')
  assert len(cmds) == 3 and 'gcsfuse' not in ' '.join(cmds[2])


def test_tpu_setup_from_git(repo):
  rc, cmds, _, _ = launch(repo, 'tpu_vm.py', 'setup', '--name=ppf', '--zone=us-east5-a',
                          '--repo_url=https://github.com/me/ppflow_jax', '--branch=v1',
                          '--dry_run')
  assert rc == 0 and len(cmds) == 1 and '--worker=all' in cmds[0]
  assert ('git clone --depth=1 --branch=v1 https://github.com/me/ppflow_jax ppflow_jax'
          in cmds[0][-1])
  rc, _, _, err = launch(repo, 'tpu_vm.py', 'setup', '--name=ppf', '--zone=us-east5-a',
                         '--repo_url=not a url', '--dry_run')
  assert rc == 2 and '--repo_url' in err


def test_tpu_run_on_every_worker(repo):
  rc, cmds, out, _ = launch(repo, 'tpu_vm.py', *tpu_run('--mode=sample', '--env', 'A=1',
                                                        '--dry_run', '--',
                                                        '--config.train.steps=7'))
  assert rc == 0
  (ssh,) = cmds
  assert ssh[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'ppf']
  assert '--worker=all' in ssh and '--zone=us-east5-a' in ssh
  assert remote_main(ssh) == ['env', 'A=1', '.venv/bin/python', '-m', 'ppflow_jax.main',
                              '--config=configs/tiny.py', f'--workdir={_SHARED}', '--mode=sample',
                              '--config.train.steps=7']
  assert 'all 8 worker(s)' in out and 'dry run' in out


def test_tpu_run_detached(repo):
  _, cmds, _, _ = launch(repo, 'tpu_vm.py', *tpu_run('--detach', '--dry_run'))
  main = remote_main(cmds[0])
  assert main[:2] == ['nohup', '.venv/bin/python'] and '--config=configs/tiny.py' in main
  assert main[-6:] == ['>', 'ppflow_run.log', '2>&1', '<', '/dev/null', '&']


def test_tpu_run_config_given_from_elsewhere_is_made_repo_relative(repo):
  rc, cmds, _, _ = launch(repo, 'tpu_vm.py',
                          *tpu_run('--dry_run', config=f'{repo}/configs/tiny.py:small'))
  assert rc == 0 and '--config=configs/tiny.py:small' in remote_main(cmds[0])


@pytest.mark.parametrize('args,message', [
    (tpu_run('--dry_run', workdir='ckpt'), 'is a relative path, but v5p-64 has 8 worker VMs'),
    (tpu_run('--dry_run', workdir='gs://'), 'no bucket name; expected gs://BUCKET/path'),
    (tpu_run('--dry_run', accelerator='v4-8', workdir='gs://B_x/run'), "bucket name 'B_x'"),
    (tpu_run('--dry_run', workdir='s3://b/x'), 'expected a file system path or a gs:// URL'),
    (['setup', '--name=ppf', '--zone=us-east5-a', '--gcs_bucket=gs://b', '--dry_run'],
     "bucket name 'gs://b' is not valid"),
    (['setup', '--name=ppf', '--zone=us-east5-a', '--gcs_bucket=My_Bucket', '--dry_run'],
     'is not valid'),
    (['setup', '--name=ppf', '--zone=us-east5-a', '--gcs_bucket=' + 'a' * 64, '--dry_run'],
     'is not valid'),
    (['setup', '--name=ppf', '--zone=us-east5-a', '--gcs_bucket=bk1', '--mount_point=gcs/b1',
      '--dry_run'], 'expected an absolute directory path'),
    (['setup', '--name=ppf', '--zone=us-east5-a', '--gcs_bucket=bk1', '--mount_point=/a/../b',
      '--dry_run'], 'expected an absolute directory path'),
    (['setup', '--name=ppf', '--zone=us-east5-a', '--mount_point=/gcs/b', '--dry_run'],
     'give --gcs_bucket too'),
    (['run', '--name=ppf', '--zone=us-east5-a', '--accelerator_type=v4-8',
      '--config=configs/missing.py', '--workdir=w', '--dry_run'],
     "'configs/missing.py': no such file"),
    (['delete', '--name=ppf', '--zone=us-east5', '--dry_run'], 'is not a zone name'),
    (['delete', '--name=Bad_Name', '--zone=us-east5-a', '--dry_run'], 'TPU names'),
    (['create', '--name=ppf', '--zone=us-east5-a', '--accelerator_type=v5p-12', '--dry_run'],
     'multiples of 8'),
    (['create', '--name=ppf', '--zone=us-east5-a', '--accelerator_type=v6e-12', '--dry_run'],
     'count chips'),
    (['create', '--name=ppf', '--zone=us-east5-a', '--accelerator_type=h100-8', '--dry_run'],
     'expected FAMILY-SIZE'),
    (tpu_run('--dry_run', '--', '--workdir=/x'), 'set by the launcher'),
    (tpu_run('--dry_run', '--', 'steps=3'), 'is not a flag'),
    (['delete', '--name=ppf', '--zone=us-east5-a', '--dry_run', '--', '--config.x=1'],
     'only for `run`'),
    (tpu_run('--dry_run', '--env', 'NOEQUALS'), 'NAME=VALUE'),
])
def test_tpu_bad_inputs(repo, args, message):
  rc, cmds, _, err = launch(repo, 'tpu_vm.py', *args)
  assert rc == 2 and not cmds
  assert err.startswith('error: ') and message in err, err


def test_tpu_local_workdir_is_fine_on_one_host(repo):
  rc, cmds, out, _ = launch(repo, 'tpu_vm.py', *tpu_run('--dry_run', accelerator='v4-8',
                                                         workdir='runs/x'))
  assert rc == 0 and '--workdir=runs/x' in remote_main(cmds[0])
  assert 'shared file system' not in out


def test_tpu_multi_host_notes_shared_workdir_and_data(repo):
  rc, _, out, _ = launch(repo, 'tpu_vm.py', *tpu_run(
      '--dry_run', '--', '--config.data.path=/gcs/ppf-bucket/latents/in256_train'))
  assert rc == 0
  assert f'workdir {_SHARED} must be the same shared file system on every worker' in out
  assert ('every worker reads --config.data.path=/gcs/ppf-bucket/latents/in256_train' in out)


@pytest.mark.parametrize('script,args', [
    ('tpu_vm.py', tpu_run('--dry_run', '--', '--config.data.path=gs://ppf-bucket/lat',
                          workdir='gs://ppf-bucket/runs/xl2')),
    ('gpu.py', ['--config=configs/tiny.py', '--workdir=gs://ppf-bucket/runs/xl2', '--dry_run',
                '--', '--config.data.path=gs://ppf-bucket/lat']),
])
def test_gcs_workdir_and_data_are_passed_to_main(repo, script, args):
  """main reads and writes gs:// natively (paths.py, orbax), so no mount is needed (and no
  reminder that one is)."""
  rc, cmds, out, err = launch(repo, script, *args)
  assert rc == 0, err
  line = ' '.join(' '.join(c) for c in cmds)
  assert 'gs://ppf-bucket/runs/xl2' in line and '--config.data.path=gs://ppf-bucket/lat' in line
  assert 'shared' not in out, out


def test_tpu_config_outside_repo_is_refused(repo, tmp_path):
  outside = tmp_path / 'other.py'
  outside.write_text('')
  rc, _, _, err = launch(repo, 'tpu_vm.py', *tpu_run('--dry_run', config=str(outside)))
  assert rc == 2 and 'outside the repository' in err


def test_tpu_without_gcloud_fails_clearly(repo):
  rc, _, _, err = launch(repo, 'tpu_vm.py', 'delete', '--name=ppf', '--zone=us-east5-a')
  assert rc == 2 and '`gcloud` was not found' in err and '--dry_run' in err


def test_tpu_runs_exactly_the_printed_commands(repo):
  log = fake_tool(repo, 'gcloud')
  for args in (tpu_run('--', '--config.seed=3'),
               ['delete', '--name=ppf', '--zone=us-east5-a', '--queued']):
    rc, cmds, out, _ = launch(repo, 'tpu_vm.py', *args)
    assert rc == 0 and 'dry run' not in out
    assert records(log)[-1]['argv'] == cmds[0][1:]
  assert len(records(log)) == 2
  assert '--config.seed=3' in remote_main(['gcloud', *records(log)[0]['argv']])
  assert records(log)[1]['argv'][2:4] == ['queued-resources', 'delete']


def test_tpu_stops_at_first_failing_command(repo):
  log = fake_tool(repo, 'gcloud')
  (repo / 'bin' / 'tar').write_text('#!/bin/sh\nexit 3\n')
  (repo / 'bin' / 'tar').chmod(0o755)
  rc, _, _, err = launch(repo, 'tpu_vm.py', 'setup', '--name=ppf', '--zone=us-east5-a')
  assert rc == 3 and 'exit status 3' in err and not log.exists()


# --- gpu.py ------------------------------------------------------------------------------------

def gpu(*extra: str, workdir: str = '/shared/ckpt') -> list[str]:
  return ['--config=configs/tiny.py', f'--workdir={workdir}', *extra]


def test_gpu_single_host(repo):
  rc, cmds, _, _ = launch(repo, 'gpu.py', *gpu('--dry_run', '--', '--config.train.steps=5'))
  assert rc == 0
  (cmd,) = cmds
  assert cmd[:3] == ['cd', str(repo), '&&']
  assert cmd[3:6] == ['env', 'XLA_PYTHON_CLIENT_MEM_FRACTION=0.9',
                      'XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true']
  assert cmd[6:] == [sys.executable, '-m', 'ppflow_jax.main', '--config=configs/tiny.py',
                     '--workdir=/shared/ckpt', '--mode=train', '--config.train.steps=5']


def test_gpu_hosts_over_ssh(repo):
  rc, cmds, out, _ = launch(repo, 'gpu.py', *gpu('--hosts=n0,me@n1,n2', '--mode=sample_fid',
                                                 '--dry_run'))
  assert rc == 0 and len(cmds) == 3
  for i, (cmd, host) in enumerate(zip(cmds, ['n0', 'me@n1', 'n2'])):
    assert cmd[:4] == ['ssh', '-o', 'BatchMode=yes', host]
    remote = shlex.split(cmd[4])
    assert remote[:3] == ['cd', str(repo), '&&']
    assert remote[-6:] == ['--config=configs/tiny.py', '--workdir=/shared/ckpt',
                           '--mode=sample_fid', '--coordinator_address=n0:12345',
                           '--num_processes=3', f'--process_id={i}']
  assert 'coordinator n0:12345' in out


def test_gpu_slurm_line(repo):
  rc, cmds, _, _ = launch(repo, 'gpu.py', *gpu('--slurm', '--num_processes=4', '--port=2222',
                                               '--gpus=0,1', '--dry_run'))
  assert rc == 0
  (cmd,) = cmds
  assert cmd[:5] == ['srun', '--nodes=4', '--ntasks-per-node=1', 'bash', '-c']
  script = cmd[5]
  assert 'CUDA_VISIBLE_DEVICES=0,1' in script and '--config=configs/tiny.py' in script
  assert script.endswith('--coordinator_address="$(scontrol show hostnames "$SLURM_JOB_NODELIST" '
                         '| head -n1):2222" --num_processes="$SLURM_NTASKS" '
                         '--process_id="$SLURM_PROCID"')


def test_gpu_manual_per_node_commands(repo):
  rc, cmds, _, _ = launch(repo, 'gpu.py', *gpu('--num_processes=3', '--coordinator_address=h:9',
                                               '--remote_dir=/nfs/ppf', '--dry_run'))
  assert rc == 0
  assert [c[:3] for c in cmds] == [['cd', '/nfs/ppf', '&&']] * 3
  assert [c[-1] for c in cmds] == ['--process_id=0', '--process_id=1', '--process_id=2']
  assert all('--coordinator_address=h:9' in c and '--num_processes=3' in c for c in cmds)
  _, cmds, _, _ = launch(repo, 'gpu.py', *gpu('--num_processes=3', '--coordinator_address=h:9',
                                              '--process_id=2', '--dry_run'))
  assert len(cmds) == 1 and cmds[0][-1] == '--process_id=2'


@pytest.mark.parametrize('args,message', [
    (gpu('--hosts=a,b,c', '--num_processes=2', '--dry_run'), 'names 3 hosts; they must match'),
    (gpu('--hosts=a,b,a', '--dry_run'), "lists ['a'] more than once"),
    (gpu('--hosts=a,b', '--dry_run', workdir='ckpt'), 'is a relative path, but 2 processes'),
    (gpu('--slurm', '--num_processes=2', '--dry_run', workdir='ckpt'), 'relative path'),
    (gpu('--hosts=a,b', '--slurm', '--dry_run'), 'exclude each other'),
    (gpu('--num_processes=2', '--dry_run'), 'needs --coordinator_address'),
    (gpu('--num_processes=2', '--coordinator_address=h:1'), 'only prints the per-node commands'),
    (gpu('--num_processes=2', '--coordinator_address=h:1', '--process_id=2', '--dry_run'),
     'must be in [0, 1]'),
    (gpu('--hosts=a,b', '--process_id=0', '--dry_run'), '--process_id is only for'),
    (gpu('--hosts=a,b', '--coordinator_address=a', '--dry_run'), 'expected HOST:PORT'),
    (gpu('--num_processes=0', '--dry_run'), 'must be at least 1'),
    (gpu('--mem_fraction=1.5', '--dry_run'), 'must be in (0, 1]'),
    (gpu('--gpus=0;1', '--dry_run'), 'expected GPU indices'),
    (['--config=configs/nope.py', '--workdir=/w', '--dry_run'], 'no such file'),
    (gpu('--dry_run', workdir='s3://b/x'), 'expected a file system path'),
    (gpu('--dry_run', '--', '--process_id=1'), 'set by the launcher'),
])
def test_gpu_bad_inputs(repo, args, message):
  rc, cmds, _, err = launch(repo, 'gpu.py', *args)
  assert rc == 2 and not cmds
  assert err.startswith('error: ') and message in err, err


def test_gpu_without_ssh_fails_clearly(repo):
  rc, _, _, err = launch(repo, 'gpu.py', *gpu('--hosts=a,b'))
  assert rc == 2 and '`ssh` was not found' in err


def test_gpu_launches_all_hosts_over_ssh(repo):
  log = fake_tool(repo, 'ssh')
  rc, cmds, _, _ = launch(repo, 'gpu.py', *gpu('--hosts=a,b'))
  assert rc == 0
  got = sorted((r['argv'] for r in records(log)), key=lambda argv: argv[3])
  assert got == [c[1:] for c in cmds]


def test_gpu_local_run_sets_environment(repo):
  log = fake_tool(repo, 'python')
  rc, _, _, _ = launch(repo, 'gpu.py', *gpu(f'--python={repo}/bin/python', '--gpus=1,3',
                                            '--mem_fraction=0.75', '--xla_flags=--xla_foo=1'))
  assert rc == 0
  (r,) = records(log)
  assert r['cwd'] == str(repo)
  assert r['env'] == {'XLA_PYTHON_CLIENT_MEM_FRACTION': '0.75', 'XLA_FLAGS': '--xla_foo=1',
                      'CUDA_VISIBLE_DEVICES': '1,3'}
  assert r['argv'] == ['-m', 'ppflow_jax.main', '--config=configs/tiny.py',
                       '--workdir=/shared/ckpt', '--mode=train']


def test_gpu_failure_of_one_host_is_reported(repo):
  (repo / 'bin' / 'ssh').write_text('#!/bin/sh\ncase "$3" in b) exit 5;; esac\n')
  (repo / 'bin' / 'ssh').chmod(0o755)
  rc, _, _, err = launch(repo, 'gpu.py', *gpu('--hosts=a,b'))
  assert rc == 5 and 'process 1 failed with exit status 5' in err


@pytest.mark.parametrize('environ, devices, want', [
    ({}, (), False),                                              # CPU / GPU host
    ({'TPU_WORKER_HOSTNAMES': 'a,b'}, (), True),
    ({'TPU_HOST_BOUNDS': '1,1,2'}, ('/dev/accel0',), True),
    ({'MEGASCALE_NUM_SLICES': '2'}, (), True),
    ({}, ('/dev/accel0',), True),                                 # plain TPU VM: ask the metadata
    ({}, ('/dev/vfio/0',), True),
    ({'TPU_WORKER_HOSTNAMES': 'localhost'}, ('/dev/accel0',), False),  # says one host
    ({'TPU_HOST_BOUNDS': '1,1,1'}, ('/dev/accel0',), False),
])
def test_tpu_multi_host_detection(environ, devices, want):
  from ppflow_jax import main  # pylint: disable=g-import-not-at-top
  assert main.tpu_multi_host(environ, exists=lambda p: p in devices) == want
