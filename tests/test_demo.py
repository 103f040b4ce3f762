"Tests of `fastai-tar demo` (`fastai_tar.tools.demo`): quick mode end to end, the runs, the outputs and bad arguments."
import contextlib
import io
import json
import math
import os
import subprocess
import sys

import pandas as pd
import pytest

from fastai_tar.tools import demo
from fastai_tar.tools.cli import main
from fastai_tar.corpus import corpus_frame, lm_dls


@pytest.fixture(scope='module')
def quick(tmp_path_factory):
    "One `fastai-tar demo --quick` run: (exit status, stdout, out folder)."
    work = tmp_path_factory.mktemp('demo')
    out = work / 'out'
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        mp.chdir(work)  # the working folder: anything written outside --out would show up here
        rc = main(['demo', '--quick', '--out', str(out)])
    return rc, stdout.getvalue(), out


def test_quick_prints_table(quick):
    rc, stdout, out = quick
    assert rc == 0
    lines = stdout.splitlines()
    header = next(i for i, l in enumerate(lines) if l.split() == demo.TABLE_COLUMNS)
    assert [l.split()[0] for l in lines[header + 1:header + 3]] == ['baseline', 'ar2+tar1']
    assert any(l.startswith('ar2+tar1: valid_tar ') for l in lines)
    assert f"Wrote {out / 'tar_demo.png'}, {out / 'results.json'}, {out / 'results.csv'}" in lines


def test_quick_files(quick):
    _, _, out = quick
    table = pd.read_csv(out / 'results.csv')
    runs = json.loads((out / 'results.json').read_text())['runs']
    assert list(table.columns) == demo.TABLE_COLUMNS
    assert list(table.run) == [r['run'] for r in runs] == ['baseline', 'ar2+tar1']
    assert list(zip(table.alpha, table.beta)) == [(0., 0.), (2., 1.)]
    for row, r in zip(table.itertuples(), runs):
        assert len(r['history']) == demo.PRESETS['quick']['epochs']
        last = r['history'][-1]
        for k in ('valid_loss', 'perplexity', 'valid_tar'):
            assert getattr(row, k) == pytest.approx(r[k], rel=1e-12) and r[k] == last[k]
        assert row.perplexity == pytest.approx(math.exp(row.valid_loss), rel=1e-5)  # fastai's Perplexity
        assert row.epoch_s > 0
    assert (out / 'tar_demo.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert sorted(p.name for p in out.iterdir()) == ['results.csv', 'results.json', 'tar_demo.png']
    assert list(out.parent.iterdir()) == [out]  # nothing written anywhere else


def test_quick_smoothness(quick):
    "Both runs report the smoothness of their validation activations; TAR makes it lower (seeded, same data)."
    _, _, out = quick
    base, reg = json.loads((out / 'results.json').read_text())['runs']
    assert base['valid_tar'] > 0 and math.isfinite(base['valid_tar'])
    assert 0 < reg['valid_tar'] < base['valid_tar']


def test_user_corpus_sweep(tmp_path, capsys):
    "--corpus and a sweep end to end: one run per (alpha, beta) pair after the baseline."
    f = tmp_path / 'mine.txt'
    f.write_text('\n\n'.join(f'Line {i % 9} of my own text, about item {i % 4}.' for i in range(600)))
    out = tmp_path / 'out'
    assert main(['demo', '--quick', '--corpus', str(f), '--alpha', '0', '--beta', '0', '1', '--epochs', '1',
                 '--out', str(out)]) == 0
    assert 'Building corpus' in capsys.readouterr().out
    table = pd.read_csv(out / 'results.csv')
    assert list(table.run) == ['baseline', 'tar1'] and list(table.beta) == [0., 1.]
    settings = json.loads((out / 'results.json').read_text())['settings']
    assert settings['corpus'] == str(f) and settings['epochs'] == 1


def test_make_runs():
    assert demo.make_runs([2.], [1.]) == [('baseline', 0., 0.), ('ar2+tar1', 2., 1.)]
    assert demo.make_runs([0.], [0., 1., 2., 4.]) == [('baseline', 0., 0.), ('tar1', 0., 1.), ('tar2', 0., 2.),
                                                      ('tar4', 0., 4.)]
    assert demo.make_runs([1., 1.], [0., 0.5]) == [('baseline', 0., 0.), ('ar1', 1., 0.), ('ar1+tar0.5', 1., 0.5)]


def test_train_run_same_batches_every_run(tmp_path):
    "A run's result depends on its seed and coefficients only, not on the runs trained before it."
    f = tmp_path / 'text.txt'
    f.write_text('\n\n'.join(f'Sentence {i % 7} tells of item {i % 5} and the rest of the story.' for i in range(150)))
    dls = lm_dls(corpus_frame(f, block_chars=200), bs=4, bptt=8)
    kw = dict(epochs=2, lr=1e-2, seed=3, config=dict(emb_sz=8, n_hid=12, n_layers=1), path=tmp_path)
    first = demo.train_run(dls, 0., 0., **kw)
    tar = demo.train_run(dls, 2., 1., **kw)
    again = demo.train_run(dls, 0., 0., **kw)
    assert first['history'] == again['history']
    assert tar['history'] != first['history']
    assert [h['epoch'] for h in first['history']] == [0, 1]


def test_plot_results():
    hist = lambda p, t: [dict(epoch=i, perplexity=p + i, valid_tar=t * i) for i in range(3)]
    results = [dict(run='baseline', history=hist(100., .2)), dict(run='tar1', history=hist(90., .1))]
    fig = demo.plot_results(results)
    ppl, tar = fig.axes
    assert [l.get_label() for l in ppl.lines] == [l.get_label() for l in tar.lines] == ['baseline', 'tar1']
    assert list(ppl.lines[1].get_xdata()) == [1, 2, 3] and list(ppl.lines[1].get_ydata()) == [90., 91., 92.]
    assert list(tar.lines[0].get_ydata()) == [0., .2, .4]


# --- bad arguments: exit status 2, one line on stderr ----------------------------------------------------------
def _bad_args(tmp_path):
    empty = tmp_path / 'empty.txt'
    empty.write_text('\n  \n')
    a_file = tmp_path / 'file'
    a_file.write_text('x')
    (tmp_path / 'no_txt').mkdir()
    return {
        'missing corpus': (['--corpus', str(tmp_path / 'missing.txt')], 'does not exist'),
        'empty corpus': (['--corpus', str(empty)], 'is empty'),
        'folder without .txt': (['--corpus', str(tmp_path / 'no_txt')], 'no .txt files'),
        'negative beta': (['--beta', '1', '-1'], '--beta values must be finite numbers >= 0, got -1'),
        'nan alpha': (['--alpha', 'nan'], '--alpha values must be finite numbers >= 0, got nan'),
        'zero epochs': (['--epochs', '0'], '--epochs must be >= 1, got 0'),
        'bptt 1': (['--bptt', '1'], '--bptt must be >= 2'),
        'out is a file': (['--out', str(a_file)], 'is a file, not a folder'),
    }


@pytest.mark.parametrize('case', ['missing corpus', 'empty corpus', 'folder without .txt', 'negative beta',
                                  'nan alpha', 'zero epochs', 'bptt 1', 'out is a file'])
def test_bad_arguments(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, message = _bad_args(tmp_path)[case]
    assert main(['demo', '--quick', *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.count('\n') == 1 and captured.err.startswith('fastai-tar demo: error: ')
    assert message in captured.err
    assert not (tmp_path / 'tar_demo').exists()  # nothing was written


@pytest.fixture
def small_corpus(tmp_path):
    f = tmp_path / 'small.txt'
    f.write_text('\n\n'.join(f'Line {i % 9} of my own text, about item {i % 4}.' for i in range(300)))
    return f


@pytest.fixture
def no_training(monkeypatch):
    "Training fails the test if it starts: a bad --out must be caught before it."
    def refuse(*args, **kwargs): raise AssertionError('the demo started training despite a bad --out')
    monkeypatch.setattr(demo, 'train_run', refuse)


def test_out_under_a_file(tmp_path, small_corpus, capsys, no_training):
    a_file = tmp_path / 'afile'
    a_file.write_text('x')
    out = a_file / 'sub'
    assert main(['demo', '--quick', '--corpus', str(small_corpus), '--out', str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'fastai-tar demo: error: --out {str(out)!r}: cannot write there') and err.count('\n') == 1
    assert a_file.read_text() == 'x'


@pytest.mark.skipif(os.name != 'posix' or os.geteuid() == 0, reason='needs a user whom file permissions bind')
def test_out_unwritable(tmp_path, small_corpus, capsys, no_training):
    locked = tmp_path / 'locked'
    locked.mkdir()
    locked.chmod(0o500)  # may be read and entered, not written
    try:
        for out in (locked, locked / 'sub'):  # an existing folder, and one that cannot be created
            assert main(['demo', '--quick', '--corpus', str(small_corpus), '--out', str(out)]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f'fastai-tar demo: error: --out {str(out)!r}: cannot write there')
        assert list(locked.iterdir()) == []
    finally: locked.chmod(0o700)


def test_bs_too_large(tmp_path, small_corpus, capsys, no_training):
    "The loaders' own check (too few tokens for a batch) reaches the command as one line."
    assert main(['demo', '--quick', '--corpus', str(small_corpus), '--bs', '5000', '--out', str(tmp_path / 'o')]) == 2
    err = capsys.readouterr().err
    assert err.startswith('fastai-tar demo: error: the ') and 'fewer than bs+1=5001 tokens' in err
    assert err.count('\n') == 1 and not (tmp_path / 'o').exists()


def test_a_bug_is_not_a_usage_error(tmp_path, small_corpus, monkeypatch):
    "An error that is not the user's (here a ValueError from inside training) keeps its traceback."
    def broken(*args, **kwargs): raise ValueError('a bug deep in training')
    monkeypatch.setattr(demo, 'train_run', broken)
    with pytest.raises(ValueError, match='a bug deep in training'):
        main(['demo', '--quick', '--corpus', str(small_corpus), '--out', str(tmp_path / 'out')])


def test_bad_argument_in_a_shell(tmp_path):
    "The console entry point: non-zero exit, one line on stderr, no traceback."
    res = subprocess.run([sys.executable, '-m', 'fastai_tar', 'demo', '--corpus', str(tmp_path / 'nope.txt')],
                         capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.count('\n') == 1 and 'Traceback' not in res.stderr and 'does not exist' in res.stderr
