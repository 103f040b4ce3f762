"The per-batch record of the penalty: a DataFrame and a plot in the spirit of `learn.recorder.plot_loss()`."
import numpy as np
import pandas as pd
import torch

from .targets import COEF_ARG

__all__ = ['rows_to_cpu', 'history_frame', 'plot_history']



def rows_to_cpu(
    rows: list,  # history rows whose loss and terms may still be on the accelerator
) -> list:
    "The same rows with loss and terms on the CPU, moved in one transfer, not one device sync per batch."
    if not rows: return rows
    iters, losses, terms, coefs = zip(*rows)
    losses = torch.stack([l.detach().float().mean() for l in losses]).cpu()
    return list(zip(iters, losses, torch.stack(terms).cpu(), coefs))


def history_frame(
    rows: list,  # per training batch: (iter, plain loss, weighted terms as one tensor, coefficients), one per target
    targets: list,  # the `Target`s the terms and coefficients belong to, in order
) -> pd.DataFrame:
    """One row per training batch: iter, loss, ar, tar, alpha, beta (the weighted terms and the coefficients used).

    A kind regularized at several modules also gets one column per module, `tar:<name>` with names from
    `model.named_modules()`; when those modules have different coefficients, `alpha`/`beta` is NaN and
    `beta:<name>` holds each module's coefficient.
    """
    cols = ['iter', 'loss', 'ar', 'tar', 'alpha', 'beta']
    if not rows: return pd.DataFrame(columns=cols)
    iters, losses, terms, coefs = zip(*rows_to_cpu(rows))
    losses, terms = torch.stack(losses).numpy(), torch.stack(terms).double().numpy()
    coefs = np.asarray(coefs, dtype=np.float64).reshape(len(rows), len(targets))
    df = pd.DataFrame({'iter': iters, 'loss': losses})
    idx = {k: [i for i, t in enumerate(targets) if t.kind == k] for k in COEF_ARG}
    for kind in COEF_ARG: df[kind] = terms[:, idx[kind]].sum(axis=1)
    extra = {}
    for kind, coef in COEF_ARG.items():
        c = coefs[:, idx[kind]]
        shared = c.shape[1] > 0 and (c == c[:, :1]).all()
        df[coef] = c[:, 0] if shared else np.nan
        if len(idx[kind]) > 1:
            extra.update({f'{kind}:{targets[i].name}': terms[:, i] for i in idx[kind]})
            if not shared: extra.update({f'{coef}:{targets[i].name}': coefs[:, i] for i in idx[kind]})
    return pd.concat([df, pd.DataFrame(extra)], axis=1) if extra else df


def plot_history(
    df: pd.DataFrame,  # `history_frame`'s output
    ax=None,  # a matplotlib Axes to draw on; None makes a new figure
):
    "Plot the plain loss (left axis) and the weighted AR and TAR terms (right axis) against the training iteration."
    import matplotlib.pyplot as plt
    if not len(df): raise ValueError("learn.tar.plot() has nothing to draw: no training batch was recorded; "
                                     "call learn.fit first")
    if ax is None: _, ax = plt.subplots(figsize=(6, 4))
    lines = ax.plot(df['iter'], df['loss'], color='C0', label='loss')
    ax.set_xlabel('iteration'); ax.set_ylabel('loss'); ax.set_title('loss and weighted AR/TAR')
    # The penalty is usually orders of magnitude below the loss: on the loss's axis it would be a flat line.
    pen = ax.twinx()
    for kind, color in (('ar', 'C1'), ('tar', 'C2')):
        if df[kind].abs().sum() > 0: lines += pen.plot(df['iter'], df[kind], color=color, label=f'{kind} (weighted)')
    pen.set_ylabel('weighted penalty')
    ax.legend(lines, [l.get_label() for l in lines])
    return ax.figure
