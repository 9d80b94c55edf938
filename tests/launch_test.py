"""The Cloud TPU launch scripts (launch/*.sh): their --dry-run commands, their errors, shellcheck.

The scripts run with a PATH that holds only bash, git and two coreutils, so no gcloud: a dry run
must print the commands without it. The command run.sh sends to the workers is also run here, in
a stand-in home directory with a fake Python, to check what a worker does with it.
"""

import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import tempfile
import textwrap
import time

from absl.testing import absltest, parameterized

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = ('create', 'setup', 'run', 'logs', 'fetch', 'delete')
TPU = ('--name=ddpm-v4', '--zone=us-central2-b')
# What each script needs besides the TPU: enough to get as far as needing the name.
REQUIRED = {'create': ('--accelerator-type=v4-8',), 'run': ('--config=c', '--workdir=gs://b/w')}
SETTINGS = (
    'TPU_NAME',
    'ZONE',
    'PROJECT',
    'ACCELERATOR_TYPE',
    'RUNTIME_VERSION',
    'REMOTE_DIR',
    'PYTHON_VERSION',
    'LOG_FILE',
)
# The only programs the scripts may call (cat prints --help).
TOOLS = ('bash', 'cat', 'dirname', 'git')
GCLOUD_TPU = ['gcloud', 'compute', 'tpus']
GCLOUD_STORAGE_RSYNC = ['gcloud', 'storage', 'rsync', '--recursive']


_tmp = None


def setUpModule():
    global _tmp, TMP_DIR, TOOL_DIR
    _tmp = tempfile.TemporaryDirectory()
    TMP_DIR = pathlib.Path(_tmp.name)
    TOOL_DIR = TMP_DIR / 'bin'
    TOOL_DIR.mkdir()
    for tool in TOOLS:
        (TOOL_DIR / tool).symlink_to(shutil.which(tool))
    (TMP_DIR / 'tmp').mkdir()


def tearDownModule():
    _tmp.cleanup()


def launch(script, *args, env=None):
    """Runs launch/<script>.sh with no gcloud on PATH and none of the settings in the env."""
    base = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    base.update(PATH=str(TOOL_DIR), TMPDIR=str(TMP_DIR / 'tmp'))
    return subprocess.run(
        [str(REPO / 'launch' / f'{script}.sh'), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


def dry_run(script, *args, env=None) -> list[list[str]]:
    """The commands a dry run prints, one per line, each split back into its words."""
    proc = launch(script, '--dry-run', *args, env=env)  # first: run.sh passes on what follows --
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines()]


def flag(cmd: list[str], name: str) -> str:
    """The value of the one `name=VALUE` word in a command."""
    (value,) = [w.split('=', 1)[1] for w in cmd if w.startswith(name + '=')]
    return value


def main_args(remote: str) -> list[str]:
    """The arguments `python -m diffusion_jax.main` gets in the workers' command."""
    words = shlex.split(remote)
    start = words.index('diffusion_jax.main') + 1
    return words[start : words.index('>', start)]


class DryRunTest(parameterized.TestCase):
    def test_no_gcloud_on_the_scripts_path(self):
        self.assertIsNone(shutil.which('gcloud', path=str(TOOL_DIR)))

    def test_create_asks_for_the_name_zone_type_and_spot_capacity(self):
        (cmd,) = dry_run('create', *TPU, '--accelerator-type=v4-32', '--spot')
        self.assertEqual(
            cmd,
            [
                *GCLOUD_TPU,
                'tpu-vm',
                'create',
                'ddpm-v4',
                '--zone=us-central2-b',
                '--accelerator-type=v4-32',
                '--version=tpu-ubuntu2204-base',
                '--spot',
            ],
        )

    def test_create_without_spot_asks_for_on_demand_capacity(self):
        (cmd,) = dry_run('create', *TPU, '--accelerator-type=v4-8')
        self.assertEqual(cmd[3:6], ['tpu-vm', 'create', 'ddpm-v4'])
        self.assertNotIn('--spot', cmd)

    @parameterized.named_parameters(('on_demand', ()), ('spot', ('--spot',)))
    def test_queued_create_goes_through_a_queued_resource_of_the_same_name(self, spot):
        (cmd,) = dry_run('create', *TPU, '--accelerator-type=v5p-8', '--queued', *spot)
        self.assertEqual(cmd[:6], [*GCLOUD_TPU, 'queued-resources', 'create', 'ddpm-v4'])
        self.assertEqual(flag(cmd, '--node-id'), 'ddpm-v4')
        self.assertEqual(flag(cmd, '--zone'), 'us-central2-b')
        self.assertEqual(flag(cmd, '--accelerator-type'), 'v5p-8')
        self.assertEqual(flag(cmd, '--runtime-version'), 'v2-alpha-tpuv5')
        self.assertEqual('--spot' in cmd, bool(spot))

    @parameterized.parameters(
        ('v3-8', 'tpu-ubuntu2204-base'),
        ('v4-32', 'tpu-ubuntu2204-base'),
        ('v5litepod-16', 'v2-alpha-tpuv5-lite'),
        ('v5p-8', 'v2-alpha-tpuv5'),
        ('v6e-8', 'v2-alpha-tpuv6e'),
    )
    def test_the_runtime_version_defaults_to_googles_choice_for_the_type(self, type_, version):
        (cmd,) = dry_run('create', *TPU, f'--accelerator-type={type_}')
        self.assertEqual(flag(cmd, '--version'), version)
        (cmd,) = dry_run('create', *TPU, f'--accelerator-type={type_}', '--runtime-version=v2')
        self.assertEqual(flag(cmd, '--version'), 'v2')

    def test_flags_override_the_environment(self):
        env = {
            'TPU_NAME': 'env-tpu',
            'ZONE': 'europe-west4-a',
            'ACCELERATOR_TYPE': 'v3-8',
            'RUNTIME_VERSION': 'env-version',
            'PROJECT': 'env-project',
        }
        (cmd,) = dry_run('create', env=env)
        self.assertEqual(cmd[5], 'env-tpu')
        self.assertEqual(
            cmd[6:],
            [
                '--zone=europe-west4-a',
                '--project=env-project',
                '--accelerator-type=v3-8',
                '--version=env-version',
            ],
        )
        # Both spellings of a flag with a value: --flag=VALUE and --flag VALUE.
        flags = ['--name=flag-tpu', '--zone', 'us-east1-d', '--project=flag-project']
        flags += ['--accelerator-type', 'v2-8', '--runtime-version=flag-version']
        (cmd,) = dry_run('create', *flags, env=env)
        self.assertEqual(cmd[5], 'flag-tpu')
        self.assertEqual(
            cmd[6:],
            [
                '--zone=us-east1-d',
                '--project=flag-project',
                '--accelerator-type=v2-8',
                '--version=flag-version',
            ],
        )

    def test_setup_copies_the_committed_code_to_all_workers_and_installs_jax_tpu(self):
        archive, scp, ssh = dry_run('setup', *TPU)
        tarball = TMP_DIR / 'tmp' / 'diffusion_jax-ddpm-v4.tar.gz'
        self.assertEqual(archive[:4], ['git', '-C', str(REPO), 'archive'])
        self.assertEqual(flag(archive, '--output'), str(tarball))
        self.assertEqual(archive[-1], 'HEAD')
        self.assertFalse(tarball.exists(), 'a dry run must not pack anything')
        self.assertEqual(
            scp,
            [
                *GCLOUD_TPU,
                'tpu-vm',
                'scp',
                str(tarball),
                'ddpm-v4:diffusion_jax.tar.gz',
                '--zone=us-central2-b',
                '--worker=all',
            ],
        )
        self.assertEqual(ssh[:6], [*GCLOUD_TPU, 'tpu-vm', 'ssh', 'ddpm-v4'])
        self.assertIn('--zone=us-central2-b', ssh)
        self.assertIn('--worker=all', ssh)
        remote = flag(ssh, '--command')
        self.assertIn('tar -xzf ~/diffusion_jax.tar.gz -C ~/diffusion_jax;', remote)
        self.assertIn('--python 3.12 ~/diffusion_jax-venv', remote)
        self.assertIn(
            'pip install -q --python ~/diffusion_jax-venv/bin/python -e ".[tpu,tfds,grain]"', remote
        )

    def test_the_tarball_setup_packs_holds_the_package(self):
        (archive, *_) = dry_run('setup', *TPU)
        tarball = flag(archive, '--output')
        self.addCleanup(pathlib.Path(tarball).unlink, missing_ok=True)
        subprocess.run(archive, check=True, timeout=120)  # read-only for the repository
        names = subprocess.run(
            ['tar', '-tzf', tarball], check=True, capture_output=True, text=True
        ).stdout.split()
        for name in ('pyproject.toml', 'diffusion_jax/main.py', 'configs/cifar10.py'):
            self.assertIn(name, names)

    def test_run_starts_the_config_on_all_workers_at_once(self):
        (cmd,) = dry_run(
            'run',
            *TPU,
            '--config=configs/cifar10.py',
            '--workdir=gs://my-bucket/ddpm cifar10',
            '--config.data.data_dir=gs://my-bucket/tfds',
            '--',
            '--config.training.batch_size=256',
            "--config.sampling.interpolate=it's",
        )
        self.assertEqual(cmd[:6], [*GCLOUD_TPU, 'tpu-vm', 'ssh', 'ddpm-v4'])
        self.assertIn('--zone=us-central2-b', cmd)
        self.assertIn('--worker=all', cmd)
        remote = flag(cmd, '--command')
        self.assertIn('nohup ~/diffusion_jax-venv/bin/python -m diffusion_jax.main ', remote)
        self.assertEqual(
            main_args(remote),
            [
                '--config=configs/cifar10.py',
                '--workdir=gs://my-bucket/ddpm cifar10',  # quoted through both shells
                '--mode=train',
                '--config.data.data_dir=gs://my-bucket/tfds',
                '--config.training.batch_size=256',
                "--config.sampling.interpolate=it's",
            ],
        )
        self.assertIn('> ~/ddpm.log 2>&1 < /dev/null &', remote)

    def test_the_readme_shows_what_run_prints(self):
        (cmd,) = dry_run(
            'run',
            *TPU,
            '--config=configs/cifar10.py',
            '--workdir=gs://my-bucket/ddpm_cifar10',
            '--config.data.data_dir=gs://my-bucket/tfds',
        )
        readme = (REPO / 'launch' / 'README.md').read_text().splitlines()
        (shown,) = [line for line in readme if line.startswith('gcloud compute tpus tpu-vm ssh')]
        self.assertEqual(shlex.split(shown), cmd)

    def test_run_passes_the_mode_and_warns_about_a_workdir_off_gcs(self):
        proc = launch('run', *TPU, '--config=c', '--workdir=/tmp/w', '--mode=sample', '--dry-run')
        self.assertEqual(proc.returncode, 0, proc.stderr)
        (line,) = proc.stdout.splitlines()
        remote = flag(shlex.split(line), '--command')
        self.assertEqual(main_args(remote), ['--config=c', '--workdir=/tmp/w', '--mode=sample'])
        self.assertIn('not on gs://', proc.stderr)

    def test_logs_follows_the_log_of_worker_0(self):
        (cmd,) = dry_run('logs', *TPU)
        self.assertEqual(
            cmd,
            [
                *GCLOUD_TPU,
                'tpu-vm',
                'ssh',
                'ddpm-v4',
                '--zone=us-central2-b',
                '--worker=0',
                '--command=tail -n 100 -F ~/ddpm.log',
            ],
        )
        (cmd,) = dry_run('logs', *TPU, '--worker=3')
        self.assertIn('--worker=3', cmd)

    def test_fetch_syncs_a_gcs_workdir_without_a_tpu(self):
        mkdir, rsync = dry_run('fetch', '--workdir=gs://b/run/')
        self.assertEqual(mkdir, ['mkdir', '-p', './run'])
        self.assertEqual(rsync, [*GCLOUD_STORAGE_RSYNC, 'gs://b/run', './run'])
        _, rsync = dry_run('fetch', '--workdir=gs://b/run', '--dest=out', '--no-checkpoints')
        self.assertEqual(
            rsync,
            [*GCLOUD_STORAGE_RSYNC, '--exclude=^checkpoints/', 'gs://b/run', 'out'],
        )

    @parameterized.parameters(
        ('runs/a', 'diffusion_jax/runs/a'),  # relative to the code, as run.sh starts main there
        ('~/runs/a', 'runs/a'),
        ('/data/runs/a', '/data/runs/a'),
    )
    def test_fetch_copies_a_workdir_on_the_tpu_from_worker_0(self, workdir, remote_path):
        (cmd,) = dry_run('fetch', *TPU, f'--workdir={workdir}')
        self.assertEqual(
            cmd,
            [
                *GCLOUD_TPU,
                *('tpu-vm', 'scp', '--recurse', f'ddpm-v4:{remote_path}', './a'),
                *('--zone=us-central2-b', '--worker=0'),
            ],
        )

    def test_delete_removes_the_vm_or_the_queued_resource(self):
        (cmd,) = dry_run('delete', *TPU)
        self.assertEqual(
            cmd, [*GCLOUD_TPU, 'tpu-vm', 'delete', 'ddpm-v4', '--zone=us-central2-b', '--quiet']
        )
        (cmd,) = dry_run('delete', *TPU, '--queued')
        self.assertEqual(
            cmd,
            [
                *GCLOUD_TPU,
                *('queued-resources', 'delete', 'ddpm-v4', '--zone=us-central2-b'),
                *('--force', '--quiet'),
            ],
        )

    def test_delete_asks_first_and_refuses_without_a_terminal(self):
        proc = launch('delete', *TPU)  # stdin is not a terminal and there is no --yes
        self.assertEqual(proc.returncode, 1)
        self.assertEqual(proc.stdout, '')
        self.assertEqual(
            proc.stderr, 'error: not deleting ddpm-v4 without confirmation: pass --yes\n'
        )

    def test_without_dry_run_a_missing_gcloud_is_one_line(self):
        proc = launch('delete', *TPU, '--yes')
        self.assertEqual(proc.returncode, 1)
        self.assertTrue(proc.stderr.startswith('error: gcloud not found'), proc.stderr)
        self.assertLen(proc.stderr.splitlines(), 1)


# A stand-in for `python` in the workers' venv: records where and how it was started, then runs
# until SIGTERM.
FAKE_PYTHON = textwrap.dedent("""\
    #!/bin/sh
    printf '%s\\n' "$PWD" "$@" > "$HOME/argv"
    trap 'echo stopped; exit 0' TERM
    echo started
    while :; do sleep 0.05; done
""")


class WorkerCommandTest(absltest.TestCase):
    """Runs the commands run.sh sends to the workers in a local home directory."""

    def setUp(self):
        super().setUp()
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.home = pathlib.Path(tmp.name)
        (self.home / 'diffusion_jax').mkdir()
        python = self.home / 'diffusion_jax-venv' / 'bin' / 'python'
        python.parent.mkdir(parents=True)
        python.write_text(FAKE_PYTHON)
        python.chmod(0o755)
        self.job_pid = None
        self.addCleanup(self.kill_job)

    def kill_job(self):
        # Only the job this test started, should a failed test leave it running.
        if self.job_pid is not None and _alive(self.job_pid):
            os.kill(self.job_pid, signal.SIGKILL)

    def on_worker(self, *run_args, script='run'):
        """What a worker does with the ssh command of `launch/<script>.sh *run_args`."""
        cmd = dry_run(script, *TPU, *run_args)[-1]
        env = dict(os.environ, HOME=str(self.home))
        return subprocess.run(
            ['bash', '-c', flag(cmd, '--command')],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
            stdin=subprocess.DEVNULL,
        )

    def wait_for(self, condition, what):
        deadline = time.monotonic() + 20
        while not condition():
            if time.monotonic() > deadline:
                self.fail(f'timed out waiting for {what}')
            time.sleep(0.05)

    def test_run_starts_main_in_the_background_once_and_stop_ends_it(self):
        args = ('--config=configs/cifar10.py', '--workdir=gs://b/my run', '--config.x.y=1')
        started = self.on_worker(*args)
        self.assertEqual(started.returncode, 0, started.stderr)
        argv = self.home / 'argv'
        self.wait_for(argv.exists, 'the job to start')
        self.wait_for(lambda: argv.read_text().endswith('\n'), 'its arguments')
        self.assertEqual(
            argv.read_text().splitlines(),
            [
                str(self.home / 'diffusion_jax'),
                *('-m', 'diffusion_jax.main'),
                '--config=configs/cifar10.py',
                '--workdir=gs://b/my run',
                '--mode=train',
                '--config.x.y=1',
            ],
        )
        pid = self.job_pid = int((self.home / 'ddpm.pid').read_text())
        self.assertTrue(_alive(pid), 'the job ended with the shell that started it')

        again = self.on_worker(*args)
        self.assertEqual(again.returncode, 1)
        self.assertIn('a job is already running', again.stderr)
        # Nor does setup replace the code under a running job.
        (self.home / 'diffusion_jax' / 'marker').touch()
        setup = self.on_worker(script='setup')
        self.assertEqual(setup.returncode, 1)
        self.assertIn('a job is running', setup.stderr)
        self.assertTrue((self.home / 'diffusion_jax' / 'marker').exists())

        stopped = self.on_worker('--stop')
        self.assertEqual(stopped.returncode, 0, stopped.stderr)
        self.assertEqual(stopped.stdout, 'sent SIGTERM\n')
        log = self.home / 'ddpm.log'
        self.wait_for(lambda: 'stopped' in log.read_text(), 'the job to stop')
        self.assertEqual(log.read_text(), 'started\nstopped\n')
        self.wait_for(lambda: not _alive(pid), 'the job to exit')

    def test_stop_without_a_running_job_says_so(self):
        self.assertEqual(self.on_worker('--stop').stdout, 'no job running\n')  # no pid file
        finished = subprocess.Popen(['true'])
        finished.wait()
        (self.home / 'ddpm.pid').write_text(f'{finished.pid}\n')
        self.assertEqual(self.on_worker('--stop').stdout, 'no job running\n')

    def test_run_says_to_run_setup_first_when_there_is_no_venv(self):
        shutil.rmtree(self.home / 'diffusion_jax-venv')
        proc = self.on_worker('--config=c', '--workdir=gs://b/w')
        self.assertEqual(proc.returncode, 1)
        self.assertIn('run launch/setup.sh first', proc.stderr)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its new parent) counts as gone.
    stat = pathlib.Path(f'/proc/{pid}/stat')
    return not (stat.exists() and stat.read_text().rsplit(')', 1)[1].split()[0] == 'Z')


class ErrorsTest(parameterized.TestCase):
    def assert_one_line_error(self, proc, status, fragment):
        self.assertEqual(proc.returncode, status, proc.stderr)
        self.assertEqual(proc.stdout, '')
        self.assertLen(proc.stderr.splitlines(), 1, proc.stderr)
        self.assertTrue(proc.stderr.startswith('error: '), proc.stderr)
        self.assertIn(fragment, proc.stderr)

    @parameterized.parameters(*SCRIPTS)
    def test_help_prints_the_usage_and_exits_0(self, script):
        proc = launch(script, '--help')
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertTrue(proc.stdout.startswith(f'Usage: launch/{script}.sh'), proc.stdout)
        self.assertIn('--dry-run', proc.stdout)
        self.assertEqual(proc.stderr, '')

    @parameterized.parameters(*SCRIPTS)
    def test_an_unknown_flag_is_one_line_and_exit_2(self, script):
        proc = launch(script, *TPU, '--bogus', '--dry-run')
        self.assert_one_line_error(proc, 2, 'unknown flag --bogus (see --help)')
        proc = launch(script, *TPU, 'stray', '--dry-run')
        self.assert_one_line_error(proc, 2, 'unexpected argument stray')

    @parameterized.parameters(*SCRIPTS)
    def test_a_missing_tpu_name_or_zone_is_one_line_and_exit_2(self, script):
        # fetch needs a TPU only for a workdir that is not on gs://.
        required = ('--workdir=runs/a',) if script == 'fetch' else REQUIRED.get(script, ())
        proc = launch(script, '--zone=us-central2-b', *required, '--dry-run')
        self.assert_one_line_error(proc, 2, 'no TPU name: pass --name=NAME or set TPU_NAME')
        proc = launch(script, '--name=ddpm-v4', *required, '--dry-run')
        self.assert_one_line_error(proc, 2, 'no zone')
        proc = launch(script, '--name=Bad_Name', '--zone=z', *required, '--dry-run')
        self.assert_one_line_error(proc, 2, 'bad TPU name')

    @parameterized.parameters(*SCRIPTS)
    def test_a_flag_without_its_value_is_one_line_and_exit_2(self, script):
        proc = launch(script, '--dry-run', '--zone')
        self.assert_one_line_error(proc, 2, '--zone needs a value')
        proc = launch(script, '--name', '--dry-run')
        self.assert_one_line_error(proc, 2, '--name needs a value')

    @parameterized.named_parameters(
        ('create_type', 'create', (), 'no accelerator type'),
        ('run_config', 'run', ('--workdir=gs://b/w',), 'no config'),
        ('run_workdir', 'run', ('--config=c',), 'no workdir'),
        ('fetch_workdir', 'fetch', (), 'no workdir'),
        ('fetch_checkpoints', 'fetch', ('--workdir=runs/a', '--no-checkpoints'), 'gs://'),
        ('logs_worker', 'logs', ('--worker=all',), '--worker'),
    )
    def test_other_missing_or_bad_values_are_one_line_and_exit_2(self, script, args, fragment):
        self.assert_one_line_error(launch(script, *TPU, *args, '--dry-run'), 2, fragment)

    def test_unsafe_remote_names_are_refused(self):
        proc = launch('setup', *TPU, '--dry-run', env={'REMOTE_DIR': ''})
        self.assertEqual(proc.returncode, 0)  # empty: the default
        proc = launch('setup', *TPU, '--dry-run', env={'REMOTE_DIR': '../x'})
        self.assert_one_line_error(proc, 2, 'REMOTE_DIR and LOG_FILE must be plain file names')


class ScriptsTest(parameterized.TestCase):
    @parameterized.parameters(*SCRIPTS)
    def test_each_script_is_executable_strict_bash(self, script):
        path = REPO / 'launch' / f'{script}.sh'
        self.assertTrue(os.access(path, os.X_OK), f'{path} is not executable')
        lines = path.read_text().splitlines()
        self.assertEqual(lines[0], '#!/usr/bin/env bash')
        self.assertIn('set -euo pipefail', lines[:5])

    def test_scripts_pass_shellcheck(self):
        if shutil.which('shellcheck') is None:
            self.skipTest('shellcheck is not installed (Debian: apt-get install shellcheck)')
        scripts = sorted(str(p) for p in (REPO / 'launch').glob('*.sh'))
        self.assertLen(scripts, len(SCRIPTS) + 1)  # and common.sh
        proc = subprocess.run(
            ['shellcheck', '-x', *scripts], cwd=REPO, capture_output=True, text=True, timeout=120
        )
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)


if __name__ == '__main__':
    absltest.main()
