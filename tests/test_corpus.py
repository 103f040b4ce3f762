"Tests of `fastai_tar.corpus`: the offline Python documentation corpus, user text, the split and the loaders."
import socket
import zlib

import pytest
import torch
from fastai.torch_core import set_seed

from fastai_tar import corpus
from fastai_tar.corpus import (CorpusError, CorpusNotFoundError, corpus_frame, lm_dls, python_docs, read_texts,
                                     split_blocks, to_blocks)


@pytest.fixture(scope='module')
def docs(): return python_docs()


@pytest.fixture
def offline(monkeypatch):
    "Any attempt to reach the network fails loudly."
    def refuse(*args, **kwargs): raise AssertionError('the corpus tried to use the network')
    for name in ('connect', 'connect_ex'): monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(socket, 'create_connection', refuse)
    monkeypatch.setattr(socket, 'getaddrinfo', refuse)


def sentences(n, tag=''):
    return '\n\n'.join(f'Paragraph {tag}{i} says something plain about the weather today.' for i in range(n))


# --- the Python documentation corpus -----------------------------------------------------------------
def test_python_docs_deterministic_nonempty(docs):
    again = python_docs()
    assert again == docs
    names = [n for n, _ in docs]
    assert len(set(names)) == len(names)
    assert any(n.startswith('topics/') for n in names) and any(n.startswith('stdlib/') for n in names)
    assert all(t.strip() for _, t in docs)
    assert sum(len(t) for _, t in docs) > 500_000  # ~1 MB on CPython 3.11: enough for a few-minute LM


def test_python_docs_is_the_prose_of_the_sources(docs):
    from pydoc_data.topics import topics
    text = dict(docs)
    # a sentence of the `if` statement's help text, unwrapped onto one line
    raw = ' '.join(topics['if'].split())
    assert 'It selects exactly one of the suites by evaluating the expressions one by one' in raw
    assert 'It selects exactly one of the suites by evaluating the expressions one by one' in text['topics/if']
    assert 'if_stmt ::=' not in text['topics/if']  # the grammar rule is indented: not prose
    assert '***' not in text['topics/if']  # nor the title's underline
    import json
    assert json.__doc__.splitlines()[0] in text['stdlib/json']
    assert '>>>' not in text['stdlib/json']


def test_prose_filter():
    text = ("Title\n*****\n\nThe first line of a paragraph\nand its second line.\n\n"
            "   code = 'indented'\n   more()\n\n>>> 1 + 1\n2\n\nx = {1: 2, 3: 4, 5: [6, 7]} + (8, 9)\n\n"
            "Too short.\n\nThe last\tparagraph, with a tab.")
    assert corpus._prose(text) == ("The first line of a paragraph and its second line.\n\n"
                                   "The last paragraph, with a tab.")


def test_python_docs_offline(offline):
    df = corpus_frame(max_chars=20_000)
    dls = lm_dls(df, bs=4, bptt=10)
    assert len(dls.train) > 0 and len(dls.valid) > 0


# --- user text -----------------------------------------------------------------------------------------
def test_read_texts_file(tmp_path):
    f = tmp_path / 'book.txt'
    f.write_text('Héllo wörld.\nSecond line.\n', encoding='utf-8')
    assert read_texts(f) == [('book.txt', 'Héllo wörld.\nSecond line.\n')]


def test_read_texts_folder(tmp_path):
    (tmp_path / 'b.txt').write_text('bee')
    (tmp_path / 'sub').mkdir()
    (tmp_path / 'sub' / 'a.txt').write_text('ay')
    (tmp_path / 'a.txt').write_text('first')
    (tmp_path / 'notes.md').write_text('not read')
    assert read_texts(tmp_path) == [('a.txt', 'first'), ('b.txt', 'bee'), ('sub/a.txt', 'ay')]


def test_read_texts_errors(tmp_path):
    "Bad corpora raise `CorpusError`, a ValueError (and FileNotFoundError for a missing one); not the CLI's error."
    missing = tmp_path / 'missing.txt'
    with pytest.raises(CorpusNotFoundError, match='does not exist') as e: read_texts(missing)
    assert isinstance(e.value, ValueError) and isinstance(e.value, FileNotFoundError) and str(missing) in str(e.value)
    with pytest.raises(CorpusError, match='no .txt files'): read_texts(tmp_path)
    bad = tmp_path / 'latin1.txt'
    bad.write_bytes('caf\xe9'.encode('latin-1'))
    with pytest.raises(CorpusError, match='not UTF-8'): read_texts(bad)
    assert issubclass(CorpusError, ValueError)


def test_corpus_frame_user_file(tmp_path):
    f = tmp_path / 'text.txt'
    f.write_text(sentences(400))
    df = corpus_frame(f, block_chars=500)
    assert list(df.columns) == ['name', 'text', 'is_valid']
    assert '\n\n'.join(df.text) == f.read_text()  # blocks are cut only at paragraph breaks, in order
    assert df.is_valid.sum() == round(0.1 * len(df))
    assert df.equals(corpus_frame(f, block_chars=500))


def test_corpus_frame_errors(tmp_path):
    empty = tmp_path / 'empty.txt'
    empty.write_text(' \n\n \n')
    with pytest.raises(CorpusError, match='empty'): corpus_frame(empty)
    tiny = tmp_path / 'tiny.txt'
    tiny.write_text('One short paragraph.')
    with pytest.raises(CorpusError, match='too little to split'): corpus_frame(tiny)
    with pytest.raises(CorpusNotFoundError): corpus_frame(tmp_path / 'nope')
    with pytest.raises(ValueError, match='max_chars'): corpus_frame(tiny, max_chars=0)


def test_corpus_frame_max_chars(docs, monkeypatch):
    monkeypatch.setattr(corpus, 'python_docs', lambda: docs)  # built once for the module: it takes seconds
    full, df = corpus_frame(), corpus_frame(max_chars=50_000)
    for is_valid, limit in ((False, 45_000), (True, 5_000)):
        side, whole = df[df.is_valid == is_valid], full[full.is_valid == is_valid]
        assert list(side.name) == list(whole.name[:len(side)])  # the first blocks of each side
        lens = side.text.str.len()
        assert lens.sum() - lens.iloc[-1] < limit <= lens.sum()  # up to the block that reaches the limit


# --- blocks and the split -----------------------------------------------------------------------------
def test_to_blocks():
    e = 'e' * 9
    doc = 'aaaa\nbbbb\n\ncccc\n\ndddd\n' + '\n'.join([e] * 10)
    blocks = to_blocks([('d', doc)], block_chars=8)
    assert blocks == [('d#0', 'aaaa\nbbbb'),  # 10 characters: closed at the next paragraph break
                      # 'cccc' is too short to close at its break; no later break, so the block is cut at
                      # the line that takes it past 4 * 8 characters
                      ('d#1', '\n'.join(['cccc', '', 'dddd', e, e, e])),
                      ('d#2', '\n'.join([e] * 4)),
                      ('d#3', '\n'.join([e] * 3))]
    assert to_blocks([('e', '\n \n')]) == []


def test_split_blocks_sizes_and_hash():
    blocks = [(f'b{i}', f'text {i}') for i in range(37)]
    df = split_blocks(blocks, valid_pct=0.2)
    assert df.is_valid.sum() == round(0.2 * 37)
    crc = sorted((zlib.crc32(f'b{i}'.encode()), f'b{i}') for i in range(37))
    assert set(df.name[df.is_valid]) == {n for _, n in crc[:7]}
    assert split_blocks(blocks[:2], 0.1).is_valid.sum() == 1  # at least one block each side
    assert split_blocks(blocks[:2], 0.9).is_valid.sum() == 1


def test_split_blocks_stable_when_blocks_are_added():
    "A block's side depends on its name alone, until the valid share changes."
    blocks = [(f'b{i}', 'x') for i in range(50)]
    small, large = split_blocks(blocks[:40], 0.1), split_blocks(blocks, 0.1)
    valid_small = set(small.name[small.is_valid])
    assert valid_small <= set(large.name[large.is_valid])


def test_split_blocks_errors():
    with pytest.raises(CorpusError, match='too little'): split_blocks([('a', 'x')])
    with pytest.raises(ValueError, match='valid_pct'): split_blocks([('a', 'x'), ('b', 'y')], valid_pct=1.)


# --- fastai loaders ---------------------------------------------------------------------------------------
@pytest.fixture
def small_df(tmp_path):
    f = tmp_path / 'text.txt'
    f.write_text(sentences(60, 'n'))
    return corpus_frame(f, block_chars=300)


def test_lm_dls_stream(small_df):
    dls = lm_dls(small_df, bs=4, bptt=8, min_freq=1)
    x, y = dls.one_batch()
    assert x.shape == y.shape == (4, 8)
    assert torch.equal(x[:, 1:], y[:, :-1])  # the target is the next token
    words = [dls.vocab[i] for i in x[0]]
    assert set(words) <= set(dls.vocab) and 'xxbos' in dls.vocab and 'paragraph' in dls.vocab
    n_train = sum(len(t.split()) for t in small_df.text[~small_df.is_valid])
    assert sum(dls.train.lens) > n_train  # words, plus xxbos/xxmaj and the final full stops


def test_lm_dls_in_process_no_files(small_df, tmp_path, monkeypatch):
    "Tokenization runs in this process and writes no cache."
    import fastai.text.core
    def no_pool(*a, **k): raise AssertionError('tokenization started worker processes')
    monkeypatch.setattr(fastai.text.core, 'ProcessPoolExecutor', no_pool)
    work = tmp_path / 'cwd'
    work.mkdir()
    monkeypatch.chdir(work)
    lm_dls(small_df, bs=4, bptt=8)
    assert list(work.iterdir()) == []


def test_lm_dls_deterministic(small_df):
    a, b = (lm_dls(small_df, bs=4, bptt=8, seed=1, min_freq=1) for _ in range(2))
    assert list(a.vocab) == list(b.vocab)

    def stream(dls, seed):  # fastai's LMDataLoader shuffles from the global RNG when an iteration starts
        set_seed(seed)
        return [x for x, _ in dls.train]
    same = lambda p, q: len(p) == len(q) and all(torch.equal(x, y) for x, y in zip(p, q))
    assert same(stream(a, 1), stream(b, 1))
    assert not same(stream(a, 1), stream(a, 2))  # the seed does set the order: the check can fail


def test_lm_dls_errors(small_df):
    with pytest.raises(CorpusError, match='valid set holds fewer than bs'): lm_dls(small_df, bs=500, bptt=8)
    with pytest.raises(ValueError, match='bptt'): lm_dls(small_df, bs=4, bptt=0)
    with pytest.raises(TypeError, match='bs'): lm_dls(small_df, bs=4.)


def test_default_tokenizer_without_spacy(monkeypatch):
    import sys
    from fastai.text.core import BaseTokenizer, SpacyTokenizer
    assert isinstance(corpus.default_tokenizer(), SpacyTokenizer)
    monkeypatch.setitem(sys.modules, 'spacy', None)  # `import spacy` raises ImportError
    assert isinstance(corpus.default_tokenizer(), BaseTokenizer)
