"""One batch's reading (`fastai_tar.reading`): how each read takes its tensors from the forward's calls (the one call;
steps chained by their state, joined in call order; the calls you picked; replicas' shards; the dropout calls that
received what TAR reads), the checks it makes (calls without gradient skipped, in-place changes and calls that no
longer chain refused), the masks (a PackedSequence's lengths, a classifier's padding, the batch's mask and-ed with
them, shapes that do not fit refused), and `term_sums` against float64 references."""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from fastai.text.all import AWD_LSTM, get_text_classifier

from fastai_tar.capture import Forward, versions
from fastai_tar.module_facts import activation_item
from fastai_tar.plan import Read
from fastai_tar.reading import PlanBroken, gather, term_sums

from conftest import VOCAB, ref_sums, tiny_config


def tar_read(module, seq_dim=1, steps=False, axes_given=False, **kw):
    "A TAR read of `module` as the plan makes one: the item of its output that its class defines"
    kw.setdefault('item', (activation_item(module) or (None,))[0])
    return Read('tar', 'rnn', module, ('beta', None), 'named', 'named by you', seq_dim=seq_dim, steps=steps,
                axis_why='test', axes_given=axes_given, **kw)


def call(module, output, args=(), kwargs=None, grad=True, called=None):
    "A call as the capture records it, with the version counters of its output's tensors when it was returned"
    return (module, args, kwargs or {}, output, versions(output), grad, called or module)


def forward(*calls, training=True): return Forward((), {}, None, training, list(calls))


def parts_of(read, *calls, training=True, mask=None):
    return gather([read], forward(*calls, training=training), mask=mask)[read]


def decoder_calls(gru, x):
    "A decoder feeding a GRU one step at a time, its state carried from call to call"
    h, calls = None, []
    for t in range(x.shape[1]):
        out = gru(x[:, t:t + 1], h)
        calls.append(call(gru, out, (x[:, t:t + 1], h)))
        h = out[1]
    return calls


def test_steps_that_chain_are_joined_in_call_order_with_their_gradient():
    torch.manual_seed(0)
    gru, x = nn.GRU(3, 4, batch_first=True), torch.randn(2, 5, 3)
    (h, mask, sd), = parts_of(tar_read(gru), *decoder_calls(gru, x))
    assert sd == 1 and mask is None and h.shape == (2, 5, 4)
    torch.testing.assert_close(h, gru(x)[0])  # the sequence the calls made
    h.pow(2).sum().backward()
    assert gru.weight_hh_l0.grad.abs().sum() > 0


def test_a_cells_steps_gain_a_time_axis_and_are_joined():
    torch.manual_seed(0)
    cell, x = nn.GRUCell(3, 4), torch.randn(2, 5, 3)
    h, calls = None, []
    for t in range(5):
        out = cell(x[:, t], h)
        calls.append(call(cell, out, (x[:, t], h)))
        h = out
    (got, _, sd), = parts_of(tar_read(cell, steps=True), *calls)
    assert sd == 1 and torch.equal(got, torch.stack([c[3] for c in calls], 1))
    (got, _, sd), = parts_of(tar_read(cell, seq_dim=0, steps=True), *calls)
    assert sd == 0 and got.shape == (5, 2, 4)


def test_calls_that_do_not_chain_are_refused_unless_picked_and_picked_sequences_stay_apart():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, batch_first=True)
    a, b = lstm(torch.randn(2, 5, 3)), lstm(torch.randn(2, 6, 3))
    calls = call(lstm, a, (None,)), call(lstm, b, (None,))
    with pytest.raises(PlanBroken, match=r"ran 2 times in this forward, and its calls are not the steps of one"):
        parts_of(tar_read(lstm), *calls)
    parts = parts_of(tar_read(lstm, call='all'), *calls)
    assert [p[0] for p in parts] == [a[0], b[0]] and [p[2] for p in parts] == [1, 1]
    assert [p[0] for p in parts_of(tar_read(lstm, call=-1), *calls)] == [b[0]]
    assert [p[0] for p in parts_of(tar_read(lstm, call=[1, 0]), *calls)] == [a[0], b[0]]


def test_replicas_are_shards_each_read_apart():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, batch_first=True)
    a, b = lstm(torch.randn(2, 5, 3)), lstm(torch.randn(2, 5, 3))
    shards = call(lstm, a, called=nn.Identity()), call(lstm, b, called=nn.Identity())
    assert [p[0] for p in parts_of(tar_read(lstm), *shards)] == [a[0], b[0]]


def test_calls_without_grad_are_skipped_in_training_only():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, batch_first=True)
    with torch.no_grad(): burn_in = lstm(torch.randn(2, 5, 3))
    real = lstm(torch.randn(2, 5, 3), burn_in[1])
    calls = call(lstm, burn_in, grad=False), call(lstm, real, (None, burn_in[1]))
    assert [p[0] for p in parts_of(tar_read(lstm), *calls)] == [real[0]]
    (h, _, _), = parts_of(tar_read(lstm), *calls, training=False)  # outside training the two calls chain
    assert torch.equal(h, torch.cat([burn_in[0], real[0]], 1))
    with pytest.raises(PlanBroken, match=r"'rnn' \(LSTM\) did not run in this forward"):
        parts_of(tar_read(lstm), calls[0])
    missing = []
    assert gather([tar_read(lstm)], forward(training=False), missing=missing) == {} and len(missing) == 1


def test_an_in_place_change_after_the_module_is_refused():
    torch.manual_seed(0)
    gru = nn.GRU(3, 4, batch_first=True)
    out = gru(torch.randn(2, 5, 3))
    c = call(gru, out)
    out[0].add_(1.)  # `out += x` after the module
    with pytest.raises(RuntimeError, match=r"changed in place after it left the module \(its autograd history now "
                                           r"ends in AddBackward0"):
        parts_of(tar_read(gru), c)


def test_the_dropout_calls_that_took_what_tar_reads_and_none_other():
    torch.manual_seed(0)
    lstm, drop = nn.LSTM(3, 4, batch_first=True), nn.Dropout(0.5)
    x = torch.randn(2, 5, 3)
    emb, out = drop(x), lstm(x)
    dropped = drop(out[0])
    tar = tar_read(lstm)
    ar = Read('ar', 'drop', drop, ('alpha', None), 'found', '', via=tar, seq_dim=1)
    fwd = forward(call(drop, emb, (x,)), call(lstm, out, (x,)), call(drop, dropped, (out[0],)))
    got = gather([ar, tar], fwd)
    assert [p[0] for p in got[ar]] == [dropped] and [p[0] for p in got[tar]] == [out[0]]
    with pytest.raises(PlanBroken, match=r"no call of 'drop' took the output of 'rnn'"):
        gather([ar], forward(call(drop, emb, (x,)), call(lstm, out, (x,))))


def test_masks_of_packed_sequences_and_classifiers_and_the_batchs_mask_with_them():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4)  # sequence-first, but a PackedSequence is unpacked batch-first
    x = torch.randn(3, 5, 3)
    packed = lstm(pack_padded_sequence(x, torch.tensor([5, 2, 1]), batch_first=True))
    (h, mask, sd), = parts_of(tar_read(lstm, seq_dim=0), call(lstm, packed))
    assert sd == 1 and h.shape == (3, 5, 4)
    assert mask.tolist() == [[True] * 5, [True, True] + [False] * 3, [True] + [False] * 4]
    with pytest.raises(ValueError, match=r"seq_dim=0 contradicts the time axis of rnn's PackedSequence"):
        parts_of(tar_read(lstm, seq_dim=0, axes_given=True), call(lstm, packed))
    yours = torch.ones(3, 5, dtype=torch.bool)
    yours[0, -1] = False
    (_, both, _), = parts_of(tar_read(lstm, seq_dim=0), call(lstm, packed), mask=yours)
    assert both.tolist()[0] == [True] * 4 + [False] and torch.equal(both[1:], mask[1:])

    enc = get_text_classifier(AWD_LSTM, VOCAB, 2, config=tiny_config(clas=True))[0]
    out, pad = torch.randn(3, 5, 4), torch.zeros(3, 5, dtype=torch.bool)
    pad[0, :2] = True
    (got, mask, sd), = parts_of(tar_read(enc, item=0, masked=True), call(enc, (out, pad)), training=False)
    assert got is out and torch.equal(mask, ~pad) and sd == 1

    seq_first = torch.randn(5, 3, 4)  # time x batch x features: the batch's mask is transposed to it
    ident = nn.Identity()
    (_, m, _), = parts_of(tar_read(ident, seq_dim=0), call(ident, seq_first), mask=yours)
    assert torch.equal(m, yours.T)


def test_a_batch_mask_that_does_not_fit_is_refused_naming_both_shapes():
    h = torch.randn(3, 5, 4)
    ident = nn.Identity()
    with pytest.raises(ValueError, match=r"mask= of shape \(3, 6\) does not fit 'rnn', a tensor \(3, 5, 4\).*its batch "
                                         r"x time is \(3, 5\)"):
        parts_of(tar_read(ident), call(ident, h), mask=torch.ones(3, 6, dtype=torch.bool))
    ar = Read('ar', 'rnn', ident, ('alpha', None), 'named', '')
    with pytest.raises(ValueError, match=r"the time axis of 'rnn' \(Identity\), which AR reads, is not known: pass "
                                         r"seq_dim="):
        parts_of(ar, call(ident, h), mask=torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"does not fit 'rnn', a tensor \(3, 4\)"):
        parts_of(tar_read(ident, seq_dim=0), call(ident, h[:, 0]), mask=torch.ones(3, 5, dtype=torch.bool))


def test_outputs_it_cannot_read():
    ident = nn.Identity()
    for bad in ({'h': torch.randn(2, 3)}, torch.ones(3, 5, dtype=torch.long), torch.tensor(1.)):
        with pytest.raises(TypeError, match=r"cannot read 'rnn' \(Identity\): this batch it returned a"):
            parts_of(tar_read(ident), call(ident, bad))


# --- term_sums -------------------------------------------------------------------------------------------------------
def close(got, expected):
    s, n = got
    torch.testing.assert_close(s.double(), expected[0], rtol=1e-5, atol=1e-6)
    assert int(n) == int(expected[1])


def test_term_sums_match_float64_references():
    torch.manual_seed(0)
    a, t, t2 = torch.randn(3, 6, 4), torch.randn(3, 6, 4), torch.randn(3, 7, 4)
    valid = torch.rand(3, 6) > 0.3
    ar = Read('ar', 'drop', None, ('alpha', None), 'found', '')
    tar = Read('tar', 'rnn', None, ('beta', None), 'found', '', seq_dim=1)
    stats = term_sums({ar: [(a, valid, None)], tar: [(t, None, 1)]})  # one AR and one TAR: fused
    close(stats[ar], ref_sums(a, valid)[:2])
    close(stats[tar], ref_sums(t)[2:])
    stats = term_sums({tar: [(t, valid, 1), (t2, None, 1)]})  # two sequences pooled: total sums over total counts
    r1, r2 = ref_sums(t, valid), ref_sums(t2)
    close(stats[tar], (r1[2] + r2[2], r1[3] + r2[3]))
    seq_first = t.transpose(0, 1)
    close(term_sums({tar: [(seq_first, None, 0)]})[tar], ref_sums(seq_first, seq_dim=0)[2:])
    assert term_sums({ar: [], tar: [(t, None, 1)]}).keys() == {tar}  # a read with nothing to read adds nothing


def test_term_sums_channels_first():
    "seq_dim=2, feature_dim=1 (batch x features x time): the same sums as the batch-first tensor"
    torch.manual_seed(0)
    h = torch.randn(3, 4, 6)
    ar = Read('ar', 'b', None, ('alpha', None), 'named', '', feature_dim=1)
    tar = Read('tar', 'b', None, ('beta', None), 'named', '', seq_dim=2, feature_dim=1)
    stats = term_sums({ar: [(h, None, None)], tar: [(h, None, 2)]})
    expected = ref_sums(h.movedim(1, -1))
    close(stats[ar], expected[:2])
    close(stats[tar], expected[2:])
