"""`TARHooks`: the plan, rules and errors of `TARCallback` in a plain PyTorch loop. Its penalty against float64
references, its gradient, a forward in eval or without gradient, penalty() without a forward or after two, masks from
the forward's arguments or given, arguments changed between forwards, bidirectional RNNs and transformer blocks, its
messages, and that it loads no fastai."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from fastai_tar import Place, TARHooks

from conftest import ref_penalty, ref_sums


class LM(nn.Module):
    "Embedding -> nn.LSTM -> nn.Dropout -> Linear, keeping what the reference needs"
    def __init__(self, vocab=20, n=8, bidirectional=False, batch_first=True):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, n)
        self.rnn = nn.LSTM(n, n, batch_first=batch_first, bidirectional=bidirectional)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(n * (2 if bidirectional else 1), vocab)
        self.seen = []

    def forward(self, x):
        raw = self.rnn(self.emb(x))[0]
        dropped = self.drop(raw)
        self.seen.append((raw, dropped))
        return self.head(dropped)


def batch(bs=4, sl=10, vocab=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (bs, sl), generator=g)


def no_hooks(m): return not any(mod._forward_hooks or mod._forward_pre_hooks for mod in m.modules())


def test_a_training_loop_gets_merity_penalty_and_its_gradient():
    model, x = LM(), batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with TARHooks(model, alpha=2., beta=1.) as tar:
        assert tar.is_open and 'settled at the first training batch' in tar.places
        for step in range(3):
            logits = model(x)
            pen = tar.penalty()
            raw, dropped = model.seen[-1]
            assert pen.item() == pytest.approx(ref_penalty(2., 0., dropped) + ref_penalty(0., 1., raw), rel=1e-6)
            assert tar.terms['ar'].item() == pytest.approx(ref_penalty(2., 0., dropped), rel=1e-6)
            assert not tar.terms['tar'].requires_grad  # kept for logging only
            (logits.logsumexp(-1).mean() + pen).backward()
            opt.step(); opt.zero_grad()
        assert tar.places == ("AR drop (Dropout): alpha=2.0; found: the dropout that takes the output of rnn\n"
                              "TAR rnn (LSTM): beta=1.0; time axis 1 (batch_first=True); found: the last RNN module")
    assert not tar.is_open and no_hooks(model)


def test_the_gradient_is_that_of_the_reference():
    model, x = LM(), batch()
    twin = LM()
    with TARHooks(model, alpha=2., beta=3.) as tar:
        torch.manual_seed(5); model(x)
        tar.penalty().backward()
    torch.manual_seed(5); twin(x)
    raw, dropped = twin.seen[-1]
    (2 * dropped.double().pow(2).mean() + 3 * (raw[:, 1:] - raw[:, :-1]).double().pow(2).mean()).backward()
    torch.testing.assert_close(model.rnn.weight_hh_l0.grad, twin.rnn.weight_hh_l0.grad.float(), rtol=1e-5, atol=1e-7)


def test_eval_and_no_grad_forwards_give_zero_and_penalty_asks_for_one_forward_each():
    model, x = LM(), batch()
    with TARHooks(model) as tar:
        with pytest.raises(RuntimeError, match=r"TARHooks.penalty\(\): no forward of the model since"): tar.penalty()
        model.eval()
        model(x)
        assert tar.penalty().item() == 0. and tar.reads == []  # nothing settled from an eval forward
        model.train()
        with torch.no_grad(): model(x)
        assert tar.penalty().item() == 0.
        model(x); model(x)
        with pytest.raises(RuntimeError, match=r"ran 2 training forwards since the last penalty\(\).*after each"):
            tar.penalty()
        model(x)
        model.eval(); model(x); model.train()  # an eval forward after a training one: which one is meant?
        with pytest.raises(RuntimeError, match=r"ran a training forward, then one in eval\(\) or without gradient,"):
            tar.penalty()
        model(x)
        assert tar.penalty().item() > 0 and len(tar.reads) == 2
        with pytest.raises(RuntimeError, match='no forward'): tar.penalty()
        model.eval(); model(x); model.train()  # once settled too: an eval forward, and one without gradient, give 0
        assert tar.penalty().item() == 0. and all(t.item() == 0. for t in tar.terms.values())
        with torch.no_grad(): model(x)
        assert tar.penalty().item() == 0.


def test_masks_from_the_forwards_arguments_or_given_and_their_errors():
    model, x = LM(), batch()
    x[0, 6:] = 0  # padding at the end of the first sequence
    real = x != 0
    with TARHooks(model, alpha=2., beta=1., mask=lambda tokens: tokens != 0) as tar:
        model(x)
        pen = tar.penalty()
        raw, dropped = model.seen[-1]
        assert pen.item() == pytest.approx(ref_penalty(2., 0., (dropped, real)) + ref_penalty(0., 1., (raw, real)),
                                           rel=1e-6)
        model(x)
        only_first = torch.zeros_like(real)
        only_first[1:] = True
        raw, dropped = model.seen[-1]
        assert tar.penalty(mask=only_first).item() == pytest.approx(  # given: it wins
            ref_penalty(2., 0., (dropped, only_first)) + ref_penalty(0., 1., (raw, only_first)), rel=1e-6)
        model(x)
        with pytest.raises(ValueError, match=r"mask= of shape \(4, 9\) does not fit 'drop', a tensor \(4, 10, 8\)"):
            tar.penalty(mask=real[:, 1:])
        model(x)
        with pytest.raises(TypeError, match=r"penalty\(mask=\) must give a bool batch x time tensor.*int64"):
            tar.penalty(mask=x)
    with TARHooks(model, mask=lambda x: x) as tar:
        model(x)
        with pytest.raises(TypeError, match=r"TARHooks\(mask=\.\.\.\) must give a bool batch x time tensor.*int64"):
            tar.penalty()
        model(x)  # the failed batch's forward is gone: the next penalty() reads this one
        with pytest.raises(TypeError, match=r"TARHooks\(mask=\.\.\.\) must give"): tar.penalty()
    with TARHooks(model, mask=lambda x, lengths: x != 0) as tar:  # a function that does not fit the forward
        model(x)
        with pytest.raises(TypeError, match=r"TARHooks\(mask=\.\.\.\) is called as mask\(\*args, \*\*kwargs\), "
                                            r"with the model's forward arguments, which the function given cannot "
                                            r"take: .*missing 1 required positional argument: 'lengths'"):
            tar.penalty()
    def raises_inside(x): raise TypeError('the function\'s own error')
    with TARHooks(model, mask=raises_inside) as tar:  # an error inside the function is left as it is
        model(x)
        with pytest.raises(TypeError, match=r"^the function's own error$"): tar.penalty()
    with pytest.raises(TypeError, match=r"mask= takes a function"): TARHooks(model, mask=real)


def test_sequence_first_and_bidirectional_rnns_read_their_whole_output_along_time():
    x = batch()
    model = LM(batch_first=False)
    with TARHooks(model, alpha=0.) as tar:
        model(x.t())
        assert tar.penalty().item() == pytest.approx(ref_penalty(0., 1., model.seen[-1][0], seq_dim=0), rel=1e-6)
    model = LM(bidirectional=True)  # TAR of both directions' features, concatenated: (bs, sl, 2 * hidden)
    with TARHooks(model) as tar:
        model(x)
        raw, dropped = model.seen[-1]
        assert raw.shape[-1] == 16
        assert tar.penalty().item() == pytest.approx(ref_penalty(2., 0., dropped) + ref_penalty(0., 1., raw), rel=1e-6)


def test_a_transformer_block_named_with_its_layout():
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True), 2)
    x = torch.randn(3, 7, 8)
    with TARHooks(enc, modules='layers.1', alpha=0.) as tar:
        enc(x)
        with pytest.raises(ValueError, match=r"TARHooks cannot tell the time axis of layers.1 "
                                             r"\(TransformerEncoderLayer\)'s output for TAR.*seq_dim="):
            tar.penalty()
    seen = []
    enc.layers[1].register_forward_hook(lambda m, i, o: seen.append(o))
    with TARHooks(enc, modules='layers.1', alpha=0., seq_dim=1) as tar:
        enc(x)
        assert tar.penalty().item() == pytest.approx(ref_penalty(0., 1., seen[-1]), rel=1e-6)
        assert repr(tar) == ("TARHooks(alpha=0.0, beta=1.0, modules='layers.1', seq_dim=1): AR layers.1 "
                             "(TransformerEncoderLayer): named by you; no dropout takes its output, so AR reads it "
                             "raw; TAR layers.1 (TransformerEncoderLayer): time axis 1 (seq_dim=1, yours); named by "
                             "you")


def test_arguments_changed_between_forwards():
    model, x = LM(), batch()
    with TARHooks(model, alpha=0., beta=1.) as tar:
        model(x); tar.penalty()
        plan = tar.plan
        tar.beta = 4.  # a coefficient: the plan holds
        model(x)
        raw = model.seen[-1][0]
        assert tar.penalty().item() == pytest.approx(ref_penalty(0., 4., raw), rel=1e-6) and tar.plan is plan
        tar.ar_modules = Place('drop')  # what is read: settled again at the next forward, and said
        model(x)
        with pytest.warns(UserWarning, match='settled again'): tar.penalty()
        assert tar.plan is not plan and tar.reads[0].source == 'named'


def test_sums_of_the_reads_equal_the_references_per_place():
    model, x = LM(), batch()
    with TARHooks(model, modules=['rnn'], ar_modules=['drop'], alpha=[2.], beta=[1.]) as tar:
        model(x)
        tar.penalty()
        raw, dropped = model.seen[-1]
        assert [r.name for r in tar.reads] == ['drop', 'rnn']
        assert tar.terms['tar'].item() == pytest.approx(float(ref_sums(raw)[2] / ref_sums(raw)[3]), rel=1e-6)


def test_importing_and_running_it_loads_no_fastai():
    code = textwrap.dedent("""
        import sys, torch
        from fastai_tar import TARHooks, tar_penalty
        m = torch.nn.Sequential(torch.nn.LSTM(3, 4, batch_first=True))
        with TARHooks(m) as tar:
            m(torch.randn(2, 5, 3))
            assert tar.penalty().item() > 0
        print(sorted(x for x in sys.modules if x.split('.')[0] == 'fastai'))
    """)
    root = Path(__file__).parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get('PYTHONPATH', '')]))
    res = subprocess.run([sys.executable, '-W', 'ignore', '-c', code], capture_output=True, text=True, timeout=120,
                         env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == '[]'


class SteppedGRU(nn.Module):
    "A decoder stepping an nn.GRU one token per call, its state chained, with a dropout on each step's output"
    def __init__(self, n=4):
        super().__init__()
        torch.manual_seed(0)
        self.rnn, self.drop = nn.GRU(n, n, batch_first=True), nn.Dropout(0.5)
    def forward(self, x):
        state, raws, drops = None, [], []
        for t in range(x.shape[1]):
            out, state = self.rnn(x[:, t:t + 1], state)
            raws.append(out); drops.append(self.drop(out))
        self.seen = torch.cat(raws, 1), torch.cat(drops, 1)
        return self.seen[1]


def test_a_dropout_on_each_step_of_a_stepped_rnn_joins_as_its_steps_do_and_takes_the_mask():
    model, x = SteppedGRU(), torch.randn(3, 5, 4)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 2:] = False
    with TARHooks(model) as tar:
        model(x)
        raw, dropped = model.seen
        assert tar.penalty(mask=mask).item() == pytest.approx(
            ref_penalty(2., 0., (dropped, mask)) + ref_penalty(0., 1., (raw, mask)), rel=1e-6)
        assert [r.name for r in tar.reads] == ['drop', 'rnn']


class Packed(nn.Module):
    "An nn.GRU on a PackedSequence, padded to the batch's width; with `drop_data`, a dropout on the packed data"
    def __init__(self, drop_data=False, n=4):
        super().__init__()
        torch.manual_seed(0)
        self.rnn, self.drop = nn.GRU(n, n, batch_first=True), nn.Dropout(0.5) if drop_data else None
    def forward(self, x, lengths):
        out, _ = self.rnn(nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
        self.seen = nn.utils.rnn.pad_packed_sequence(out, batch_first=True)[0]
        if self.drop is None: return out
        self.dropped = self.drop(out.data)
        return nn.utils.rnn.PackedSequence(self.dropped, out.batch_sizes, out.sorted_indices, out.unsorted_indices)


def test_a_mask_as_wide_as_the_padded_batch_fits_a_packed_sequence_unpacked_to_its_longest():
    model, x, lengths = Packed(), torch.randn(3, 6, 4), torch.tensor([3, 5, 2])
    mask = torch.arange(6)[None] < lengths[:, None]
    mask[0, 1] = False  # a step the user leaves out besides the padding
    with TARHooks(model, alpha=0.) as tar:
        model(x, lengths)
        assert model.seen.shape[1] == 5  # the longest sequence, not the batch's width
        assert tar.penalty(mask=mask).item() == pytest.approx(ref_penalty(0., 1., (model.seen, mask[:, :5])),
                                                              rel=1e-6)


def test_a_mask_on_a_dropout_of_packed_data_says_why_it_cannot_fit():
    model, x, lengths = Packed(drop_data=True), torch.randn(3, 6, 4), torch.tensor([3, 6, 2])
    with TARHooks(model, beta=0.) as tar:
        model(x, lengths)
        # without a mask, the packed data: every real step, and nothing else
        assert model.dropped.shape == (11, 4) and tar.penalty().item() == pytest.approx(
            ref_penalty(2., 0., model.dropped[:, None]), rel=1e-6)
        model(x, lengths)
        with pytest.raises(ValueError, match=r"does not fit 'drop', a tensor \(11, 4\).*a PackedSequence's data has no "
                                             r"batch and time axes"):
            tar.penalty(mask=torch.arange(6)[None] < lengths[:, None])


def test_a_found_dropout_that_takes_the_output_twice_after_the_plan_was_settled_is_an_error():
    class Maybe(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.drop, self.twice = nn.GRU(4, 4, batch_first=True), nn.Dropout(0.5), False
        def forward(self, x):
            h = self.rnn(x)[0]
            return (self.drop(h) + self.drop(h)) / 2 if self.twice else self.drop(h)
    model, x = Maybe(), torch.randn(2, 5, 4)
    with TARHooks(model) as tar:
        model(x); tar.penalty()
        model.twice = True
        model(x)
        with pytest.raises(RuntimeError, match=r"'drop' took the output of 'rnn' twice in this forward, where it "
                                               r"took it once when the plan was settled"):
            tar.penalty()


def test_a_picked_call_counts_among_the_calls_with_gradient_for_tar_and_for_the_dropout_ar_finds():
    "A no-grad burn-in call, then two calls: Place(call=1) is the second call with gradient, for both terms"
    class BurnIn(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.rnn, self.drop = nn.GRU(4, 4, batch_first=True), nn.Dropout(0.5)
        def forward(self, a, b):
            with torch.no_grad(): self.rnn(a)
            ha, hb = self.rnn(a)[0], self.rnn(b)[0]
            self.seen = ha, hb, self.drop(ha), self.drop(hb)
            return self.seen[2] + self.seen[3]
    model, a, b = BurnIn(), torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    with TARHooks(model, modules=Place('rnn', call=1)) as tar:
        model(a, b)
        ha, hb, da, db = model.seen
        assert tar.penalty().item() == pytest.approx(ref_penalty(2., 0., db) + ref_penalty(0., 1., hb), rel=1e-6)
