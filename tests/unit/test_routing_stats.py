"""RoutingStats: the deferred, batched flush equals the plain per-token definition, record by record, for both
record forms (exact: the CPU paths; padded with masks: the Triton path) and any mix of them in one flush."""

from __future__ import annotations

import math

import pytest
import torch

from mtlora_server.engine.routing_stats import RoutingStats

S, N_MAX = 6, 8


def _mask(experts: dict[int, int]) -> torch.Tensor:
    m = torch.zeros(S, N_MAX, dtype=torch.bool)
    for slot, n in experts.items():
        m[slot, :n] = True
    return m


def _weights(n: int, g: int, N: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, g, N, generator=gen), dim=-1)


def _masked(w: torch.Tensor, rows: list[int], experts: int) -> torch.Tensor:
    """These rows' slot has only `experts` experts: the others get weight 0 (as the masked softmax gives)."""
    w = w.clone()
    w[rows, :, experts:] = 0
    return w / w.sum(-1, keepdim=True)


def _reference(records) -> tuple[dict, dict, dict]:
    """Per token, the definition: mean over the slot's groups of the weights and of the entropy (plain floats)."""
    wsum, esum, cnt = {}, {}, {}
    for slots, w, groups, _mask_, valid in records:
        n = w.shape[0]
        for i in range(n):
            if valid is not None and not bool(valid[i]):
                continue
            s = slots if isinstance(slots, int) else int(slots[i])
            g = w.shape[1] if groups is None else int(groups[s])
            per = [sum(float(w[i, k, e]) for k in range(g)) / g for e in range(w.shape[2])]
            ent = sum(-float(p) * math.log(max(float(p), 1e-30)) for k in range(g) for p in w[i, k]) / g
            acc = wsum.setdefault(s, [0.0] * N_MAX)
            for e, v in enumerate(per):
                acc[e] += v
            esum[s] = esum.get(s, 0.0) + ent
            cnt[s] = cnt.get(s, 0) + 1
    return wsum, esum, cnt


def _records():
    g_a = torch.tensor([2, 1, 4, 1, 1, 1])          # site a: slot 0 two groups, slot 2 four
    g_b = torch.tensor([1, 1, 1, 1, 1, 1])
    m_a, m_b = _mask({0: 4, 2: 3}), _mask({1: 1, 2: 8, 3: 2})
    return [
        (0, _weights(3, 2, 4, 1), g_a, m_a, None),                                 # one slot, int
        (torch.tensor([2, 2, 0, 2]), _masked(_weights(4, 4, 4, 2), rows=[0, 1, 3], experts=3), g_a, m_a, None),
        (1, torch.ones(2, 1, 1), g_b, m_b, None),                                  # one expert (lora)
        (torch.tensor([2, 3, 3, 2, 2]), _weights(5, 1, 8, 3), g_b, m_b,            # padded rows not counted
         torch.tensor([True, True, False, True, False])),
        (3, _weights(1, 1, 2, 4), g_b, m_b, None),
    ]


def _exact_records():
    """The CPU paths' form: every row's slot routes exactly w.shape[1] groups over w.shape[2] experts."""
    return [
        (4, _weights(3, 2, 4, 5), None, None, None),                               # per-slot path: one slot
        (torch.tensor([5, 4, 5]), _weights(3, 2, 4, 6), None, None, None),         # stacked: slots of one shape
        (5, torch.ones(2, 1, 1), None, None, None),                                # one expert
        (torch.tensor([0, 0]), _weights(2, 1, 6, 7), None, None, None),            # another shape
    ]


@pytest.mark.parametrize("which", ["padded", "exact", "both"])
def test_flush_equals_per_token_definition(which):
    stats = RoutingStats()
    recs = {"padded": _records(), "exact": _exact_records(), "both": _records() + _exact_records()}[which]
    for r in recs:
        stats.record(*r[:4], valid=r[4])
    wsum, esum, cnt = _reference(recs)
    for s in range(S):
        assert float(stats.count[s]) == cnt.get(s, 0)
        if s in cnt:
            got = stats.weight_sum[s].tolist()
            assert got[:len(wsum[s])] == pytest.approx(wsum[s][:len(got)], abs=1e-9)
            assert not any(got[len(wsum[s]):]) and not any(wsum[s][len(got):])
            assert float(stats.entropy_sum[s]) == pytest.approx(esum[s], abs=1e-9)


def test_summary_truncates_to_the_slots_experts_and_flushes_first():
    stats = RoutingStats()
    for r in _records():
        stats.record(*r[:4], valid=r[4])
    # experts per slot: max over the masks recorded (slot 2: 3 at site a, 8 at site b)
    assert [len(stats.summary(s)[0]) for s in range(S)] == [4, 1, 8, 2, 0, 0]
    usage, entropy = stats.summary(1)
    assert usage == [pytest.approx(1.0)] and entropy == pytest.approx(0.0)
    assert sum(stats.summary(0)[0]) == pytest.approx(1.0)


def test_exact_form_counts_experts_per_slot_as_the_max_over_sites():
    stats = RoutingStats()
    for r in _exact_records() + _records():
        stats.record(*r[:4], valid=r[4])
    # slot 0: 4 experts from site a's mask, 6 from an exact record; slot 4: 4; slot 5: max(4, 1)
    assert [len(stats.summary(s)[0]) for s in range(S)] == [6, 1, 8, 2, 4, 4]


@pytest.mark.parametrize("kwargs", [{"groups": torch.ones(2, dtype=torch.long)},
                                    {"valid": torch.ones(1, dtype=torch.bool)}])
def test_record_refuses_half_a_form(kwargs):
    with pytest.raises(ValueError, match="groups and expert_mask together"):
        RoutingStats().record(0, torch.ones(1, 1, 1), **kwargs)


def test_records_across_flushes_accumulate_and_reset_forgets_one_slot():
    once, twice = RoutingStats(), RoutingStats()
    recs = _records()
    for r in recs:
        once.record(*r[:4], valid=r[4])
    for i, r in enumerate(recs):
        twice.record(*r[:4], valid=r[4])
        if i % 2:
            twice.flush()                        # as the runner does after each sampled step
    assert torch.allclose(once.weight_sum, twice.weight_sum) and torch.equal(once.count, twice.count)
    twice.record(*recs[0][:4])                   # pending when reset runs: flushed, then forgotten
    twice.reset(0)
    assert float(twice.count[0]) == 0 and twice.summary(0) == ([], 0.0)
    assert float(twice.count[2]) == float(once.count[2])
    twice.reset()
    assert float(twice.count.sum()) == 0
