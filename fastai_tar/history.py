"The per-batch record of the penalty: a DataFrame and a plot in the spirit of `learn.recorder.plot_loss()`."
import pandas as pd
import torch

__all__ = ['history_frame', 'plot_history']


def history_frame(
    rows: list,  # (iter, loss, weighted terms as one tensor, alpha, beta) per training batch
    targets: list,  # the `Target`s whose weighted values the term tensors hold, in order
) -> pd.DataFrame:
    "One row per training batch: iter, loss, ar, tar, alpha, beta, and per-module columns where a kind has several."
    kinds = [t.kind for t in targets]
    cols = ['iter', 'loss', 'ar', 'tar', 'alpha', 'beta']
    if not rows: return pd.DataFrame(columns=cols)
    iters, losses, terms, alphas, betas = zip(*rows)
    # One transfer of all the batches' values, not one `.item()` (a device sync) per batch.
    losses = torch.stack([l.float().mean() for l in losses]).cpu().numpy()
    terms = torch.stack(terms).cpu().numpy()
    df = pd.DataFrame({'iter': iters, 'loss': losses})
    for kind in ('ar', 'tar'):
        df[kind] = terms[:, [i for i, k in enumerate(kinds) if k == kind]].sum(axis=1)
    df['alpha'], df['beta'] = alphas, betas
    for kind in ('ar', 'tar'):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        if len(idx) > 1:
            for i in idx: df[f'{kind}:{targets[i].name}'] = terms[:, i]
    return df


def plot_history(
    df: pd.DataFrame,  # `history_frame`'s output
    ax=None,  # a matplotlib Axes to draw on; None makes a new figure
):
    "Plot the plain loss and the weighted AR and TAR terms against the training iteration; return the figure."
    import matplotlib.pyplot as plt
    if ax is None: _, ax = plt.subplots(figsize=(6, 4))
    ax.plot(df['iter'], df['loss'], label='loss')
    for kind in ('ar', 'tar'):
        if len(df) and df[kind].abs().sum() > 0: ax.plot(df['iter'], df[kind], label=f'{kind} (weighted)')
    ax.set_xlabel('iteration'); ax.set_ylabel('value'); ax.legend()
    return ax.figure
