"Shared fixtures: tiny fastai text models and in-memory data, small enough for 2 CPU cores."
import pytest
import torch
from fastai.text.all import AWD_LSTM, DataLoaders, awd_lstm_lm_config, awd_lstm_clas_config, get_language_model

VOCAB, BS, SL = 30, 4, 12


def tiny_config(clas=False, **kw):
    "An AWD-LSTM config a few hundred parameters wide; dropout stays on (weight_p=0 breaks ModelResetter)."
    cfg = (awd_lstm_clas_config if clas else awd_lstm_lm_config).copy()
    cfg.update(emb_sz=8, n_hid=12, n_layers=2, **kw)
    return cfg


def tiny_lm(seed=0, **kw):
    torch.manual_seed(seed)
    return get_language_model(AWD_LSTM, VOCAB, config=tiny_config(**kw))


def lm_dls(n=16, bs=BS, sl=SL, seed=0):
    "In-memory language-model DataLoaders: y is x shifted by one token; `dls.vocab` as fastai's LM learners expect."
    g = torch.Generator().manual_seed(seed)
    stream = torch.randint(2, VOCAB, (n * (sl + 1),), generator=g).view(n, sl + 1)
    items = list(zip(stream[:, :-1], stream[:, 1:]))
    dls = DataLoaders.from_dsets(items, items[: max(bs, n // 4)], bs=bs, shuffle=False, device='cpu', num_workers=0)
    dls.vocab = [f'w{i}' for i in range(VOCAB)]
    return dls


@pytest.fixture
def dls(): return lm_dls()


@pytest.fixture(autouse=True, scope='session')
def one_thread():
    "Tiny models on 2 cores: a second intra-op thread only adds contention (a 10 ms fit took 2 s with two)."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
