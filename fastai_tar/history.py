"The per-batch record of the penalty: compact flat arrays, a DataFrame and a plot like `learn.recorder.plot_loss()`."
from array import array

import numpy as np
import pandas as pd
import torch

from .plan import KINDS


__all__ = ['PenaltyHistory', 'plot_history']


class PenaltyHistory:
    """Per training batch: the iteration, the plain loss, each target's weighted term and its coefficient.

    Rows live in flat host arrays: 8 bytes for the iteration, 4 for the loss, 4 per term and 8 per coefficient
    (36 bytes a batch for one AR and one TAR term), not a tuple of Python objects. Within an epoch the loss and
    terms stay where the model is, in one buffer that doubles when full: no host sync and no tensor per batch
    until `flush` moves them in one transfer (the callback flushes after each training epoch)."""
    def __init__(self,
        n_terms: int,  # weighted terms per row: one per `Target`
    ):
        self.n_terms = n_terms
        self.iters, self.values, self.coefs = array('q'), array('f'), array('d')  # values: (loss, *terms) per row
        self._buf, self._n_buf = None, 0  # rows not yet flushed, on the model's device

    def __len__(self): return len(self.iters)

    @property
    def nbytes(self) -> int:
        "Bytes the rows take on the host (the arrays' items, without their spare capacity)"
        return sum(a.itemsize * len(a) for a in (self.iters, self.values, self.coefs))

    def add(self,
        it: int,  # the training iteration (`learn.train_iter`)
        loss: torch.Tensor,  # the plain loss; an unreduced loss is recorded as its mean
        terms,  # one weighted term per target: 0-d tensors, or a 1-d tensor
        coefs: list,  # one float coefficient per target
    ):
        "Record one batch without reading a value back from the device: one kernel writes the row into the buffer"
        loss = loss.detach()
        if self._buf is None or self._n_buf == len(self._buf):
            grown = loss.new_empty((max(64, 2 * self._n_buf), 1 + self.n_terms), dtype=torch.float32)
            if self._buf is not None: grown[:self._n_buf] = self._buf
            self._buf = grown
        torch.stack([loss if loss.dim() == 0 else loss.float().mean(), *terms], out=self._buf[self._n_buf])
        self._n_buf += 1
        self.iters.append(it)
        self.coefs.extend(coefs)

    def flush(self):
        "Move the rows still on the device to the host arrays: one transfer"
        if self._n_buf: self.values.frombytes(self._buf[:self._n_buf].cpu().numpy().tobytes())
        self._buf, self._n_buf = None, 0

    def _arrays(self) -> tuple:
        self.flush()
        n = len(self)
        return (np.frombuffer(self.iters, dtype=np.int64),
                np.frombuffer(self.values, np.float32).reshape(n, 1 + self.n_terms),
                np.frombuffer(self.coefs, np.float64).reshape(n, self.n_terms))

    def term_means(self,
        start: int,  # the first row of the span, e.g. the epoch's first batch
    ) -> np.ndarray | None:
        "Mean of each weighted term over the rows from `start` on; None when there are none"
        if len(self) <= start: return None
        return self._arrays()[1][start:, 1:].astype(np.float64).mean(axis=0)

    def frame(self,
        targets: list,  # the `Target`s the terms and coefficients belong to, in order
    ) -> pd.DataFrame:
        """One row per training batch: iter, loss, ar, tar, alpha, beta (the weighted terms and the coefficients used).

        A kind regularized at several modules also gets one column per module, `tar:<name>` with names from
        `model.named_modules()`; when those modules have different coefficients, `alpha`/`beta` is NaN and
        `beta:<name>` holds each module's coefficient.
        """
        if not len(self): return pd.DataFrame(columns=['iter', 'loss', *KINDS, *(k.coef_arg for k in KINDS.values())])
        iters, values, coefs = self._arrays()
        terms = values[:, 1:].astype(np.float64)
        df = pd.DataFrame({'iter': iters, 'loss': values[:, 0]})
        idx = {k: [i for i, t in enumerate(targets) if t.kind == k] for k in KINDS}
        for kind in KINDS: df[kind] = terms[:, idx[kind]].sum(axis=1)
        extra = {}
        for kind, coef in ((k, v.coef_arg) for k, v in KINDS.items()):
            c = coefs[:, idx[kind]]
            shared = c.shape[1] > 0 and (c == c[:, :1]).all()
            df[coef] = c[:, 0] if shared else np.nan
            if len(idx[kind]) > 1:
                extra.update({f'{kind}:{targets[i].name}': terms[:, i] for i in idx[kind]})
                if not shared: extra.update({f'{coef}:{targets[i].name}': coefs[:, i] for i in idx[kind]})
        return pd.concat([df, pd.DataFrame(extra)], axis=1) if extra else df


def plot_history(
    df: pd.DataFrame,  # `PenaltyHistory.frame`'s output
    ax=None,  # a matplotlib Axes to draw on; None makes a new figure
):
    "Plot the plain loss (left axis) and the weighted AR and TAR terms (right axis) against the training iteration."
    import matplotlib.pyplot as plt
    if not len(df): raise ValueError("learn.tar.plot() has nothing to draw: no training batch was recorded; "
                                     "call learn.fit first")
    # constrained layout leaves room for the twin axis's label on the right, also in `fig.savefig(...)`
    if ax is None: _, ax = plt.subplots(figsize=(6, 4), layout='constrained')
    lines = ax.plot(df['iter'], df['loss'], color='C0', label='loss')
    ax.set_xlabel('iteration'); ax.set_ylabel('loss'); ax.set_title('loss and weighted AR/TAR')
    # The penalty is usually orders of magnitude below the loss: on the loss's axis it would be a flat line.
    pen = ax.twinx()
    for kind, color in zip(KINDS, ('C1', 'C2')):
        if df[kind].abs().sum() > 0: lines += pen.plot(df['iter'], df[kind], color=color, label=f'{kind} (weighted)')
    pen.set_ylabel('weighted penalty')
    ax.legend(lines, [l.get_label() for l in lines])
    return ax.figure
