"""What the per-batch history costs: bytes per training batch over a long fit, and the time to build its frame.

Used by `fastai-tar bench --history`. The bytes are counted twice: the rows' items (`PenaltyHistory.nbytes`)
and what the host arrays hold with their spare capacity (`sys.getsizeof`) after the fit.
"""
import sys
import time

import numpy as np
import torch

from ..report import PenaltyHistory

__all__ = ['history_cost', 'frame_seconds', 'format_history']


def history_cost(
    batches: int = 5000,  # training batches of the fit, one epoch
    seed: int = 0,  # weights, data and dropout masks
) -> dict:
    "Fit a tiny AWD-LSTM LM with `TARCallback()` for `batches` batches; the history's bytes per batch"
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.text.all import AWD_LSTM, awd_lstm_lm_config, get_language_model
    from fastai.text.data import LMDataLoader
    from fastai.torch_core import set_seed
    from ..callback import TARCallback
    set_seed(seed)
    bs, sl, vocab = 2, 4, 50
    toks = torch.randint(vocab, (bs * (batches * sl + 1) + bs * (sl + 1),))
    n_train = bs * (batches * sl + 1)
    dls = DataLoaders(LMDataLoader([toks[:n_train]], bs=bs, seq_len=sl, num_workers=0),  # in memory: no worker
                      LMDataLoader([toks[n_train:]], bs=bs, seq_len=sl, num_workers=0), device='cpu')
    cfg = dict(awd_lstm_lm_config, emb_sz=8, n_hid=8, n_layers=1)
    learn = Learner(dls, get_language_model(AWD_LSTM, vocab, config=cfg), loss_func=CrossEntropyLossFlat(),
                    cbs=TARCallback())
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    log = learn.tar.log
    held = sum(sys.getsizeof(a) for s in log.segments for a in (s.iters, s.values, s.coefs))
    terms = sum(len(s.reads) for s in log.segments)
    return dict(batches=len(log), terms=terms, item_bytes=log.nbytes, held_bytes=held,
                item_bytes_per_batch=log.nbytes / len(log), held_bytes_per_batch=held / len(log))


def frame_seconds(
    rows: int = 1_000_000,  # rows of a synthetic history with one AR and one TAR term
) -> float:
    "Seconds to build `learn.tar.history`'s DataFrame from `rows` recorded batches"
    from types import SimpleNamespace
    log = PenaltyHistory()
    log.use([SimpleNamespace(kind='ar', name='1.output_dp'), SimpleNamespace(kind='tar', name='0')])
    seg = log.segments[-1]
    seg.iters.frombytes(np.arange(rows, dtype=np.int64).tobytes())
    seg.values.frombytes(np.random.default_rng(0).random((rows, 3), dtype=np.float32).tobytes())
    seg.coefs.frombytes(np.tile([2., 1.], rows).tobytes())
    start = time.perf_counter()
    df = log.frame()
    assert len(df) == rows
    return time.perf_counter() - start


def format_history(res: dict) -> str:
    "The history's cost as a Markdown table"
    return '\n'.join([
        f"history of a {res['batches']}-batch fit with TARCallback() ({res['terms']} terms: AR and TAR)", '',
        '| measure | value |', '|---|---:|',
        f"| bytes per batch (row items) | {res['item_bytes_per_batch']:.1f} |",
        f"| bytes per batch (held, with the arrays' spare capacity) | {res['held_bytes_per_batch']:.1f} |",
        f"| seconds to build learn.tar.history of {res['frame_rows']:,} rows | {res['frame_s']:.3f} |"])
