"""benchmarks/device.sh and its results: the script is sound, the rehearsal's JSON complete."""

import copy
import json
import pathlib
import shutil
import subprocess

from absl.testing import absltest

from benchmarks import device

REPO = pathlib.Path(__file__).resolve().parents[1]
REHEARSAL = REPO / 'benchmarks' / 'results_rehearsal.json'


class DeviceScriptTest(absltest.TestCase):
    def test_script_parses_and_passes_shellcheck(self):
        script = str(REPO / 'benchmarks' / 'device.sh')
        subprocess.run(['bash', '-n', script], check=True)
        if shutil.which('shellcheck') is None:
            self.skipTest('shellcheck is not installed')
        proc = subprocess.run(['shellcheck', script], capture_output=True, text=True)
        self.assertEqual(proc.returncode, 0, proc.stdout)

    def test_unknown_argument_is_refused(self):
        proc = subprocess.run(
            ['bash', str(REPO / 'benchmarks' / 'device.sh'), '--nope'],
            capture_output=True,
            text=True,
        )
        self.assertEqual(proc.returncode, 2)
        self.assertIn('--fetch-wheels', proc.stderr)

    def test_wheel_list_pins_every_wheel(self):
        lines = [
            line.strip()
            for line in (REPO / 'benchmarks' / 'device_wheels.txt').read_text().splitlines()
            if line.strip() and not line.startswith('#')
        ]
        self.assertTrue(lines)
        for line in lines:
            self.assertRegex(line, r'^[A-Za-z0-9_.-]+==[0-9][0-9A-Za-z.]*$')


class RehearsalSchemaTest(absltest.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.results = json.loads(REHEARSAL.read_text())

    def test_the_committed_rehearsal_has_every_key(self):
        self.assertEqual(device.missing_keys(self.results), [])
        self.assertEqual(self.results['mode'], 'rehearse')
        self.assertEqual(self.results['schema_version'], device.SCHEMA_VERSION)

    def test_the_rehearsal_ran_every_step_and_loaded_no_tensorflow(self):
        statuses = {name: step['status'] for name, step in self.results['steps'].items()}
        self.assertEqual(statuses, dict.fromkeys(device.GPU_LIMITS_S, 'ok'))
        self.assertFalse(self.results['environment']['tensorflow_imported'])
        self.assertEqual(self.results['gpu_tests']['failed'], 0)
        self.assertGreater(self.results['digits_cli']['tensorboard_events'], 0)

    def test_a_missing_key_or_bad_status_is_reported(self):
        broken = copy.deepcopy(self.results)
        del broken['benchmark']['train']
        broken['steps']['peer']['status'] = 'fine'
        problems = device.missing_keys(broken)
        self.assertIn('benchmark.train', problems)
        self.assertTrue(any(p.startswith('steps.peer.status') for p in problems), problems)


if __name__ == '__main__':
    absltest.main()
