"""The fastai book's chapter 12 data ("A Language Model from Scratch"), built offline.

fastai's `URLs.HUMAN_NUMBERS` is the numbers 1 to 9999 written as English words, one per line; the chapter joins
them with ' . ', numericalizes the words, cuts the stream into sequences of `sl` tokens (the target is the input
shifted by one) and deals them into `bs` streams (`group_chunks`) so that a stateful model sees each stream
continue from one batch to the next. `human_numbers_dls` does the same without the download.
"""
from fastai.data.core import DataLoaders
from fastcore.foundation import L
import torch

from .arg_docs import add_arg_docs

__all__ = ['number_words', 'human_numbers', 'group_chunks', 'human_numbers_dls']

_ONES = ('zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen '
         'seventeen eighteen nineteen').split()
_TENS = 'zero ten twenty thirty forty fifty sixty seventy eighty ninety'.split()


def number_words(n: int) -> str:
    "`n` (1 to 9999) in words as the dataset writes it: 'nine thousand nine hundred ninety nine'."
    if not isinstance(n, int) or not 1 <= n <= 9999: raise ValueError(f"n must be an int from 1 to 9999, got {n!r}")
    words = []
    for unit, name in ((1000, 'thousand'), (100, 'hundred')):
        if n >= unit: words += [_ONES[n // unit], name]; n %= unit
    if n >= 20: words.append(_TENS[n // 10]); n %= 10
    if n: words.append(_ONES[n])
    return ' '.join(words)


def human_numbers(upto: int = 9999) -> str:
    "The numbers 1 to `upto` in words, joined by ' . ' as the chapter joins the dataset's lines."
    return ' . '.join(number_words(i) for i in range(1, upto + 1))


def group_chunks(ds, bs: int) -> L:
    "The chapter's `group_chunks`: reorder `ds` so that row j of every batch continues row j of the batch before."
    m = len(ds) // bs
    return L(ds[i + m * j] for i in range(m) for j in range(bs))


@add_arg_docs
def human_numbers_dls(
    upto: int = 9999,  # the corpus: the numbers 1 to `upto`
    bs: int = 64,  # batch size (the chapter's 64)
    sl: int = 16,  # sequence length (the chapter's 16)
    valid_pct: float = 0.2,  # the last 20% of the sequences are the validation set, as in the chapter
) -> DataLoaders:
    "The chapter's DataLoaders for `LMModel7`, on the CPU: `bs` streams of `sl` tokens, not shuffled, `drop_last`."
    tokens = human_numbers(upto).split(' ')
    vocab = list(dict.fromkeys(tokens))
    word2idx = {w: i for i, w in enumerate(vocab)}
    nums = torch.tensor([word2idx[w] for w in tokens])
    seqs = L((nums[i:i + sl], nums[i + 1:i + sl + 1]) for i in range(0, len(nums) - sl - 1, sl))
    cut = int(len(seqs) * (1 - valid_pct))
    if cut // bs == 0 or (len(seqs) - cut) // bs == 0:
        raise ValueError(f"upto={upto} gives {len(seqs)} sequences of sl={sl}: too few for a training and a "
                         f"validation batch of bs={bs}")
    # num_workers=0: the batches are slices of tensors in memory, and fastai's default forks a worker per core each
    # epoch, which Python >= 3.12 warns about (DeprecationWarning) in a process with threads
    dls = DataLoaders.from_dsets(group_chunks(seqs[:cut], bs), group_chunks(seqs[cut:], bs), bs=bs, drop_last=True,
                                 shuffle=False, device='cpu', num_workers=0)
    dls.vocab = vocab
    return dls
