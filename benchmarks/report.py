"""The printed summary of a `benchmarks.run` result: one markdown table, ours next to the peer."""

_KINDS = {'host_rss': 'host RSS', 'device': 'device'}


def _bytes(record: dict | None) -> str:
    if not record or record.get('peak_bytes') is None:
        return '-'
    value = record['peak_bytes'] / 2**20
    text = f'{value / 1024:.2f} GiB' if value >= 1024 else f'{value:.0f} MiB'
    return f'{text} ({_KINDS.get(record["kind"], record["kind"])})'


def _ours_bytes(row: dict) -> str:
    """The runtime peak, then XLA's buffer-assignment peak of the program itself."""
    program = row.get('xla_program_peak_bytes')
    if program is None:
        return _bytes(row.get('memory'))
    return f'{_bytes(row.get("memory"))}; program {program / 2**20:.1f} MiB'


def _pct(value: float | None) -> str:
    return '-' if value is None else f'{100 * value:.1f}%'


def _time(row: dict | None, is_train: bool) -> str:
    if not row:
        return '-'
    if is_train:
        return f'{row["step_ms"]:.1f} ms/step, {row["images_per_s"]:.0f} img/s'
    return f'{row["seconds_per_batch"]:.3g} s/batch, {row["images_per_s"]:.3g} img/s'


def _rows(results: dict):
    """(label, is_train, ours, peer's row or None, ratios or None) per measurement."""
    peer = results.get('peer', {})
    peer = peer if peer.get('status') == 'ok' else {'train': {}, 'sampling': {}}
    ratios = results.get('ratios', {})
    for dtype, row in results['train'].items():
        label = f'train step (Adam, EMA, clipping), {dtype}'
        yield label, True, row, peer['train'].get(dtype), ratios.get(f'train_{dtype}')
    for name, row in results['sampling'].items():
        if isinstance(row, dict) and 'num_steps' in row:
            label = f'{name.split("_")[0]} sampling, {row["num_steps"]} steps, {row["dtype"]}'
            yield label, False, row, peer['sampling'].get(name), ratios.get(name)


def format_table(results: dict) -> str:
    """A markdown table of every measurement, with the peak each MFU divides by below it.

    Args:
        results: the JSON record `benchmarks.run` writes (after `add_mfu_and_ratios`).

    Returns:
        The table and its notes, as text.
    """
    header = (
        '| what | batch | ours | peer | ours/peer throughput | MFU ours | MFU peer '
        '| peak memory ours | peak memory peer | compile ours |'
    )
    lines = [header, '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
    peaks_used = {}
    for label, is_train, ours, theirs, ratio in _rows(results):
        speed = f'{ratio["ours_over_peer_throughput"]:.2f}x' if ratio else '-'
        if ratio and 'rounds' in ratio:  # taken in turns: each round's ratio too
            rounds = ratio['rounds']
            speed += f' (rounds {rounds["min"]:.2f}x to {rounds["max"]:.2f}x)'
        lines.append(
            f'| {label} | {ours["batch_size"]} | {_time(ours, is_train)} | '
            f'{_time(theirs, is_train)} | {speed} | {_pct(ours.get("mfu"))} | '
            f'{_pct(theirs.get("mfu") if theirs else None)} | {_ours_bytes(ours)} | '
            f'{_bytes(theirs.get("memory") if theirs else None)} | {ours["compile_s"]:.1f} s |'
        )
        for row in (ours, theirs):
            if row and row.get('peak'):
                p = row['peak']
                peaks_used[p['source'], p['num_devices']] = p['tflops']
    peer = results.get('peer', {})
    notes = [f'peer: {peer.get("status")}']
    if peer.get('interleaved'):
        notes[0] += ', in turns with ours'
    if peer.get('status') == 'ok':
        notes[0] += (
            f' (torch {peer["versions"]["torch"]}, diffusers {peer["versions"]["diffusers"]})'
        )
        if 'check' in peer:
            notes.append(f'ours vs peer with the same weights: {peer["check"]}')
    for (source, devices), tflops in peaks_used.items():
        notes.append(f'MFU peak: {tflops:.4g} TFLOP/s on {devices} device(s), {source}')
    if not peaks_used:
        notes.append('MFU: no peak known for this device; pass --peak_tflops')
    compile_t = results['sampling'].get('compile_s_vs_num_timesteps', {})
    notes.append(
        'sampler compile s vs T: ' + ', '.join(f'T={k}: {v:.2f}' for k, v in compile_t.items())
    )
    return '\n'.join(lines + [''] + [f'- {n}' for n in notes])
