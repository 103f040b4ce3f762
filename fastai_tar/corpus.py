"""The demo's text: an English corpus built offline from the Python install, or the user's own `.txt` files.

`python_docs()` reads what ships with every CPython: the reference manual's topics that `help()` shows
(`pydoc_data.topics`) and the docstrings of the standard library, parsed from its source files with
`ast`: no module is imported or run, nothing is downloaded or copied into this repository. Code samples, grammar
rules and underlines are dropped so that what is left is prose. `corpus_frame` cuts the documents
into blocks and splits the blocks into train and valid by a hash of their names, so the split is
the same in every run; `lm_dls` tokenizes them with fastai's tokenizer into language-model
`DataLoaders`, in this process and in memory.
"""
import ast
import os
import re
import sys
import sysconfig
import tokenize
import zlib
from pathlib import Path
from typing import Any

import pandas as pd
from fastai.data.block import DataBlock
from fastai.data.core import DataLoaders
from fastai.data.transforms import ColReader, ColSplitter
from fastai.text.core import BaseTokenizer, WordTokenizer
from fastai.text.data import TextBlock, _get_lengths
from fastai.torch_core import set_seed
from pydoc_data.topics import topics

from .arg_docs import add_arg_docs

__all__ = ['CorpusError', 'CorpusNotFoundError', 'python_docs', 'read_texts', 'to_blocks', 'split_blocks',
           'corpus_frame', 'default_tokenizer', 'lm_dls']

_UNDERLINE = re.compile(r'^\s*([*=~^#-])\1{2,}\s*$')  # reST title underlines: '*****', '====='
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


class CorpusError(ValueError):
    "The text cannot make the corpus asked for (unreadable, empty, too little): `fastai-tar demo` calls it bad input"


class CorpusNotFoundError(CorpusError, FileNotFoundError):
    "The corpus path does not exist: a `CorpusError`, and a `FileNotFoundError` for callers that catch that"


def _is_prose(par: str) -> bool:
    "A paragraph of sentences: not indented (code, grammar, option tables), not a doctest, mostly letters."
    if par[:1].isspace() or par.startswith(('>>>', '...')): return False
    letters = sum(c.isalpha() or c == ' ' for c in par)
    return len(par.split()) >= 4 and letters >= 0.8 * len(par)


def _prose(text: str) -> str:
    "The prose paragraphs of a reST-like text, each unwrapped onto one line, separated by blank lines."
    lines = [l for l in text.expandtabs().splitlines() if not _UNDERLINE.match(l)]
    pars = re.split(r'\n\s*\n', '\n'.join(lines))
    return '\n\n'.join(' '.join(p.split()) for p in pars if p.strip() and _is_prose(p.strip('\n')))


def _source_file(stdlib: Path, name: str) -> Path | None:
    for p in (stdlib/f'{name}.py', stdlib/name/'__init__.py'):
        if p.is_file(): return p
    return None  # a module built into the interpreter or written in C: it has no source file


def _docstrings(path: Path) -> list[str]:
    "The module, class and function docstrings of a source file, in source order."
    try:
        with tokenize.open(path) as f: tree = ast.parse(f.read())
    # A source file this interpreter cannot read (a vendor's patch, a file for another version) adds nothing.
    except (SyntaxError, UnicodeDecodeError, OSError, ValueError): return []
    return [d for node in ast.walk(tree) if isinstance(node, _DOC_NODES) and (d := ast.get_docstring(node))]


def python_docs() -> list[tuple[str, str]]:
    "`(name, text)` documents: the topics of Python's `help()` and the standard library's docstrings, prose only"
    docs = [(f'topics/{k}', topics[k]) for k in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()['stdlib'])
    for name in sorted(sys.stdlib_module_names):
        src = _source_file(stdlib, name)
        if src is not None: docs.append((f'stdlib/{name}', '\n\n'.join(_docstrings(src))))
    docs = [(n, _prose(t)) for n, t in docs]
    return [(n, t) for n, t in docs if t]


@add_arg_docs
def read_texts(
    path: str | os.PathLike,  # a text file, or a folder whose `.txt` files (in subfolders too) are read in sorted order
) -> list[tuple[str, str]]:
    "`(name, text)` documents from the user's own text, read as UTF-8 and kept as written"
    path = Path(path).expanduser()
    if not path.exists():
        raise CorpusNotFoundError(f"corpus {str(path)!r} does not exist: pass a .txt file or a folder of .txt files")
    files = [path] if path.is_file() else sorted(p for p in path.rglob('*.txt') if p.is_file())
    if not files: raise CorpusError(f"corpus folder {str(path)!r} has no .txt files in it")
    docs = []
    for f in files:
        try: text = f.read_text(encoding='utf-8')
        except UnicodeDecodeError as e:
            raise CorpusError(f"corpus file {str(f)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        except OSError as e: raise CorpusError(f"corpus file {str(f)!r} cannot be read: {e.strerror}") from None
        docs.append((f.relative_to(path).as_posix() if f != path else f.name, text))
    return docs


@add_arg_docs
def to_blocks(
    docs: list[tuple[str, str]],  # `(name, text)` documents
    block_chars: int = 2000,  # a block closes at the first paragraph break after this many characters
) -> list[tuple[str, str]]:
    "Cut each document at paragraph breaks (or at line breaks, past 4x `block_chars`) into `(name#i, text)` blocks"
    blocks = []
    for name, text in docs:
        cur, size, i = [], 0, 0
        for line in text.splitlines():
            cur.append(line); size += len(line) + 1
            if size >= block_chars and (not line.strip() or size >= 4 * block_chars):
                if ''.join(cur).strip(): blocks.append((f'{name}#{i}', '\n'.join(cur).strip('\n'))); i += 1
                cur, size = [], 0
        if ''.join(cur).strip(): blocks.append((f'{name}#{i}', '\n'.join(cur).strip('\n')))
    return blocks


@add_arg_docs
def split_blocks(
    blocks: list[tuple[str, str]],  # `(name, text)` blocks with distinct names
    valid_pct: float = 0.1,  # share of the blocks that go to the validation set
) -> pd.DataFrame:
    "A DataFrame (name, text, is_valid): the `round(valid_pct*n)` blocks (at least 1) of lowest name hash are valid"
    if not 0 < valid_pct < 1: raise ValueError(f"valid_pct must be between 0 and 1, got {valid_pct!r}")
    n = len(blocks)
    if n < 2:
        raise CorpusError(f"the corpus has {sum(len(t) for _, t in blocks)} characters of text, too little to split "
                         "into a train and a validation set: give it more text")
    # A hash of the name, not a random draw: the split is the same on every run and every machine, and
    # a block keeps its side when other documents are added or removed.
    n_valid = min(n - 1, max(1, round(valid_pct * n)))
    valid = set(sorted(range(n), key=lambda i: (zlib.crc32(blocks[i][0].encode()), i))[:n_valid])
    return pd.DataFrame({'name': [b[0] for b in blocks], 'text': [b[1] for b in blocks],
                         'is_valid': [i in valid for i in range(n)]})


@add_arg_docs
def corpus_frame(
    path: str | os.PathLike | None = None,  # None: the Python docs corpus (`python_docs`); else a .txt file or folder
    valid_pct: float = 0.1,  # share of the blocks in the validation set
    block_chars: int = 2000,  # approximate characters per block
    max_chars: int | None = None,  # keep only the first blocks of each side, about this many characters in all
) -> pd.DataFrame:
    "The corpus as a DataFrame of blocks (name, text, is_valid), the same on every call"
    if max_chars is not None and not max_chars >= 1:
        raise ValueError(f"max_chars must be >= 1 or None, got {max_chars!r}")
    docs = python_docs() if path is None else read_texts(path)
    where = 'the Python documentation corpus' if path is None else f'corpus {str(path)!r}'
    if not any(t.strip() for _, t in docs): raise CorpusError(f"{where} is empty: it holds no text")
    df = split_blocks(to_blocks(docs, block_chars), valid_pct)
    return df if max_chars is None else _first_chars(df, max_chars, valid_pct)


def _first_chars(df: pd.DataFrame, max_chars: int, valid_pct: float) -> pd.DataFrame:
    "The first blocks of each side, `valid_pct` of `max_chars` for valid, the rest for train; at least one each."
    keep = pd.Series(False, index=df.index)
    for is_valid, limit in ((False, (1 - valid_pct) * max_chars), (True, valid_pct * max_chars)):
        side = df.is_valid == is_valid
        before = df.text.str.len()[side].cumsum() - df.text.str.len()[side]  # characters ahead of each block
        keep[before.index[before < limit]] = True
    return df[keep].reset_index(drop=True)


def default_tokenizer() -> BaseTokenizer | WordTokenizer:
    "fastai's `WordTokenizer` (spaCy's rules for English, no model download), or `BaseTokenizer` without spaCy"
    try: return WordTokenizer()
    except ImportError: return BaseTokenizer()  # splits on spaces: coarser tokens, same pipeline


@add_arg_docs
def lm_dls(
    df: pd.DataFrame,  # `corpus_frame`'s output
    bs: int = 32,  # sequences per batch
    bptt: int = 70,  # tokens per sequence
    seed: int | None = 42,  # seeds the loaders' build; each epoch's LM shuffle reads the global RNG (seed before fit)
    min_freq: int = 3,  # tokens rarer than this become `xxunk`
    max_vocab: int = 60000,  # the vocabulary's size limit
    tok: Any = None,  # a fastai tokenizer; None is `default_tokenizer()`
    path: str | os.PathLike = '.',  # the `DataLoaders`' path (where a learner saves)
    **kwargs,  # more `DataBlock.dataloaders` arguments
) -> DataLoaders:
    "fastai language-model `DataLoaders` of the corpus, tokenized here in memory: no worker processes, no files"
    for v, arg in ((bs, 'bs'), (bptt, 'bptt')):
        if isinstance(v, bool) or not isinstance(v, int): raise TypeError(f"{arg} must be an integer >= 1, got {v!r}")
        if v < 1: raise ValueError(f"{arg} must be an integer >= 1, got {v!r}")
    # n_workers=0: tokenize in this process (fastai's default starts a process per core, for seconds of work).
    block = TextBlock.from_df('text', is_lm=True, seq_len=bptt, min_freq=min_freq, max_vocab=max_vocab,
                              tok=tok if tok is not None else default_tokenizer(), n_workers=0)
    dblock = DataBlock(blocks=block, get_x=ColReader('text'), splitter=ColSplitter('is_valid'))
    if seed is not None: set_seed(seed)
    # `dblock.dataloaders` in two steps, to count the tokens in between: with fewer than bs+1 in a set, the
    # set has no batch, and fastai's loaders fail with a bare IndexError (train) or come out empty (valid).
    dsets = dblock.datasets(df)
    for name, ds in (('train', dsets.train), ('valid', dsets.valid)):
        if sum(_get_lengths(ds)) < bs + 1:  # the tokenizer's counts, which `LMDataLoader` reads too
            raise CorpusError(f"the {name} set holds fewer than bs+1={bs + 1} tokens: use a smaller bs or more text")
    return dsets.dataloaders(path=path, after_item=dblock.item_tfms, after_batch=dblock.batch_tfms,
                             **{**dblock.dls_kwargs, 'bs': bs, 'seq_len': bptt, 'num_workers': 0, **kwargs})
