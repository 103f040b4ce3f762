"The fastai book's chapter 12 data built offline (`fastai_tar.book`): the numbers in words, continuing streams"
import pytest
import torch

from fastai_tar.book import group_chunks, human_numbers, human_numbers_dls, number_words


@pytest.mark.parametrize('n, words', [
    (1, 'one'), (13, 'thirteen'), (20, 'twenty'), (21, 'twenty one'), (100, 'one hundred'),
    (110, 'one hundred ten'), (999, 'nine hundred ninety nine'), (1000, 'one thousand'),
    (1005, 'one thousand five'), (8001, 'eight thousand one'), (9999, 'nine thousand nine hundred ninety nine'),
])
def test_number_words(n, words):
    assert number_words(n) == words


@pytest.mark.parametrize('bad', [0, 10000, 2.0, '3'])
def test_number_words_rejects_what_the_dataset_lacks(bad):
    with pytest.raises(ValueError, match='n must be an int from 1 to 9999'): number_words(bad)


def test_the_chapters_text_and_vocab():
    assert human_numbers(12).startswith('one . two . three') and human_numbers(12).endswith('eleven . twelve')
    dls = human_numbers_dls()
    # the chapter's vocab: (#30) ['one','.','two','three',...], in order of first appearance
    assert dls.vocab[:4] == ['one', '.', 'two', 'three'] and len(dls.vocab) == 30 and dls.vocab[-1] == 'thousand'
    assert (len(dls.train), len(dls.valid)) == (49, 12)  # the chapter's 64 x 16 batches, 80/20


def test_group_chunks_as_the_chapter_writes_it():
    assert list(group_chunks(list(range(10)), 3)) == [0, 3, 6, 1, 4, 7, 2, 5, 8]


def test_each_row_continues_the_row_of_the_batch_before():
    "What a stateful model (ModelResetter, LMModel7's `self.h`) relies on; y is x shifted by one token."
    dls = human_numbers_dls(upto=200, bs=4, sl=5)
    batches = list(dls.train)
    for (x, y), (x_next, _) in zip(batches, batches[1:]):
        assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(x_next[:, 0], y[:, -1])


def test_no_worker_processes():
    "fastai's default forks a worker per core each epoch: Python >= 3.12 warns about that fork in a threaded process"
    assert [dl.fake_l.num_workers for dl in human_numbers_dls(upto=200, bs=4, sl=5).loaders] == [0, 0]


def test_too_small_a_corpus_says_so():
    with pytest.raises(ValueError, match='upto=5 gives .* too few'): human_numbers_dls(upto=5)
