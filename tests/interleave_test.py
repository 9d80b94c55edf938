"""Tests of `benchmarks.interleave`: the turns and the pipe protocol, with a child that sleeps."""

import json
import os
import sys
import tempfile
import textwrap

from absl.testing import absltest

from benchmarks import interleave

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A serving child: 'nap' sleeps 50 ms, 'blink' returns at once. It prints to stdout after the
# protocol stream is taken (that must not reach the parent's pipe), and writes what `serve`
# returned to argv[1].
_CHILD = textwrap.dedent(
    """
    import json, sys, time
    from benchmarks import interleave
    out = interleave.protocol_stream()
    print('a stray line from a library')
    timed = interleave.serve(
        {'nap': lambda: time.sleep(0.05), 'blink': lambda: None}, sys.stdin, out
    )
    with open(sys.argv[1], 'w') as f:
        json.dump(timed, f)
    """
)


def _child(*args: str) -> list[str]:
    return [sys.executable, '-c', _CHILD, *args]


def _record_path(test: absltest.TestCase) -> str:
    # tempfile, not create_tempdir: absl's test flags are unparsed under pytest.
    tmp = tempfile.TemporaryDirectory()
    test.addCleanup(tmp.cleanup)
    return os.path.join(tmp.name, 'timed.json')


class TakeTurnsTest(absltest.TestCase):
    def test_peer_first_in_even_rounds_ours_first_in_odd(self):
        log = []

        def theirs():
            log.append('peer')
            return 10.0 + len(log)

        ours_s, theirs_s = interleave.take_turns(lambda: log.append('ours'), theirs, rounds=4)
        self.assertEqual(log, ['peer', 'ours', 'ours', 'peer', 'peer', 'ours', 'ours', 'peer'])
        self.assertEqual(theirs_s, [11.0, 14.0, 15.0, 18.0])  # what theirs() returned, in order
        self.assertLen(ours_s, 4)
        self.assertTrue(all(s >= 0 for s in ours_s))

    def test_round_ratios_are_their_seconds_over_ours(self):
        ratios = interleave.round_ratios([1.0, 2.0, 4.0], [1.5, 2.0, 2.0])
        self.assertEqual(ratios['per_round'], [1.5, 1.0, 0.5])
        self.assertEqual((ratios['median'], ratios['min'], ratios['max']), (1.0, 0.5, 1.5))

    def test_round_ratios_need_the_same_rounds(self):
        with self.assertRaises(ValueError):
            interleave.round_ratios([1.0, 2.0], [1.0])


class PeerProcessTest(absltest.TestCase):
    def test_times_the_childs_calls_and_it_keeps_the_same_seconds(self):
        record = _record_path(self)
        peer = interleave.Peer(_child(record), cwd=_REPO)
        try:
            self.assertEqual(peer.names, ['nap', 'blink'])
            naps = [peer.time('nap') for _ in range(3)]
            blink = peer.time('blink')
        finally:
            code = peer.finish()
        self.assertEqual(code, 0)
        self.assertTrue(all(s >= 0.05 for s in naps), naps)
        self.assertLess(blink, 0.05)
        with open(record) as f:
            timed = json.load(f)
        self.assertEqual(timed['nap']['seconds'], naps)  # the same numbers on both sides
        self.assertEqual(timed['blink']['seconds'], [blink])
        self.assertGreater(timed['nap']['memory']['peak_bytes'], 0)

    def test_an_unknown_name_stops_the_child_and_raises_here(self):
        record = _record_path(self)
        peer = interleave.Peer(_child(record), cwd=_REPO)
        with self.assertRaisesRegex(interleave.PeerError, 'exited'):
            peer.time('nope')
        peer.close()
        self.assertFalse(os.path.exists(record))

    def test_a_child_that_never_serves_raises_at_start(self):
        with self.assertRaisesRegex(interleave.PeerError, 'exited'):
            interleave.Peer([sys.executable, '-c', 'import sys; sys.exit(3)'])


if __name__ == '__main__':
    absltest.main()
