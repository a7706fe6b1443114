"""The stacked small-slot path (engine/slot_stack.py): slots of the same shape with few rows in a step run through
one set of bmms. Per token it must equal the MoLoRA module of the token's own adapter (fp32 1e-5, bf16 within bf16
tolerance) in every layout the plan can give it (equal rows added back through a view, unequal rows through
index_add, stack rows in a range or by index, a large slot beside small ones), and follow an adapter replaced in
its slot.
"""

from __future__ import annotations

import pytest
import torch

from mtlora.config import AdapterConfig
from mtlora.sites import site_dims
from mtlora_server.engine import slot_stack
from mtlora_server.engine.lora_ops import AdapterSlots, SlotPlan
from test_lora_ops import CFG, SHARED, _native, _oracle_delta, random_modules
from mtlora.adapters import MoLoRA

MT = AdapterConfig(method="mtlora", rank=8, alpha=16.0, num_experts=4, placement="both", routing_group_size=16)
HYDRA = AdapterConfig(method="hydralora", rank=4, alpha=8.0, num_experts=3, routing_group_size=12,
                      target_modules=["q_proj", "v_proj", "down_proj"])
LORA = AdapterConfig(method="lora", rank=4, alpha=8.0, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"])
# Three mtlora slots of one shape, two lora of another, one hydralora alone.
SLOT_CFG = {0: MT, 1: MT, 3: MT, 2: LORA, 4: LORA, 5: HYDRA}

LAYOUTS = {
    "equal_rows_view": [0] * 3 + [1] * 3 + [3] * 3 + [2] * 2 + [4] * 2 + [5] + [-1] * 2,
    "unequal_rows_index_add": [3] * 2 + [-1] + [0] * 5 + [1] + [4] * 3 + [2] + [5] * 2,
    "large_slot_beside_small": [0] * 40 + [1] * 3 + [3] * 3 + [2] * 2 + [4] * 33,
    "stack_rows_by_index": [0] * 2 + [3] * 2 + [4] * 2 + [2] * 1,
}


def _modules(cfg: AdapterConfig, seed: int) -> dict[str, MoLoRA]:
    torch.manual_seed(seed)
    return random_modules(cfg)


def _slots(dtype=torch.float32):
    oracles = {slot: _modules(cfg, seed=10 + slot) for slot, cfg in SLOT_CFG.items()}
    slots = AdapterSlots(CFG, max_adapters=6, max_rank=16, max_experts=8, max_groups=4, dtype=dtype)
    for slot, cfg in SLOT_CFG.items():
        slots.load(slot, cfg, _native(oracles[slot]))
    return slots, oracles


def _run(slots, group: str, slot_idx: torch.Tensor, x: torch.Tensor, layer: int):
    sites = SHARED[group]
    widths = [site_dims(CFG, site)[1] for site in sites]
    fused = torch.zeros(x.shape[0], sum(widths), dtype=x.dtype)
    starts = [sum(widths[:k]) for k in range(len(sites))]
    targets = [(site, fused[:, a:a + w]) for site, a, w in zip(sites, starts, widths)]
    slots.apply_shared(layer, x, targets, slot_idx, plan=SlotPlan(slot_idx))
    return [(site, fused[:, a:a + w]) for site, a, w in zip(sites, starts, widths)]


@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = slot_stack.apply

    def counting(x, stack, rows, targets, record=None):
        calls.append(rows.m)
        return real(x, stack, rows, targets, record)

    monkeypatch.setattr(slot_stack, "apply", counting)
    return calls


@torch.no_grad()
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("group", list(SHARED))
def test_stacked_slots_equal_each_tokens_module(group, layout, spy):
    slots, oracles = _slots()
    slot_idx = torch.tensor(LAYOUTS[layout])
    x = torch.randn(slot_idx.shape[0], site_dims(CFG, SHARED[group][0])[0], generator=torch.Generator().manual_seed(3))
    for layer in range(CFG.num_hidden_layers):
        for site, got in _run(slots, group, slot_idx, x, layer):
            want = _oracle_delta(oracles, slot_idx, x, layer, site, got.shape[1])
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert bool(spy) == _expect_stacked(group, LAYOUTS[layout]), "stacked path ran / did not run unexpectedly"
    assert all(m >= 2 for m in spy)


def _expect_stacked(group: str, layout: list[int]) -> bool:
    """Two or more small slots (<= SMALL_ROWS rows) of one shape adapt some site of the group."""
    from mtlora_server.engine.lora_ops import SMALL_ROWS
    small = {s for s in set(layout) - {-1} if layout.count(s) <= SMALL_ROWS}
    sites = set(SHARED[group])
    for cfg in (MT, LORA, HYDRA):
        members = [s for s, c in SLOT_CFG.items() if c is cfg and s in small]
        if len(members) >= 2 and sites & set(cfg.sites()):
            return True
    return False


@torch.no_grad()
def test_rows_layouts_take_the_intended_paths():
    groups = SlotPlan(torch.tensor(LAYOUTS["equal_rows_view"])).groups
    view = slot_stack.StepRows.build(groups, [0, 1, 3], [0, 1, 2])
    assert view.dense == slice(0, 9) and view.sel == slice(0, 3) and (view.m, view.n) == (3, 3)
    groups = SlotPlan(torch.tensor(LAYOUTS["unequal_rows_index_add"])).groups
    idx = slot_stack.StepRows.build(groups, [0, 1, 3], [0, 2, 1])
    assert idx.dense is None and idx.sel.tolist() == [0, 2, 1] and idx.n == 5
    assert idx.dst.tolist() == [3, 4, 5, 6, 7, 8, 0, 1]                          # every real row once
    assert idx.gather.shape[0] == 15 and idx.src.tolist() == [0, 1, 2, 3, 4, 5, 10, 11]


@torch.no_grad()
def test_an_adapter_replaced_in_its_slot_is_followed(spy):
    slots, oracles = _slots()
    slot_idx = torch.tensor(LAYOUTS["equal_rows_view"])
    x = torch.randn(slot_idx.shape[0], 48, generator=torch.Generator().manual_seed(4))
    _run(slots, "attn_in", slot_idx, x, 0)                                         # stacks built
    for cfg, seed in ((MT, 99), (LORA, 98)):          # same shape (row rewritten), then another shape
        oracles[1] = _modules(cfg, seed)
        slots.load(1, cfg, _native(oracles[1]))
        for site, got in _run(slots, "attn_in", slot_idx, x, 0):
            want = _oracle_delta(oracles, slot_idx, x, 0, site, got.shape[1])
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("group", ["attn_in", "mlp_in"])
def test_stacked_bf16_is_close_to_module(group, spy):
    slots, oracles = _slots(torch.bfloat16)
    slot_idx = torch.tensor(LAYOUTS["unequal_rows_index_add"])
    x = torch.randn(slot_idx.shape[0], 48, generator=torch.Generator().manual_seed(5)).bfloat16()
    for site, got in _run(slots, group, slot_idx, x, 1):
        assert got.dtype == torch.bfloat16
        want = _oracle_delta(oracles, slot_idx, x.float(), 1, site, got.shape[1])
        scale = float(want.abs().max())
        torch.testing.assert_close(got.float(), want, atol=0.02 * scale, rtol=0.02)
    assert spy


@pytest.mark.parametrize("rows,want", [
    ({0: 3, 1: 3, 2: 3}, [[0, 1, 2]]),                                # equal rows: one run
    ({0: 24, 1: 4, 2: 2, 3: 1, 4: 1, 5: 1}, [[0], [1, 2], [3, 4, 5]]),  # Zipf-like: big slots do not pad the rest
    ({0: 1, 1: 30, 2: 1}, [[1], [0, 2]]),
    ({3: 5, 0: 4, 1: 3}, [[3, 0, 1]]),                                # 3 x 5 = 15 <= 1.5 x 12
])
def test_same_shape_slots_split_into_runs_by_rows(rows, want):
    from mtlora_server.engine.lora_ops import STACK_PAD_RATIO
    starts = [sum(list(rows.values())[:k]) for k in range(len(rows))]
    groups = {s: slice(a, a + n) for (s, n), a in zip(rows.items(), starts)}
    assert STACK_PAD_RATIO == 1.5 and slot_stack.split_runs(list(rows), groups, STACK_PAD_RATIO) == want


@torch.no_grad()
@pytest.mark.parametrize("layout", ["equal_rows_view", "unequal_rows_index_add"])
def test_routing_stats_of_stacked_slots_equal_the_per_slot_paths(layout, spy, monkeypatch):
    """Steps that sample routing statistics stack too: the same per-slot expert usage and entropy as the
    per-slot path (which test_lora_ops checks against a batched variant)."""
    import math
    from mtlora_server.engine import lora_ops
    from mtlora_server.engine.lora_ops import RoutingStats

    slots, _ = _slots()
    slot_idx = torch.tensor(LAYOUTS[layout])
    x = torch.randn(slot_idx.shape[0], 48, generator=torch.Generator().manual_seed(6))
    act = torch.randn(slot_idx.shape[0], 96, generator=torch.Generator().manual_seed(7))       # down_proj input
    got = {}
    for name, minimum in (("stacked", lora_ops.STACK_MIN_SLOTS), ("per_slot", 10 ** 6)):
        monkeypatch.setattr(lora_ops, "STACK_MIN_SLOTS", minimum)
        stats = RoutingStats()
        for group in SHARED:
            sites = SHARED[group]
            outs = [(s, torch.zeros(slot_idx.shape[0], site_dims(CFG, s)[1])) for s in sites]
            for layer in range(CFG.num_hidden_layers):
                slots.apply_shared(layer, x if group != "act_in" else act,
                                   outs, slot_idx, stats=stats, plan=SlotPlan(slot_idx))
        got[name] = stats
    assert spy, "the stacked path did not run"
    for slot in SLOT_CFG:
        (u1, e1), (u2, e2) = got["stacked"].summary(slot), got["per_slot"].summary(slot)
        assert len(u1) == len(u2) > 0 and math.isclose(e1, e2, rel_tol=1e-5, abs_tol=1e-7)
        torch.testing.assert_close(torch.tensor(u1), torch.tensor(u2), atol=1e-6, rtol=1e-5)
        assert got["stacked"].count[slot] == got["per_slot"].count[slot]


@torch.no_grad()
def test_stacks_of_shapes_no_longer_loaded_are_dropped(spy):
    """A long-running server sees many adapter shapes come and go: a cleared slot frees its stack row, and a stack
    whose last slot was cleared is dropped, so the stacks (fp32 copies) track what is loaded now."""
    slots, oracles = _slots()
    slot_idx = torch.tensor(LAYOUTS["equal_rows_view"])
    x = torch.randn(slot_idx.shape[0], 48, generator=torch.Generator().manual_seed(8))
    for rank in (2, 3, 5, 6):                               # the two lora slots get a new shape each time
        cfg = AdapterConfig(method="lora", rank=rank, alpha=2.0 * rank, target_modules=["q_proj", "k_proj"])
        for slot in (2, 4):
            oracles[slot] = _modules(cfg, seed=rank * 10 + slot)
            slots.load(slot, cfg, _native(oracles[slot]))
        for site, got in _run(slots, "attn_in", slot_idx, x, 0):
            want = _oracle_delta(oracles, slot_idx, x, 0, site, got.shape[1])
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        shapes = {key[2] for key in slots._stacks}
        assert len(shapes) == 2, shapes                      # the mtlora shape and the current lora shape only
        assert all(len(st.row_of) + len(st._free) <= 3 for st in slots._stacks.values())
