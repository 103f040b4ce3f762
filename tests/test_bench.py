"Tests of `fastai-tar bench`: the table's structure and the saved-bytes counter; no timing assertions."
import json

import pytest
import torch

from fastai_tar.tools import bench
from fastai_tar.tools.bench import QUICK_SHAPES, format_compile, format_table, saved_bytes
from fastai_tar.tools.cli import main


@pytest.fixture(autouse=True)
def cheap_compile(monkeypatch):
    "aot_eager traces forward and backward as inductor does, in a fraction of the time and without a C++ compiler"
    monkeypatch.setattr(bench, 'COMPILE_BACKEND', 'aot_eager')


def test_saved_bytes_counts_what_autograd_keeps():
    x = torch.randn(3, 5, requires_grad=True)
    assert saved_bytes(lambda t: (t * t).sum(), x) == 0  # saves the input itself, twice
    assert saved_bytes(lambda t: t[:, 1:].pow(2).sum(), x) == 0  # a view of the input shares its storage
    assert saved_bytes(lambda t: t.exp().sum(), x) == 3 * 5 * 4  # exp keeps its float32 result
    assert saved_bytes(lambda t: (t.exp() * t.exp()).sum(), x) == 2 * 3 * 5 * 4  # two new storages
    assert saved_bytes(lambda t, m: t.pow(2).sum(), x, None) == 0  # a None input (no mask) is allowed


def test_bench_quick_table_and_json(tmp_path, capsys):
    path = tmp_path / 'bench.json'
    assert main(['bench', '--quick', '--json', str(path)]) == 0
    out = capsys.readouterr().out
    head = ('| shape | dtype | fastai ms | compiled ms | ours ms | clone ms | speed-up | ours/compiled | ours/clone '
            '| fastai saved | ours saved | ours compiled ms |')
    assert head in out
    assert "compiled = torch.compile(backend='aot_eager') of fastai's expressions" in out
    assert 'ours/compiled compares ours timed in turns with compiled' in out
    # the rows were timed in a child process whose glibc keeps freed memory, and the output says so
    assert f'allocator: timed in a child process with GLIBC_TUNABLES={bench.KEEP_FREED}' in out
    res = json.loads(path.read_text())
    assert res['environment']['torch'] == torch.__version__ and res['repeats'] == 3
    assert res['environment']['allocator'] == f'GLIBC_TUNABLES={bench.KEEP_FREED}'
    rows = res['rows']
    assert [(tuple(r['shape']), r['dtype']) for r in rows] == [
        (s, d) for d in ('float32', 'bfloat16') for s in QUICK_SHAPES]
    table_rows = [l for l in out.splitlines() if l.startswith('| ') and 'x' in l.split('|')[1]]
    assert len(table_rows) == len(rows)
    for r in rows:
        bs, sl, h = r['shape']
        assert min(r['fastai_ms'], r['compiled_ms'], r['ours_ms'], r['clone_ms'], r['compile_s'],
                   r['ours_compiled_ms']) > 0
        assert r['compile_error'] is None
        assert f"{bs}x{sl}x{h} {r['dtype']} {r['compile_s']:.1f} s" in out  # the compile time, apart from the table
        assert r['speedup'] == pytest.approx(r['fastai_ms'] / r['ours_ms'])
        # one thread (the tests' fixture): ours is also timed in turns with compiled, and compared with it there
        assert r['ours_in_turns_ms'] > 0 and r['ours_per_compiled'] == pytest.approx(
            r['ours_in_turns_ms'] / r['compiled_ms'])
        assert r['ours_per_clone'] == pytest.approx(r['ours_ms'] / r['clone_ms'])
        assert r['ours_saved_bytes'] == 0
        # fastai's TAR keeps the float32 difference; for bf16 AR keeps a float32 copy of the dropped output too
        diff = 4 * bs * (sl - 1) * h
        assert r['fastai_saved_bytes'] == diff + (4 * bs * sl * h if r['dtype'] == 'bfloat16' else 0)


def test_bench_train_quick(tmp_path, capsys):
    """Both models' tables: the AWD-LSTM LM's and the small time-series LSTM's, each with its peer; the small model's
    also with the peer compiled, or a note that says why not"""
    path = tmp_path / 'train.json'
    assert main(['bench', '--train', '--quick', '--json', str(path)]) == 0
    out = capsys.readouterr().out
    both = json.loads(path.read_text())
    for key, peer, title in (('train', 'fastai RNNRegularizer', 'AWD-LSTM LM'),
                             ('train_small', 'forward hook + fastai expressions', 'Time-series LSTM classifier')):
        res = both[key]
        runs = ['no penalty', 'TARCallback', peer]
        if key == 'train_small':
            compiled = 'forward hook + compiled fastai expressions'
            if res['notes']: assert res['notes'][0].startswith('Note: no compiled variant') and res['notes'][0] in out
            else: runs.append(compiled)
        assert list(res['epoch_s']) == runs and list(res['epoch_cpu_s']) == runs
        assert all(v > 0 for v in [*res['epoch_s'].values(), *res['epoch_cpu_s'].values()])
        for col, pct in (('epoch_s', 'overhead_pct'), ('epoch_cpu_s', 'overhead_cpu_pct')):
            assert res[pct]['TARCallback'] == pytest.approx(
                100 * (res[col]['TARCallback'] / res[col]['no penalty'] - 1))
        assert res['title'].startswith(title) and res['title'] in out
        for run in runs: assert f'| {run} |' in out
    small = both['train_small']
    assert (small['c_in'], small['seq_len'], small['epochs']) == (3, 12, 2)


def test_small_ts_model_is_found_by_the_callback():
    "`TARCallback()` with no argument finds the bench's time-series LSTM: AR and TAR of its output"
    from fastai.learner import Learner
    from fastai_tar import TARCallback
    learn = Learner(None, bench.SmallTSModel(), loss_func=torch.nn.CrossEntropyLoss(), cbs=TARCallback())
    assert repr(learn.tar).endswith('; TAR the last RNN module, rnn (LSTM): beta=1.0; (settled at the first training '
                                    'batch)')
    assert bench.SmallTSModel()(torch.randn(5, 3, 100)).shape == (5, 4)


def test_allocator_default_and_already_kept(tmp_path, capsys, monkeypatch):
    "--allocator default times in this process with glibc's defaults; a process started with the setting needs no child"
    def no_child(*args, **kwargs): raise AssertionError('a child process was started')
    monkeypatch.setattr(bench.subprocess, 'run', no_child)
    argv = ['bench', '--shapes', '2x3x4', '--dtypes', 'float32', '--repeats', '1']
    assert main([*argv, '--allocator', 'default', '--json', str(tmp_path / 'a.json')]) == 0
    assert "allocator: glibc's defaults (--allocator default)" in capsys.readouterr().out
    assert json.loads((tmp_path / 'a.json').read_text())['environment']['allocator'] == 'default'
    monkeypatch.setenv('GLIBC_TUNABLES', bench.KEEP_FREED)
    assert main(argv) == 0
    assert 'allocator: timed in this process, started with GLIBC_TUNABLES=' in capsys.readouterr().out


def test_bench_history_quick(tmp_path, capsys):
    "The history's bytes per batch, measured over a real fit: 36 B of items for AR+TAR, held within 64 B"
    path = tmp_path / 'history.json'
    assert main(['bench', '--history', '--quick', '--json', str(path)]) == 0
    out = capsys.readouterr().out
    res = json.loads(path.read_text())['history']
    assert res['batches'] == bench.HISTORY_BATCHES['quick'] and res['terms'] == 2
    assert res['item_bytes'] == 36 * res['batches'] and res['item_bytes_per_batch'] == 36
    assert 36 <= res['held_bytes_per_batch'] <= 64
    assert res['frame_rows'] == 1_000_000 and res['frame_s'] > 0
    assert '| bytes per batch (row items) | 36.0 |' in out


@pytest.fixture
def no_bench(monkeypatch):
    "The bench itself fails the test if it starts: bad options must be caught before any measuring."
    def refuse(*args, **kwargs): raise AssertionError('the bench started despite a bad option')
    monkeypatch.setattr(bench, 'bench_table', refuse)
    monkeypatch.setattr(bench, 'train_epochs', refuse)


@pytest.mark.parametrize('argv,text', [
    (['--shapes', '4x1x8'], '--shapes'),  # sl=1: no TAR pair to time
    (['--shapes', '4x8'], '--shapes'),
    (['--dtypes', 'float8'], '--dtypes: unknown float8'),
    (['--dtypes', ','], "--dtypes ',' names no dtype: give at least one of float32"),
    (['--repeats', '0'], '--repeats'),
    (['--threads', '0'], '--threads'),
    (['--train', '--epochs', '0'], '--epochs must be >= 1'),
    (['--device', 'gpu'], "--device 'gpu' cannot run the bench here"),
    (['--device', 'meta'], "--device 'meta' cannot run the bench here"),  # a device without data
    (['--device', 'cuda:99'], "--device 'cuda:99' cannot run the bench here"),  # no CUDA, or no 100th GPU
])
def test_bench_bad_options(argv, text, capsys, no_bench):
    assert main(['bench', '--quick', *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith('fastai-tar bench: error:') and text in err and err.count('\n') == 1


@pytest.mark.parametrize('train', [False, True])
def test_bench_bad_json_path(train, tmp_path, capsys, no_bench):
    "An unwritable --json fails at once, before the bench: a folder, a missing folder, a file as the folder."
    (tmp_path / 'file').write_text('x')
    cases = {str(tmp_path): 'is a folder', str(tmp_path / 'missing' / 'b.json'): 'cannot write there',
             str(tmp_path / 'file' / 'b.json'): 'cannot write there'}
    for path, text in cases.items():
        assert main(['bench', '--quick', *(['--train'] if train else []), '--json', path]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f'fastai-tar bench: error: --json {path!r}') and text in err and err.count('\n') == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ['file']  # nothing created, no probe left behind


def test_bench_json_replaces_existing_file(tmp_path, capsys):
    path = tmp_path / 'bench.json'
    path.write_text('old')
    assert main(['bench', '--quick', '--shapes', '2x3x4', '--dtypes', 'float32', '--repeats', '1',
                 '--json', str(path)]) == 0
    assert json.loads(path.read_text())['rows'][0]['shape'] == [2, 3, 4]


def test_format_table():
    row = dict(shape=[64, 70, 1152], dtype='float32', fastai_ms=17.04, compiled_ms=3.55, ours_ms=4.26, clone_ms=0.9,
               speedup=4.0, ours_per_compiled=1.2, ours_per_clone=4.73, compile_s=4.51, compile_error=None,
               fastai_saved_bytes=20_348_928, ours_saved_bytes=0, ours_compiled_ms=3.6)
    failed = dict(row, shape=[2, 3, 4], compiled_ms=None, ours_compiled_ms=None, ours_per_compiled=None,
                  compile_s=None, compile_error='BackendCompilerFailed: no C++ compiler')
    lines = format_table([row, failed]).splitlines()
    assert lines[-2] == \
        '| 64x70x1152 | float32 | 17.04 | 3.55 | 4.26 | 0.90 | 4.0x | 1.20 | 4.7 | 20.3 MB | 0 B | 3.60 |'
    assert lines[-1] == '| 2x3x4 | float32 | 17.04 | - | 4.26 | 0.90 | 4.0x | - | 4.7 | 20.3 MB | 0 B | - |'
    text = format_compile([row, failed])
    assert 'took: 64x70x1152 float32 4.5 s' in text and '2x3x4' not in text
    assert text.splitlines()[-1] == 'torch.compile could not run here: BackendCompilerFailed: no C++ compiler'


def test_compile_failure_leaves_the_other_columns(monkeypatch, capsys):
    "Where torch.compile cannot run (no C++ compiler, an unsupported Python), the row says why and the bench goes on"
    def broken(gm, example_inputs): raise RuntimeError('no C++ compiler found')
    monkeypatch.setattr(bench, 'COMPILE_BACKEND', broken)
    # (in this process: a backend that is a function cannot be sent to a child process)
    assert main(['bench', '--shapes', '2x3x4', '--dtypes', 'float32', '--repeats', '1', '--allocator', 'default']) == 0
    out = capsys.readouterr().out
    assert '| 2x3x4 | float32 |' in out and '| - |' in out
    assert 'torch.compile could not run here:' in out and 'no C++ compiler found' in out
