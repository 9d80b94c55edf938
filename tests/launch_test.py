"""The Cloud TPU launch scripts: their --dry-run commands, their errors, and shellcheck."""

import os
import pathlib
import shlex
import shutil
import subprocess

from absl.testing import absltest, parameterized

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = ('create', 'setup', 'run', 'logs', 'fetch', 'delete')
TPU = ('--name=ddpm-v4', '--zone=us-central2-b')


def launch(script, *args):
    # No gcloud on PATH: a dry run must not need it.
    env = dict(os.environ, PATH='/usr/bin:/bin', TPU_NAME='', ZONE='', PROJECT='')
    return subprocess.run(
        ['bash', str(REPO / 'launch' / f'{script}.sh'), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def commands(proc) -> list[list[str]]:
    """The dry run's printed commands, each split back into its words."""
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.strip().splitlines()]


class DryRunTest(parameterized.TestCase):
    def test_create_asks_for_the_type_zone_and_spot_capacity(self):
        (cmd,) = commands(launch('create', *TPU, '--accelerator_type=v4-32', '--spot', '--dry-run'))
        self.assertEqual(cmd[:5], ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create'])
        self.assertIn('ddpm-v4', cmd)
        for flag in ('--zone=us-central2-b', '--accelerator-type=v4-32', '--spot'):
            self.assertIn(flag, cmd)

    def test_create_through_queued_resources(self):
        (cmd,) = commands(
            launch('create', *TPU, '--accelerator_type=v5p-8', '--queued', '--dry-run')
        )
        self.assertEqual(cmd[:5], ['gcloud', 'compute', 'tpus', 'queued-resources', 'create'])
        self.assertIn('--node-id=ddpm-v4', cmd)
        self.assertIn('--accelerator-type=v5p-8', cmd)
        self.assertNotIn('--spot', cmd)

    def test_setup_copies_the_code_to_all_workers_and_installs_jax_tpu(self):
        archive, scp, ssh = commands(launch('setup', *TPU, '--dry-run'))
        self.assertEqual(archive[0], 'git')
        self.assertIn('archive', archive)
        self.assertEqual(scp[:5], ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp'])
        self.assertEqual(ssh[:5], ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh'])
        for cmd in (scp, ssh):
            self.assertIn('--worker=all', cmd)
            self.assertIn('--zone=us-central2-b', cmd)
        remote = next(w for w in ssh if w.startswith('--command='))
        self.assertIn("pip install -q -e '.[tpu]'", remote)

    def test_run_starts_the_config_on_all_workers_at_once(self):
        (cmd,) = commands(
            launch(
                'run',
                *TPU,
                '--config=configs/cifar10.py',
                '--workdir=gs://my-bucket/ddpm cifar10',
                '--dry-run',
                '--',
                '--config.data.data_dir=gs://my-bucket/tfds',
            )
        )
        self.assertEqual(cmd[:6], ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'ddpm-v4'])
        self.assertIn('--worker=all', cmd)
        remote = shlex.split(next(w for w in cmd if w.startswith('--command='))[10:])
        main = remote.index('diffusion_jax.main')
        self.assertEqual(remote[main - 3 : main], ['nohup', 'python3', '-m'])
        self.assertEqual(
            remote[main + 1 : main + 5],
            [
                '--config=configs/cifar10.py',
                '--workdir=gs://my-bucket/ddpm cifar10',  # quoted through both shells
                '--mode=train',
                '--config.data.data_dir=gs://my-bucket/tfds',
            ],
        )

    def test_logs_follows_worker_0_and_fetch_syncs_a_bucket(self):
        (logs,) = commands(launch('logs', *TPU, '--dry-run'))
        self.assertIn('--worker=0', logs)
        self.assertIn('tail', logs[-1])
        mkdir, rsync = commands(launch('fetch', '--workdir=gs://b/run', '--dest=out', '--dry-run'))
        self.assertEqual(mkdir, ['mkdir', '-p', 'out'])
        self.assertEqual(rsync, ['gcloud', 'storage', 'rsync', '--recursive', 'gs://b/run', 'out'])

    def test_delete_removes_the_vm_or_the_queued_resource(self):
        (cmd,) = commands(launch('delete', *TPU, '--dry-run'))
        self.assertEqual(cmd[:6], ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'ddpm-v4'])
        (cmd,) = commands(launch('delete', *TPU, '--queued', '--dry-run'))
        self.assertEqual(cmd[3:5], ['queued-resources', 'delete'])

    @parameterized.parameters(*SCRIPTS)
    def test_help_unknown_flags_and_a_missing_name(self, script):
        helped = launch(script, '--help')
        self.assertEqual(helped.returncode, 0)
        self.assertIn(f'launch/{script}.sh', helped.stdout)
        unknown = launch(script, *TPU, '--bogus', '--dry-run')
        self.assertEqual(unknown.returncode, 2)
        self.assertEqual(unknown.stderr.strip(), 'error: unknown flag --bogus (see --help)')
        if script != 'fetch':  # fetch from a bucket needs no TPU
            required = ('--config=c', '--workdir=w') if script == 'run' else ()
            nameless = launch(script, *required, '--dry-run')
            self.assertEqual(nameless.returncode, 2)
            self.assertIn('no TPU name', nameless.stderr)

    def test_scripts_pass_shellcheck(self):
        if shutil.which('shellcheck') is None:
            self.skipTest('shellcheck is not installed (apt-get install shellcheck)')
        scripts = sorted(str(p) for p in (REPO / 'launch').glob('*.sh'))
        proc = subprocess.run(
            ['shellcheck', '-x', *scripts], cwd=REPO / 'launch', capture_output=True, text=True
        )
        self.assertEqual(proc.returncode, 0, proc.stdout)


if __name__ == '__main__':
    absltest.main()
