"""The `fastai-tar` command as a user meets it (`fastai_tar.tools.cli`): answers before torch is imported, lists its
commands, `--version`, Ctrl-C, output to a pipe, notes on runs too small to mean much."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import fastai_tar
from fastai_tar.tools import bench, demo
from fastai_tar.tools.cli import SUBCOMMANDS, _parser, main

ROOT = Path(__file__).parents[1]


def _python(code: str, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
    return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=120, **kwargs)


def test_help_version_and_usage_errors_import_neither_torch_nor_fastai():
    "What makes `--help` and a usage error answer at once (4-10 s before): no torch, no fastai until a command runs"
    res = _python("""
        import contextlib, io, sys
        from fastai_tar.tools.cli import main
        for argv in (['--help'], ['demo', '--help'], ['bench', '--help'], ['--version'], [], ['frob'],
                     ['demo', '--epochs', 'x'], ['bench', '--bogus']):
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                try: main(argv)
                except SystemExit: pass
        print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'fastai', 'fastcore', 'pandas')))
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == '[]'


def test_bare_command_lists_the_commands(capsys):
    assert main([]) == 2
    err = ' '.join(capsys.readouterr().err.split())  # one line: argparse wraps at the terminal's width
    assert list(SUBCOMMANDS) == ['demo', 'bench']
    for name, mod in (('demo', demo), ('bench', bench)):
        assert f"{name} {' '.join(mod.__doc__.splitlines()[0].split())}" in err


def test_version(capsys):
    with pytest.raises(SystemExit) as e: main(['--version'])
    assert e.value.code == 0 and capsys.readouterr().out == f'fastai-tar {fastai_tar.__version__}\n'


def _help(*argv) -> str:
    sub = _parser()._subparsers._group_actions[0].choices
    return ' '.join(sub[argv[0]].format_help().split())  # one line: argparse wraps at the terminal's width


def test_help_describes_each_command_with_its_module_docstring():
    for name, mod in (('demo', demo), ('bench', bench)):
        assert ' '.join(mod.__doc__.split()) in _help(name)


def test_help_quotes_the_commands_own_defaults():
    "The defaults are written out in cli.py (no torch import there): they must be the ones the commands use"
    text = _help('demo')
    for k in ('epochs', 'bs', 'bptt'):
        assert f"(default: {demo.PRESETS['default'][k]}; --quick: {demo.PRESETS['quick'][k]})" in text
    assert f"{demo.PRESETS['quick']['max_chars'] // 1000}k characters" in text
    assert f"{demo.PRESETS['quick']['epochs']} epochs" in text
    text = _help('bench')
    assert '(default: ' + ','.join('x'.join(map(str, s)) for s in bench.SHAPES) + ')' in text
    assert 'from ' + ', '.join(bench.DTYPES) + ' (default: float32,bfloat16)' in text
    assert f'(GLIBC_TUNABLES={bench.KEEP_FREED})' in ''.join(text.split())  # argparse may wrap it at a '='
    (lm, lm_quick), (ts, ts_quick) = ((p['default']['epochs'], p['quick']['epochs'])
                                      for p in (bench.TRAIN_PRESETS, bench.TS_PRESETS))
    assert f'(default: {lm} for the LM, {ts} for the time-series model; --quick: {ts_quick})' in text
    assert lm_quick == ts_quick


# --- running the commands in a real process -------------------------------------------------------------------------
def _start(argv, cwd) -> subprocess.Popen:
    "`python -m fastai_tar ARGV` with SIGINT handled as in a terminal (a shell's background job ignores it)"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]),
               PYTHONUNBUFFERED='1')
    return subprocess.Popen([sys.executable, '-m', 'fastai_tar', *argv], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _interrupt_after(proc, start: str) -> tuple[str, str]:
    "Wait for a stdout line starting with `start`, send SIGINT; (stdout, stderr) of the whole run"
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(start): break
    else: pytest.fail(f'the command ended before printing {start!r}: {"".join(seen)}{proc.stderr.read()}')
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return ''.join(seen) + out, err


@pytest.fixture
def small_corpus(tmp_path):
    f = tmp_path / 'small.txt'
    f.write_text('\n\n'.join(f'Line {i % 9} of my own text, about item {i % 4}.' for i in range(300)))
    return f


def test_ctrl_c_during_demo_one_line_130_and_removes_what_it_created(tmp_path, small_corpus):
    (tmp_path / 'kept').mkdir()
    out = tmp_path / 'kept' / 'new' / 'deeper'
    proc = _start(['demo', '--quick', '--corpus', str(small_corpus), '--out', str(out)], tmp_path)
    stdout, err = _interrupt_after(proc, '== baseline')
    assert proc.returncode == 130
    assert err == f"fastai-tar demo: interrupted: no results written (removed {tmp_path / 'kept' / 'new'}, " \
                  "which it had created)\n"
    assert list((tmp_path / 'kept').iterdir()) == []  # the folder that was there stays


def test_interrupted_demo_removes_only_what_it_made(tmp_path):
    "What `run` calls on Ctrl-C: its own files go, folders it made go unless someone else's files are in them"
    out = tmp_path / 'made' / 'out'
    assert demo._first_missing(out) == tmp_path / 'made' and demo._first_missing(tmp_path) is None
    out.mkdir(parents=True)
    (out / 'results.csv').write_text('half')
    assert demo._remove_created([out / 'results.csv', out / 'results.json'], tmp_path / 'made', out) == \
        f"no results written (removed {tmp_path / 'made'}, which it had created)"
    assert list(tmp_path.iterdir()) == []
    out.mkdir(parents=True)
    (out / 'notes.txt').write_text('mine')  # put there by the user while the demo ran
    assert demo._remove_created([], tmp_path / 'made', out) == f'no results written; {out} kept (it holds other files)'
    assert [p.name for p in out.iterdir()] == ['notes.txt']
    assert demo._remove_created([], None, out) == f'no results written to {out}'  # a folder that was there before
    assert (out / 'notes.txt').exists()


def test_ctrl_c_during_bench(tmp_path):
    proc = _start(['bench', '--shapes', '64x70x400', '--dtypes', 'float32', '--repeats', '100000', '--threads', '1',
                   '--json', 'bench.json'], tmp_path)
    _, err = _interrupt_after(proc, 'fastai-tar bench:')
    assert proc.returncode == 130 and err == 'fastai-tar bench: interrupted\n'
    assert list(tmp_path.iterdir()) == []


def test_piped_demo_prints_plain_lines_per_epoch(tmp_path, small_corpus):
    "Output to a file or a CI log: fastai's table a line per epoch; no carriage returns or bar glyphs"
    res = subprocess.run([sys.executable, '-m', 'fastai_tar', 'demo', '--quick', '--corpus', str(small_corpus),
                          '--out', str(tmp_path / 'out')], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert res.returncode == 0, res.stderr
    assert '\r' not in res.stdout + res.stderr and '█' not in res.stdout + res.stderr
    lines = res.stdout.splitlines()
    runs = json.loads((tmp_path / 'out' / 'results.json').read_text())['runs']
    for r in runs:
        at = lines.index(f"== {r['run']}: alpha={r['alpha']:g}, beta={r['beta']:g} ==")
        header, *epochs = lines[at + 1:at + 2 + demo.PRESETS['quick']['epochs']]
        assert header.split()[:3] == ['epoch', 'train_loss', 'valid_loss'] and header.split()[-1] == 'time'
        for i, (line, h) in enumerate(zip(epochs, r['history'])):
            cells = line.split()
            assert cells[0] == str(i) and float(cells[2]) == pytest.approx(h['valid_loss'], abs=1e-6)
    # the run is a --quick one: the output says its numbers cannot show what the default run shows
    assert any(l.startswith('Note: a tiny model on at most 60,000 characters, 2 epoch(s)') for l in lines)


# --- notes on runs too small or too short -----------------------------------------------------------------------------
def test_demo_caveat_only_for_runs_smaller_or_shorter_than_the_default():
    assert demo._caveat(dict(demo.PRESETS['default'])) is None
    assert demo._caveat(dict(demo.PRESETS['default'], epochs=9)) is None
    assert demo._caveat(dict(demo.PRESETS['default'], epochs=1)).startswith('Note: 1 epoch(s): ')
    assert 'tiny model' in demo._caveat(dict(demo.PRESETS['quick']))


def test_bench_caveats_name_the_small_shapes_and_few_repeats():
    rows = [dict(shape=list(s)) for s in bench.SHAPES]
    assert bench._caveats(rows, 20) == []
    notes = bench._caveats(rows + [dict(shape=[4, 12, 16]), dict(shape=[4, 12, 16])], 3)
    assert len(notes) == 2 and notes[0].startswith('Note: 4x12x16 hold fewer than') and '3 repeat(s)' in notes[1]
