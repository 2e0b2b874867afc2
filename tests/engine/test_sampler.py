"""The sampler against plain restatements of vLLM's semantics, on small random logits."""

import pytest
import torch

from server.engine.protocol import SamplingParams
from server.engine.sampler import Sampler, SamplingBatch, make_generator

V = 64
sampler = Sampler()


def run(logits, params, *, prompt=None, output=None, generators=None, eos=()):
    n = len(params)
    batch = SamplingBatch.build(params, prompt or [[] for _ in range(n)], output or [[] for _ in range(n)],
                                generators or [None] * n, "cpu", eos_token_ids=eos)
    return sampler(logits, batch)


def draw_many(logits_row, params, n=400, seed=0):
    """Sample one row n times in one batch of n copies, seeded, -> the set of tokens drawn."""
    torch.manual_seed(seed)
    out = run(logits_row.expand(n, -1).clone(), [params] * n)
    return set(out.token_ids)


def test_greedy_is_argmax_and_input_is_untouched():
    logits = torch.randn(5, V)
    before = logits.clone()
    out = run(logits, [SamplingParams(temperature=0.0)] * 5)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 5
    assert torch.equal(logits, before)


def test_greedy_and_sampled_rows_mixed():
    torch.manual_seed(0)
    logits = torch.randn(4, V)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=3),
              SamplingParams(temperature=0.0, top_k=5, top_p=0.5), SamplingParams(temperature=0.7)]
    for _ in range(10):
        out = run(logits, params)
        assert out.token_ids[0] == logits[0].argmax().item()
        assert out.token_ids[2] == logits[2].argmax().item()
        assert out.token_ids[1] in logits[1].topk(3).indices.tolist()


def test_temperature_sampling_matches_softmax_frequencies():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0] + [-30.0] * (V - 4)])
    for temperature in (0.5, 1.0, 2.0):
        torch.manual_seed(1)
        n = 20000
        out = run(logits.expand(n, -1).clone(), [SamplingParams(temperature=temperature)] * n)
        freq = torch.bincount(torch.tensor(out.token_ids), minlength=V).float() / n
        expected = (logits[0] / temperature).softmax(-1)
        torch.testing.assert_close(freq[:4], expected[:4], atol=0.015, rtol=0)


def test_top_k_restricts_support():
    logits = torch.randn(1, V)
    allowed = set(logits[0].topk(5).indices.tolist())
    assert draw_many(logits, SamplingParams(temperature=1.5, top_k=5)) == allowed


def test_top_k_larger_than_vocab_and_off():
    logits = torch.randn(2, V)
    params = [SamplingParams(temperature=1.0, top_k=10 * V), SamplingParams(temperature=1.0, top_k=-1)]
    out = run(logits, params)
    assert all(0 <= t < V for t in out.token_ids)


def nucleus(row, p):
    """The smallest set of most probable tokens whose mass reaches p (restated directly)."""
    probs, order = row.softmax(-1).sort(descending=True)
    keep, mass = [], 0.0
    for prob, tok in zip(probs.tolist(), order.tolist()):
        keep.append(tok)
        mass += prob
        if mass >= p:
            break
    return set(keep)


def test_top_p_restricts_support():
    torch.manual_seed(3)
    logits = torch.randn(1, V) * 2
    assert draw_many(logits, SamplingParams(temperature=1.0, top_p=0.6), n=2000) == nucleus(logits[0], 0.6)


def test_top_k_then_top_p():
    torch.manual_seed(4)
    logits = torch.randn(1, V)
    top10 = logits[0].topk(10)
    restricted = torch.full((V,), float("-inf"))
    restricted[top10.indices] = top10.values
    expected = nucleus(restricted, 0.7)
    assert draw_many(logits, SamplingParams(temperature=1.0, top_k=10, top_p=0.7), n=2000) == expected


def test_top_p_rows_mixed_with_top_k_only_rows():
    torch.manual_seed(5)
    logits = torch.randn(3, V)
    params = [SamplingParams(top_k=2), SamplingParams(top_p=0.3), SamplingParams()]
    seen = [set(), set(), set()]
    for _ in range(200):
        for i, t in enumerate(run(logits, params).token_ids):
            seen[i].add(t)
    assert seen[0] == set(logits[0].topk(2).indices.tolist())
    assert seen[1] == nucleus(logits[1], 0.3)
    assert len(seen[2]) > 20


def test_min_p_restricts_support():
    logits = torch.randn(1, V)
    probs = logits[0].softmax(-1)
    allowed = set(torch.nonzero(probs >= 0.2 * probs.max()).flatten().tolist())
    assert draw_many(logits, SamplingParams(temperature=1.0, min_p=0.2), n=2000) == allowed


def test_min_p_applies_after_temperature():
    logits = torch.randn(1, V)
    probs = (logits[0] / 0.5).softmax(-1)
    allowed = set(torch.nonzero(probs >= 0.1 * probs.max()).flatten().tolist())
    assert draw_many(logits, SamplingParams(temperature=0.5, min_p=0.1), n=2000) == allowed


def penalised(logits, prompt, output, rep, freq, pres):
    """vLLM/HF penalties, one token at a time."""
    out = logits.clone()
    for t in set(prompt) | set(output):
        out[t] = out[t] / rep if out[t] > 0 else out[t] * rep
    for t in set(output):
        out[t] -= freq * output.count(t) + pres
    return out


def test_penalties_against_restatement():
    torch.manual_seed(6)
    logits = torch.randn(3, V) * 3
    prompts = [[1, 2, 3, 3], [5, 6], [7]]
    outputs = [[3, 4, 4, 4, 9], [6, 6, 10], []]
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.7),
              SamplingParams(temperature=0.0, repetition_penalty=0.8),
              SamplingParams(temperature=0.0, frequency_penalty=-1.0)]
    batch = SamplingBatch.build(params, prompts, outputs, [None] * 3, "cpu")
    from server.engine.sampler import apply_penalties
    got = apply_penalties(logits, batch)
    for i, p in enumerate(params):
        expected = penalised(logits[i], prompts[i], outputs[i], p.repetition_penalty,
                             p.frequency_penalty, p.presence_penalty)
        torch.testing.assert_close(got[i], expected)


def test_penalties_change_the_greedy_choice():
    logits = torch.zeros(1, V)
    logits[0, 7] = 2.0
    logits[0, 8] = 1.5
    out = run(logits, [SamplingParams(temperature=0.0, frequency_penalty=0.3)], output=[[7, 7]])
    assert out.token_ids == [8]
    out = run(logits, [SamplingParams(temperature=0.0, repetition_penalty=1.5)], prompt=[[7]])
    assert out.token_ids == [8]


def test_min_tokens_masks_eos_and_stop_tokens():
    logits = torch.zeros(3, V)
    logits[:, 2] = 10.0  # EOS
    logits[:, 11] = 9.0  # a stop token
    params = [SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[11]),
              SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[11]),
              SamplingParams(temperature=0.0, min_tokens=2, ignore_eos=True)]
    out = run(logits, params, output=[[5], [5, 6], []], eos=[2])
    assert out.token_ids[0] not in (2, 11)  # 1 < min_tokens: both masked
    assert out.token_ids[1] == 2  # min_tokens reached
    assert out.token_ids[2] == 2  # ignore_eos: EOS is no stop, so it is not masked


def test_min_tokens_masks_sampled_rows():
    logits = torch.zeros(1, V)
    logits[0, 2] = 30.0
    torch.manual_seed(0)
    out = run(logits.expand(50, -1).clone(), [SamplingParams(min_tokens=1)] * 50, eos=[2])
    assert 2 not in out.token_ids


def test_seeded_rows_are_independent_of_the_batch():
    torch.manual_seed(7)
    steps = 6
    logits = torch.randn(steps, 8, V)
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)

    def tokens_alone():
        g = make_generator(1234, "cpu")
        return [run(logits[s, 0:1], [seeded], generators=[g]).token_ids[0] for s in range(steps)]

    def tokens_in_batch(row):
        g = make_generator(1234, "cpu")
        others = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.0),
                  SamplingParams(temperature=0.5, top_k=3, seed=9), SamplingParams(temperature=1.3, min_p=0.05)]
        params = others[:row] + [seeded] + others[row:]
        gens = [None, None, make_generator(9, "cpu"), None]
        gens = gens[:row] + [g] + gens[row:]
        got = []
        for s in range(steps):
            batch_logits = torch.randn(len(params), V)
            batch_logits[row] = logits[s, 0]
            got.append(run(batch_logits, params, generators=gens).token_ids[row])
        return got

    alone = tokens_alone()
    assert alone == tokens_alone()
    assert tokens_in_batch(0) == alone
    assert tokens_in_batch(3) == alone
    assert len(set(alone)) > 1  # it did sample


def test_logprobs_from_raw_logits():
    torch.manual_seed(8)
    logits = torch.randn(4, V)
    params = [SamplingParams(temperature=0.0, logprobs=5, repetition_penalty=2.0),
              SamplingParams(temperature=0.8, top_k=4),
              SamplingParams(temperature=1.0, logprobs=0),
              SamplingParams(temperature=0.3, logprobs=20)]
    out = run(logits, params, prompt=[[1, 2], [], [], []])
    ref = logits.log_softmax(-1)
    assert out.logprobs[1] is None
    for i in (0, 2, 3):
        lp = out.logprobs[i]
        assert lp.token_id == out.token_ids[i]
        assert lp.logprob == pytest.approx(ref[i, lp.token_id].item(), abs=1e-5)
        k = params[i].logprobs
        assert len(lp.top) == k
        vals, ids = ref[i].topk(k) if k else (torch.empty(0), torch.empty(0, dtype=torch.long))
        assert [t for t, _ in lp.top] == ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(vals.tolist(), abs=1e-5)
        assert all(a[1] >= b[1] for a, b in zip(lp.top, lp.top[1:]))


def test_build_marks_only_needed_stages():
    b = SamplingBatch.build([SamplingParams(temperature=0.0)] * 3, [[1]] * 3, [[]] * 3, [None] * 3, "cpu")
    assert b.all_greedy and b.top_k is None and b.top_p is None and b.min_p is None
    assert b.repetition_penalty is None and b.frequency_penalty is None and b.banned_pairs is None
    assert b.logprob_rows is None
    b = SamplingBatch.build([SamplingParams(temperature=0.7)] * 2, [[]] * 2, [[]] * 2, [None] * 2, "cpu")
    assert b.temperature == 0.7 and b.greedy is None and not b.all_greedy


def test_top_p_without_full_sort_matches_the_sort():
    """The candidates-first nucleus equals vLLM's sort formulation, and falls back when it spills."""
    from server.engine.sampler import _top_k_top_p_by_sort, _top_k_top_p_by_topk, apply_top_k_top_p

    torch.manual_seed(9)
    V_big = 4096
    logits = torch.randn(6, V_big) * torch.tensor([[8.0], [4.0], [3.0], [6.0], [5.0], [8.0]])
    top_p = torch.tensor([0.9, 0.5, 1.0, 0.95, 1.0, 0.3])
    top_k = torch.tensor([0, 40, 0, 7, 100, 0])
    for k in (None, top_k):
        fast = _top_k_top_p_by_topk(logits, k, top_p, candidates=256)
        assert fast is not None
        assert torch.equal(torch.isinf(fast), torch.isinf(_top_k_top_p_by_sort(logits, k, top_p)))
        assert torch.equal(fast[~torch.isinf(fast)], logits[~torch.isinf(fast)])
    flat = torch.randn(2, V_big) * 0.1  # the nucleus of 0.9 holds thousands of tokens
    p = torch.tensor([0.9, 0.5])
    assert _top_k_top_p_by_topk(flat, None, p, candidates=256) is None
    masked = apply_top_k_top_p(flat, None, 0, p)
    assert torch.equal(masked, _top_k_top_p_by_sort(flat, None, p))
    assert 256 < int((~torch.isinf(masked[0])).sum()) < V_big


@pytest.mark.parametrize("u", [0.0, 1.0 - 2.0**-53])
def test_draw_never_picks_zero_probability_tokens(monkeypatch, u):
    from server.engine import sampler as sampler_module

    probs = torch.zeros(2, V)
    probs[0, 5] = probs[0, 9] = 0.5
    probs[1, 0] = 1.0
    batch = SamplingBatch.build([SamplingParams()] * 2, [[]] * 2, [[]] * 2, [None] * 2, "cpu")
    real_rand = torch.rand
    monkeypatch.setattr(torch, "rand", lambda *a, **k: real_rand(*a, **k).fill_(u))
    tokens = sampler_module.draw(probs, batch).tolist()
    assert tokens == ([5, 0] if u == 0.0 else [9, 0])


def test_draw_keeps_the_tail_of_many_tiny_probabilities():
    """49151 tokens of 2e-8 each after one of ~0.999: an fp32 CDF would round them all away."""
    from server.engine.sampler import draw

    vocab = 49152
    probs = torch.full((1, vocab), 2e-8)
    probs[0, 0] = 1.0 - 2e-8 * (vocab - 1)
    n = 20000
    batch = SamplingBatch.build([SamplingParams()] * n, [[]] * n, [[]] * n, [None] * n, "cpu")
    torch.manual_seed(0)
    tokens = draw(probs.expand(n, -1), batch)
    tail = int((tokens != 0).sum())  # expected about n * 1e-3 = 20
    assert 5 <= tail <= 45


def test_fast_argmax_is_argmax_with_first_index_ties():
    from server.engine.sampler import fast_argmax

    torch.manual_seed(10)
    x = torch.randn(5, 4096)
    x[1, 3000] = x[1, 100] = 50.0  # tie: the first index wins
    x[2, 257] = x[2, 511] = 50.0  # tie inside one block
    x[3] = 0.0
    assert torch.equal(fast_argmax(x), x.argmax(-1))
    y = torch.randn(3, 1000)  # V not a multiple of the block: plain argmax
    assert torch.equal(fast_argmax(y), y.argmax(-1))


def support(logits_row, params, n=3000, seed=0):
    torch.manual_seed(seed)
    return set(run(logits_row.expand(n, -1).clone(), [params] * n).token_ids)


def kept_set(row, temperature, top_k, top_p, min_p):
    """top_k (ties kept), then the nucleus over the survivors, then min_p, restated on a sorted row."""
    row = row / temperature
    if top_k > 0:
        kth = row.topk(top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    keep = nucleus(row, top_p) if top_p < 1 else set(torch.nonzero(row > float("-inf")).flatten().tolist())
    probs = row.softmax(-1)
    top = probs.max()
    return {t for t in keep if probs[t] >= min_p * top}


@pytest.mark.parametrize("kw", [dict(top_p=0.9), dict(top_k=30, top_p=0.8), dict(min_p=0.02),
                                dict(top_p=0.95, min_p=0.01), dict(top_k=100)])
def test_candidate_path_keeps_the_same_set_as_the_restatement(kw):
    """Peaked rows over a vocabulary larger than the candidates: truncation among the row's top tokens."""
    torch.manual_seed(11)
    vocab = 2048
    logits = torch.randn(1, vocab)
    logits[0, torch.randperm(vocab)[:12]] += 6.0 + torch.rand(12) * 3
    params = SamplingParams(temperature=0.9, **kw)
    expected = kept_set(logits[0], 0.9, params.top_k, params.top_p, params.min_p)
    probs = (logits[0] / 0.9).softmax(-1)
    mass = float(probs[list(expected)].sum())
    likely = {t for t in expected if probs[t] / mass > 2e-3}  # drawn in 6000 tries but with odds < 1e-5
    got = support(logits, params, n=6000)
    assert likely <= got <= expected


def test_flat_rows_spill_to_the_full_path():
    """A nucleus of hundreds of tokens does not fit the candidates: the row takes the full path."""
    from server.engine import sampler as sampler_module

    torch.manual_seed(12)
    vocab = 1024
    flat = torch.randn(1, vocab) * 0.3
    p = SamplingParams(temperature=1.0, top_p=0.5)
    batch = SamplingBatch.build([p], [[]], [[]], [None], "cpu")
    _, spill = sampler_module._sample_candidates(flat, None, None, 0, batch.top_p, None, batch.candidates,
                                                  torch.zeros(1, 1, dtype=torch.float64))
    assert spill is not None and bool(spill[0])
    expected = nucleus(flat[0], 0.5)
    assert len(expected) > sampler_module._CANDIDATES
    got = support(flat, p, n=4000)
    assert got <= expected and len(got) > 0.9 * len(expected)
    expected = kept_set(flat[0], 1.0, 0, 1.0, 0.5)
    got = support(flat, SamplingParams(temperature=1.0, min_p=0.5), n=4000)
    assert got <= expected and len(got) > 0.9 * len(expected)


def test_seeded_row_is_independent_of_the_batch_candidate_count():
    """Another row's large top_k widens the batch's candidates; the seeded row's token must not move."""
    torch.manual_seed(13)
    vocab = 4096
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=5)
    got = {}
    for others in ([], [SamplingParams(temperature=1.0, top_k=500)], [SamplingParams(temperature=0.0)]):
        g = make_generator(5, "cpu")
        toks = []
        for s in range(8):
            torch.manual_seed(100 + s)
            row = torch.randn(1, vocab) * (0.3 if s % 2 else 3.0)  # odd steps spill
            logits = torch.cat([torch.randn(len(others), vocab), row])
            toks.append(run(logits, others + [seeded], generators=[None] * len(others) + [g]).token_ids[-1])
        got[len(others), bool(others and others[0].top_k)] = toks
    assert len({tuple(v) for v in got.values()}) == 1


def test_penalties_against_restatement_with_long_histories():
    torch.manual_seed(14)
    vocab, B = 500, 6
    logits = torch.randn(B, vocab) * 3
    prompts = [torch.randint(0, vocab, (int(n),)).tolist() for n in torch.randint(0, 300, (B,))]
    outputs = [torch.randint(0, 60, (int(n),)).tolist() for n in torch.randint(0, 300, (B,))]
    params = [SamplingParams(temperature=0.0, repetition_penalty=float(r), frequency_penalty=float(f),
                             presence_penalty=float(pr))
              for r, f, pr in zip([1.2, 1.0, 0.7, 1.5, 1.0, 1.1], [0.5, -0.3, 0.0, 1.0, 0.0, 2.0],
                                  [0.0, 0.4, 1.0, -1.0, 0.0, 2.0])]
    batch = SamplingBatch.build(params, prompts, outputs, [None] * B, "cpu")
    from server.engine.sampler import apply_penalties
    got = apply_penalties(logits, batch)
    for i, p in enumerate(params):
        expected = penalised(logits[i], prompts[i], outputs[i], p.repetition_penalty,
                             p.frequency_penalty, p.presence_penalty)
        torch.testing.assert_close(got[i], expected, rtol=1e-5, atol=1e-4)


def test_logit_bias_before_penalties_only_its_rows_and_raw_logprobs():
    torch.manual_seed(9)
    logits = torch.randn(3, V)
    logits[2] = 0.0
    logits[2, 12] = 60.0
    top = logits.argmax(-1).tolist()
    params = [SamplingParams(temperature=0.0, logit_bias={top[0]: -100.0, 3: 0.25}, logprobs=2),  # bans its argmax
              SamplingParams(temperature=0.0),  # no bias: untouched by its neighbours'
              SamplingParams(temperature=0.0, logit_bias={11: 100.0}, repetition_penalty=2.0)]
    out = run(logits, params, prompt=[[], [], [11]])
    biased0 = logits[0].clone()
    biased0[top[0]] -= 100.0
    biased0[3] += 0.25
    assert out.token_ids[0] == biased0.argmax().item() != top[0]
    assert out.token_ids[1] == top[1]
    # the bias comes first and the penalty sees it (vLLM's order): token 11's 0 + 100 halved is 50 < 60;
    # penalised first it would be 0 / 2 + 100 and win
    assert out.token_ids[2] == 12
    params[2] = SamplingParams(temperature=0.0, logit_bias={11: 100.0})
    assert run(logits, params).token_ids[2] == 11
    # a bias listing much of the vocabulary is applied as a dense row, to the same effect
    wide = {t: -100.0 for t in range(V) if t != 40} | {3: 0.25}
    dense = run(logits[:2], [SamplingParams(temperature=0.0, logit_bias=wide, logprobs=0)] * 2)
    assert dense.token_ids == [40, 40] and dense.logprobs[0].logprob == pytest.approx(
        logits[0].log_softmax(-1)[40].item(), abs=1e-5)
    assert run(logits[:1], [SamplingParams(temperature=0.0, logit_bias=wide | {40: -100.0, 3: 0.0})]).token_ids == [3]
    # logprobs describe the model's raw distribution (vLLM's raw_logprobs), not the biased one
    lp = out.logprobs[0]
    assert lp.logprob == pytest.approx(logits[0].log_softmax(-1)[lp.token_id].item(), abs=1e-5)
    assert lp.top[0][0] == top[0]
    b = SamplingBatch.build([SamplingParams(temperature=0.0)] * 2, [[]] * 2, [[]] * 2, [None] * 2, "cpu")
    assert b.logit_bias == []


def test_logit_bias_moves_sampled_rows():
    logits = torch.zeros(1, V)
    drawn = draw_many(logits[0], SamplingParams(temperature=1.0, logit_bias={5: 100.0}), n=200)
    assert drawn == {5}
    drawn = draw_many(logits[0], SamplingParams(temperature=1.0, logit_bias={t: -100.0 for t in range(V - 2)}), n=400)
    assert drawn == {V - 2, V - 1}


@pytest.mark.parametrize("bias, message", [
    ({-1: 1.0}, "non-negative"), ({"5": 1.0}, "non-negative"), ({True: 1.0}, "non-negative"),
    ({5: float("nan")}, "finite"), ({5: float("inf")}, "finite"), ({5: "x"}, "finite"),
])
def test_logit_bias_validation(bias, message):
    from server.engine.protocol import InvalidRequest
    with pytest.raises(InvalidRequest, match=message):
        SamplingParams(logit_bias=bias).validate()


def test_large_nuclei_by_histogram_keep_the_sorts_set():
    """Top-p rows whose nucleus passes the candidates are placed by a histogram of their mass, not a
    sort of the vocabulary: the same kept set as vLLM's sort (up to the rounding of cumulative sums),
    the nucleus rule held in float64, and rows keeping everything or with -inf tokens handled."""
    from server.engine import sampler as sampler_module
    from server.engine.sampler import _top_k_top_p_by_sort, _top_p_by_histogram, apply_top_k_top_p

    V_big, rows, same = 8192, 0, 0
    for seed, scale in enumerate((0.05, 0.3, 1.0, 1.5, 2.5, 4.0)):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(8, V_big, generator=g) * scale
        x[1, : V_big // 2] = float("-inf")  # a grammar's or min_tokens' mask
        x[2] = x[2].round()  # many exact ties
        p = torch.rand(8, generator=g) * 0.98 + 0.01
        p[3] = 1.0  # keeps everything
        got = _top_p_by_histogram(x, p)
        ref = _top_k_top_p_by_sort(x, None, p)
        kept, kept_ref = got > float("-inf"), ref > float("-inf")
        assert torch.equal(got[kept], x[kept])
        assert bool(kept[3][x[3] > float("-inf")].all())
        probs = x.double().softmax(-1)
        for r in range(8):
            if r != 2:  # (the sort keeps only some of the tokens tied at the edge; here, as in the
                rows += 1  # candidates' path, they all survive)
                same += bool(torch.equal(kept[r], kept_ref[r]))
            if p[r] >= 1:
                continue
            k = kept[r]
            # a top set: every kept token at least as likely as every dropped one
            assert not bool((~k).any()) or x[r][k].min() >= x[r][~k].max()
            mass, smallest = probs[r][k].sum().item(), probs[r][k].min().item()
            # the mass above the least likely kept token (and its ties) is below p; all of it reaches p
            least = x[r][k].min()
            above = probs[r][x[r] > least].sum().item()
            assert above < p[r].item() + 1e-5 and mass >= p[r].item() - 1e-5, (seed, r, above, mass, smallest)
    assert same == rows, (same, rows)
    # apply_top_k_top_p takes it for large nuclei without top-k, never sorting
    flat = torch.randn(4, V_big, generator=torch.Generator().manual_seed(7)) * 0.2
    calls = []
    orig = sampler_module._top_k_top_p_by_sort
    sampler_module._top_k_top_p_by_sort = lambda *a: calls.append(1) or orig(*a)
    try:
        out = apply_top_k_top_p(flat, None, 0, torch.tensor([0.9, 0.95, 1.0, 0.5]))
        assert not calls and torch.equal(out, orig(flat, None, torch.tensor([0.9, 0.95, 1.0, 0.5])))
        apply_top_k_top_p(flat, torch.tensor([0, 3000, 0, 0]), 3000, torch.tensor([0.9, 0.95, 1.0, 0.5]))
        assert calls  # with top-k, the sort
    finally:
        sampler_module._top_k_top_p_by_sort = orig
    # a row whose maximum is not finite goes to the sort
    bad = flat.clone()
    bad[0, 0] = float("inf")
    assert _top_p_by_histogram(bad, torch.full((4,), 0.9)) is None


def test_prompts_as_tensors_penalise_as_lists():
    """The engine hands each sequence's prompt as its cached tensor (``Sequence.prompt_tensor``): the
    repetition penalty must see the same tokens as from lists, empty prompts and outputs included."""
    torch.manual_seed(10)
    logits = torch.randn(3, V) * 3
    prompts = [[1, 2, 3, 3], [], [7, 8]]
    outputs = [[3, 4], [6], []]
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.7)] * 3
    as_lists = SamplingBatch.build(params, prompts, outputs, [None] * 3, "cpu")
    as_tensors = SamplingBatch.build(params, [torch.tensor(p, dtype=torch.long) for p in prompts], outputs,
                                     [None] * 3, "cpu")
    assert [t.tolist() for t in as_lists.seen_pairs] == [t.tolist() for t in as_tensors.seen_pairs] == [
        [0, 0, 0, 0, 0, 0, 1, 2, 2], [1, 2, 3, 3, 3, 4, 6, 7, 8]]
    assert sampler(logits, as_lists).token_ids == sampler(logits, as_tensors).token_ids
