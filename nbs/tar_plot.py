"""Draw the README's picture of `learn.tar.plot()`: `python nbs/tar_plot.py [OUT.png]`, default nbs/images/tar_plot.png.

A small AWD-LSTM language model trains offline on the Python documentation corpus (`fastai_tar.corpus`)
with AR on and TAR warming up from 0 (`beta=SchedLin(0., 1.)`), and prints its fit table, history and repr.
"""
import sys
from pathlib import Path

import matplotlib
matplotlib.use('Agg')  # a file needs no display
from fastai.text.all import AWD_LSTM, Perplexity, SchedLin, awd_lstm_lm_config, language_model_learner, set_seed

from fastai_tar import TARCallback
from fastai_tar.corpus import corpus_frame, lm_dls


def main(out=Path(__file__).parent / 'images' / 'tar_plot.png', epochs=3, max_chars=400_000):
    set_seed(42)
    dls = lm_dls(corpus_frame(max_chars=max_chars), bs=32, bptt=40)
    cfg = awd_lstm_lm_config.copy()
    cfg.update(emb_sz=64, n_hid=128, n_layers=2)
    learn = language_model_learner(dls, AWD_LSTM, config=cfg, pretrained=False, drop_mult=0.5, alpha=0., beta=0.,
                                   metrics=[Perplexity()], cbs=TARCallback(beta=SchedLin(0., 1.), valid_metrics=True))
    print(learn.tar)
    learn.fit_one_cycle(epochs, 5e-3)
    print(learn.tar.history.tail())
    fig = learn.tar.plot()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    print(f'wrote {out}')


if __name__ == '__main__': main(*map(Path, sys.argv[1:2]))
