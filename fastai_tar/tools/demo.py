"""Train a small AWD-LSTM language model offline, without and with AR/TAR, and compare the runs.

With no arguments the text is the Python documentation corpus built from this Python install
(`fastai_tar.corpus`); every run starts from the same seed on the same batches, so the runs differ
only in alpha and beta. The table gives each run's validation loss, perplexity and smoothness:
the unweighted TAR of the validation activations (`valid_tar`, lower is smoother). A plot and the
table as JSON and CSV are written to --out. The default run takes 2.5 to 5 minutes on 2 otherwise idle
CPU cores (2-core AMD EPYC VMs with and without AVX-512), longer when other jobs share them; --quick
takes 10 to 30 seconds.
"""
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback
from fastcore.basics import noop
# fastai.text.all, not the single modules: it also patches in `fit_one_cycle` and the progress bars
from fastai.text.all import AWD_LSTM, Perplexity, awd_lstm_lm_config, language_model_learner, set_seed
from matplotlib.figure import Figure

from ..callback import TARCallback
from .cli import UsageError, check_writable
from ..corpus import CorpusError, corpus_frame, lm_dls

__all__ = ['PRESETS', 'TABLE_COLUMNS', 'run', 'make_runs', 'EpochTimer', 'EpochLogger', 'train_run', 'results_table',
           'plot_results']

# The default size trains in a few minutes on 2 CPU cores and leaves TAR's effect on smoothness plain
# to see; `quick` only checks that everything works. The model follows AWD-LSTM, scaled down.
PRESETS = {
    'default': dict(epochs=6, bs=32, bptt=50, emb_sz=64, n_hid=256, n_layers=2, lr=5e-3, drop_mult=0.5,
                    max_chars=None),
    'quick': dict(epochs=2, bs=16, bptt=20, emb_sz=16, n_hid=32, n_layers=2, lr=1e-2, drop_mult=0.5,
                  max_chars=60_000),
}
TABLE_COLUMNS = ['run', 'alpha', 'beta', 'valid_loss', 'perplexity', 'valid_tar', 'epoch_s']


def _settings(args) -> dict:
    "The preset with the options given on the command line, checked before any work starts."
    s = dict(PRESETS['quick' if args.quick else 'default'])
    s.update({k: getattr(args, k) for k in ('epochs', 'bs', 'bptt') if getattr(args, k) is not None})
    s['threads'] = args.threads
    for k, low in (('epochs', 1), ('bs', 1), ('bptt', 2), ('threads', 1)):
        if s[k] < low: raise UsageError(f"--{k} must be >= {low}, got {s[k]}"
                                        + (' (TAR compares consecutive time steps)' if k == 'bptt' else ''))
    for k in ('alpha', 'beta'):
        bad = [v for v in getattr(args, k) if not (math.isfinite(v) and v >= 0)]
        if bad: raise UsageError(f"--{k} values must be finite numbers >= 0, got {bad[0]:g}")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir(): raise UsageError(f"--out {str(out)!r} is a file, not a folder")
    return s


def _run_name(alpha: float, beta: float) -> str:
    parts = [f'{k}{v:g}' for k, v in (('ar', alpha), ('tar', beta)) if v]
    return '+'.join(parts) or 'baseline'


def make_runs(
    alphas: list,  # AR coefficients to try
    betas: list,  # TAR coefficients to try
) -> list[tuple[str, float, float]]:
    "`(name, alpha, beta)`: the baseline (0, 0) first, then every (alpha, beta) pair of the sweep once"
    pairs = [(0., 0.)] + [(float(a), float(b)) for a in alphas for b in betas]
    pairs = list(dict.fromkeys(pairs))  # keeps the order, drops repeats (an explicit 0, 0 is the baseline)
    return [(_run_name(a, b), a, b) for a, b in pairs]


class EpochLogger(Callback):
    """fastai's fit table as plain lines, one per epoch, and no progress bars: for output that is not a terminal.

    fastprogress writes its bars to files and CI logs too, as carriage returns and bar glyphs."""
    order = ProgressCallback.order

    def before_fit(self):
        self.old_logger, self.widths = self.learn.logger, None
        if self.old_logger is noop: return  # `learn.no_logging()`
        self.learn.logger = self._write
        self._write(self.recorder.metric_names)

    def after_fit(self): self.learn.logger = self.old_logger

    def _write(self, log):
        cells = [f'{v:.6f}' if isinstance(v, float) else str(v) for v in log]  # as `ProgressCallback` writes them
        if self.widths is None: self.widths = [max(len(c), 8) for c in cells]  # the header sets the columns
        print('  '.join(c.ljust(w) for c, w in zip(cells, self.widths)).rstrip(), flush=True)


class EpochTimer(Callback):
    "Wall seconds of each epoch of the last fit, training and validation"
    def before_fit(self): self.times = []
    def before_epoch(self): self._start = time.perf_counter()
    def after_epoch(self): self.times.append(time.perf_counter() - self._start)


def train_run(
    dls,  # language-model `DataLoaders` (`fastai_tar.corpus.lm_dls`); each run trains on its own copy
    alpha: float,  # AR coefficient
    beta: float,  # TAR coefficient
    epochs: int = 6,  # epochs of `fit_one_cycle`
    lr: float = 5e-3,  # maximum learning rate of the one-cycle schedule
    seed: int = 42,  # seeds the weights, the dropout masks and the batch order
    config: dict | None = None,  # AWD-LSTM sizes (`emb_sz`, `n_hid`, `n_layers`) to change in `awd_lstm_lm_config`
    drop_mult: float = 0.5,  # scales all AWD-LSTM dropouts
    path='.',  # the learner's path (nothing is saved there)
) -> dict:
    "Train one AWD-LSTM LM with `TARCallback(alpha, beta, valid_metrics=True)`; its final values and per-epoch history"
    cfg = awd_lstm_lm_config.copy()
    cfg.update(config or {})
    # A fresh copy of the untouched loaders: shuffling reorders a loader's items in place, so a reused one
    # would feed the second run its batches in another order.
    dls = copy.deepcopy(dls)
    set_seed(seed)
    # alpha=beta=0 for fastai's own RNNRegularizer: the TARCallback alone regularizes.
    learn = language_model_learner(dls, AWD_LSTM, config=cfg, pretrained=False, drop_mult=drop_mult,
                                   alpha=0., beta=0., metrics=[Perplexity()], path=path,
                                   cbs=[TARCallback(alpha=alpha, beta=beta, valid_metrics=True), EpochTimer()])
    if not sys.stdout.isatty(): learn.remove_cb(ProgressCallback).add_cb(EpochLogger())
    learn.fit_one_cycle(epochs, lr)
    names = learn.recorder.metric_names[1:-1]  # drop 'epoch' and 'time'
    history = [dict(epoch=i, **{n: float(v) for n, v in zip(names, vals)})
               for i, vals in enumerate(learn.recorder.values)]
    last = history[-1]
    return dict(run=_run_name(alpha, beta), alpha=alpha, beta=beta, valid_loss=last['valid_loss'],
                perplexity=last['perplexity'], valid_tar=last['valid_tar'], valid_ar=last['valid_ar'],
                # the median: the first epoch of a process also pays one-off start-up costs
                epoch_s=statistics.median(learn.epoch_timer.times), history=history)


def results_table(results: list[dict]):
    "The runs' final values as a DataFrame with `TABLE_COLUMNS`"
    return pd.DataFrame([{k: r[k] for k in TABLE_COLUMNS} for r in results], columns=TABLE_COLUMNS)


def plot_results(
    results: list[dict],  # `train_run` outputs
    fname=None,  # where to save a PNG; None only returns the figure
):
    "Validation perplexity and smoothness (`valid_tar`) per epoch, one line per run; returns the figure"
    # A bare `Figure`, not pyplot: saving renders it with Agg, and no display or pyplot state is involved.
    fig = Figure(figsize=(9, 3.4))
    axs = fig.subplots(1, 2)
    for r in results:
        epochs = [h['epoch'] + 1 for h in r['history']]
        for ax, key in zip(axs, ('perplexity', 'valid_tar')):
            ax.plot(epochs, [h[key] for h in r['history']], marker='o', label=r['run'])
    for ax, title in zip(axs, ('validation perplexity', 'validation TAR (smoothness, lower is smoother)')):
        ax.set_title(title, fontsize=10); ax.set_xlabel('epoch'); ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axs[0].legend()
    fig.tight_layout()
    if fname is not None: fig.savefig(fname, dpi=80)
    return fig


def _summary(table) -> list[str]:
    "One line per regularized run: how its smoothness and perplexity compare with the baseline's."
    base = table.iloc[0]
    return [f"{r.run}: valid_tar {base.valid_tar:.4g} -> {r.valid_tar:.4g} ({r.valid_tar / base.valid_tar:.2f}x the "
            f"baseline's), perplexity {base.perplexity:.2f} -> {r.perplexity:.2f}"
            for r in table.iloc[1:].itertuples()]


def _caveat(s: dict) -> str | None:
    "What the numbers of a run smaller or shorter than the default one cannot show, or None for a full-size run"
    full = PRESETS['default']
    if s['max_chars'] is None and s['epochs'] >= full['epochs']: return None
    size = f"a tiny model on at most {s['max_chars']:,} characters, " if s['max_chars'] is not None else ''
    return (f"Note: {size}{s['epochs']} epoch(s): a check that everything works. A run this small or short does not "
            f"show what the default one ({full['epochs']} epochs on the whole corpus) shows:\nthe regularized run may "
            "have a worse perplexity than the baseline and, after very few epochs, even a larger valid_tar.")


def _first_missing(path: Path) -> Path | None:
    "The outermost folder of `path` that does not exist yet: what `mkdir(parents=True)` creates; None if it exists"
    missing = None
    for p in (path, *path.parents):
        if p.exists(): break
        missing = p
    return missing


def _remove_created(written: list[Path], made: Path | None, out: Path) -> str:
    "Delete the files this run wrote and the folders it made (if they hold nothing else); says what it removed"
    for f in written: f.unlink(missing_ok=True)
    if made is None: return f"no results written to {out}" if not written else f"removed the files it wrote to {out}"
    for d in (out, *out.parents):  # innermost first; a folder that holds someone else's files stays
        try: d.rmdir()
        except OSError: return f"no results written; {out} kept (it holds other files)"
        if d == made: break
    return f"no results written (removed {made}, which it had created)"


def run(args) -> int:
    "`fastai-tar demo`: train the runs, print the table, write the plot and the tables to --out"
    s = _settings(args)
    torch.set_num_threads(s['threads'])
    out = Path(args.out).expanduser()
    source = 'the Python documentation corpus' if args.corpus is None else f'corpus {args.corpus!r}'
    print(f"Building {source}...", flush=True)
    try:
        df = corpus_frame(args.corpus, max_chars=s['max_chars'])
        dls = lm_dls(df, bs=s['bs'], bptt=s['bptt'], seed=args.seed, path=out)
    # the text the user named is bad input, for the command as for `--bs`; the library says so in its own terms
    except CorpusError as e: raise UsageError(str(e)) from None
    made = _first_missing(out)
    # after the corpus checks (a bad corpus leaves nothing behind), before any training
    check_writable(out, f'--out {str(out)!r}', create=True)
    written = []  # Ctrl-C removes these, so that no folder of half-written results is left
    try:
        n_tok = {k: int(sum(dl.lens)) for k, dl in (('train', dls.train), ('valid', dls.valid))}
        print(f"{len(df)} blocks ({int(df.is_valid.sum())} valid), {n_tok['train']} train / {n_tok['valid']} valid "
              f"tokens, vocab {len(dls.vocab)}", flush=True)
        config = {k: s[k] for k in ('emb_sz', 'n_hid', 'n_layers')}
        results = []
        for name, alpha, beta in make_runs(args.alpha, args.beta):
            print(f"\n== {name}: alpha={alpha:g}, beta={beta:g} ==", flush=True)
            results.append(train_run(dls, alpha, beta, s['epochs'], s['lr'], args.seed, config, s['drop_mult'], out))
        table = results_table(results)
        files = {'plot': out/'tar_demo.png', 'json': out/'results.json', 'csv': out/'results.csv'}
        written.append(files['plot']); plot_results(results, files['plot'])
        written.append(files['csv']); table.to_csv(files['csv'], index=False)
        meta = dict(corpus=args.corpus or 'python_docs', blocks=len(df), valid_blocks=int(df.is_valid.sum()),
                    vocab=len(dls.vocab), seed=args.seed, **{f'{k}_tokens': v for k, v in n_tok.items()}, **s)
        written.append(files['json'])
        files['json'].write_text(json.dumps(dict(settings=meta, runs=results), indent=1) + '\n')
    except KeyboardInterrupt:
        raise KeyboardInterrupt(_remove_created(written, made, out)) from None
    print('\n' + table.to_string(index=False, float_format=lambda v: f'{v:.4g}'))
    for line in _summary(table): print(line)
    if (note := _caveat(s)) is not None: print('\n' + note)
    print('\nWrote ' + ', '.join(str(f) for f in files.values()))
    return 0
