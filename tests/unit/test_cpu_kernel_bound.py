"""The decoder's bound kernel calls (engine/cpu_kernel_path.py `bind_step`, csrc/adapter_rows.cpp `RowsCall`): a
bound step must add exactly what `apply_shared` adds through the same kernel (bit for bit: same tables, same
arithmetic), follow a slot whose adapter was replaced, step aside (None) wherever `apply_shared` must run, and a
`RowsCall` must write only its columns and refuse bad ones before writing; a step that samples routing statistics
records what `apply_shared` records. Whole engine runs give the same
tokens and logprobs bound and unbound."""

from __future__ import annotations

import pytest
import torch

from cpu_kernels import built
from mtlora.sites import fused_columns, site_dims
from mtlora_server.engine import cpu_adapters, lora_ops
from mtlora_server.engine.cpu_kernel_path import AdaptCall
from mtlora_server.engine.lora_ops import SlotPlan
from mtlora_server.engine.routing_stats import RoutingStats
from test_cpu_adapters import _direct_inputs, _generate
from test_lora_ops import CFG, _native
from test_slot_stack import LAYOUTS, LORA, MT, _modules, _slots


@pytest.fixture(scope="module")
def ext():
    return built(cpu_adapters, "CPU adapter kernel")


D = CFG.hidden_size
CALLS = (AdaptCall("self_attn", D, tuple(fused_columns(CFG, "qkv"))), AdaptCall("self_attn.o_proj", D),
         AdaptCall("mlp", D, tuple(fused_columns(CFG, "gate_up"))), AdaptCall("mlp.down_proj", D))


def _operands(call: AdaptCall, T: int, dtype, seed: int):
    """x [T, d_in] of the call's input, zero out [T, D] and fused [T, columns] (or an empty fused)."""
    d_in = site_dims(CFG, call.site)[0]
    x = torch.randn(T, d_in, generator=torch.Generator().manual_seed(seed)).to(dtype)
    width = max((c.start + c.width for c in call.columns), default=0)
    return x, torch.zeros(T, D, dtype=dtype), torch.zeros(T, width, dtype=dtype)


def _unbound(slots, layer: int, call: AdaptCall, x, out, fused, slot_idx, stats=None):
    targets = [(call.site, out)] + [(c.site, fused[:, c.start:c.start + c.width]) for c in call.columns]
    slots.apply_shared(layer, x, targets, slot_idx, stats=stats, plan=SlotPlan(slot_idx))


def _assert_bound_equals_unbound(slots, slot_idx, dtype, stats=None, want_stats=None):
    step = slots.bind_step(SlotPlan(slot_idx), stats, dtype, CALLS)
    assert step is not None
    done = 0
    for layer in range(CFG.num_hidden_layers):
        for k, call in enumerate(CALLS):
            x, want_out, want_fused = _operands(call, slot_idx.shape[0], dtype, seed=10 * layer + k)
            _unbound(slots, layer, call, x, want_out, want_fused, slot_idx, want_stats)
            got_out, got_fused = torch.zeros_like(want_out), torch.zeros_like(want_fused)
            bound = step.layers[layer][k]
            if bound is not None:
                bound(x, got_out, got_fused, step.segs)
                done += 1
            assert torch.equal(got_out, want_out) and torch.equal(got_fused, want_fused), (layer, call.site)
    assert done


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_bound_step_adds_what_apply_shared_adds(ext, layout, dtype):
    slots, _ = _slots(dtype)
    slots.cpu_kernel = ext
    _assert_bound_equals_unbound(slots, torch.tensor(LAYOUTS[layout]), dtype)


@torch.no_grad()
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_bound_step_samples_the_routing_statistics_apply_shared_samples(ext, layout):
    """A step that samples routing statistics: the same deltas, and the same per-slot sums (weights, entropy,
    token counts: routed sites and the ones of unrouted sites) as the apply_shared path records."""
    slots, _ = _slots()
    slots.cpu_kernel = ext
    got, want = RoutingStats(), RoutingStats()
    idx = torch.tensor(LAYOUTS[layout])
    for _ in range(2):                                      # the second step reuses the plan: fresh buffers
        _assert_bound_equals_unbound(slots, idx, torch.float32, got, want)
    assert got.count.sum() > 0
    for name in ("count", "weight_sum", "entropy_sum"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_a_replaced_adapter_is_rebound_and_an_unchanged_step_reuses_the_binding(ext):
    slots, _ = _slots()
    slots.cpu_kernel = ext
    slot_idx = torch.tensor(LAYOUTS["equal_rows_view"])
    first = slots.bind_step(SlotPlan(slot_idx), None, torch.float32, CALLS)
    again = slots.bind_step(SlotPlan(slot_idx), None, torch.float32, CALLS)
    assert again.layers is first.layers                     # same slots, no table change: nothing rebuilt
    for slot, cfg, seed in ((3, LORA, 40), (2, MT, 41)):    # an mtlora slot becomes lora, a lora slot mtlora
        slots.load(slot, cfg, _native(_modules(cfg, seed=seed)))
        _assert_bound_equals_unbound(slots, slot_idx, torch.float32)
    assert slots.bind_step(SlotPlan(slot_idx), None, torch.float32, CALLS).layers is not first.layers
    slots.clear(5)                                          # a slot of the step now bare: adds nothing
    _assert_bound_equals_unbound(slots, slot_idx, torch.float32)


@torch.no_grad()
def test_bind_step_steps_aside_where_apply_shared_must_run(ext):
    slots, _ = _slots()
    idx = torch.tensor(LAYOUTS["equal_rows_view"])
    assert slots.bind_step(SlotPlan(idx), None, torch.float32, CALLS) is None              # no kernel
    slots.cpu_kernel = ext
    assert slots.bind_step(SlotPlan(idx), None, torch.float16, CALLS) is None              # dtype
    big = torch.tensor([0] * (lora_ops.KERNEL_ROWS + 1) + [1] * 3)
    assert slots.bind_step(SlotPlan(big), None, torch.float32, CALLS) is None              # past the row limit
    slots.row_tile = 8
    assert slots.bind_step(SlotPlan(idx), None, torch.float32, CALLS) is None              # batch-invariant
    slots.row_tile = 0
    assert slots.bind_step(SlotPlan(torch.full((4,), -1)), None, torch.float32, CALLS) is None   # no adapter
    bf16, _ = _slots(torch.bfloat16)
    bf16.cpu_kernel = ext
    assert bf16.bind_step(SlotPlan(idx), None, torch.float32, CALLS) is None               # bf16 arenas, fp32 x


@torch.no_grad()
def test_rows_call_writes_its_columns_only_and_refuses_bad_ones_before_writing(ext):
    from mtlora import grouped
    pk, arena, x, _ = _direct_inputs(ext)
    want = torch.zeros(5, 6)
    grouped.expand_into(grouped.shrink(x, pk), pk.parts[0], want)
    segs = torch.tensor([[0, 0, 5]])
    fused, out = torch.zeros(5, 12), torch.zeros(5, 6)
    ext.RowsCall(arena.datas, arena.meta, torch.tensor([[1, 3, 6]]))(x, out, fused, segs)
    torch.testing.assert_close(fused[:, 3:9], want, atol=1e-6, rtol=1e-6)
    assert not fused[:, :3].any() and not fused[:, 9:].any() and not out.any()
    ext.RowsCall(arena.datas, arena.meta, torch.tensor([[0, 0, 6]]))(x, out, None, segs)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)
    bad = {  # cols -> message fragment
        ((2, 0, 6),): "source 2",
        ((1, 8, 6),): "outside an out of 12",
        ((1, -1, 6),): "outside an out of 12",
        ((1, 0, 0),): "outside an out of 12",
        ((1, 0, 6), (1, 6, 6)): "one per meta site",
    }
    for cols, fragment in bad.items():
        fused = torch.zeros(5, 12)
        with pytest.raises(RuntimeError, match=fragment):
            ext.RowsCall(arena.datas, arena.meta, torch.tensor(cols))(x, fused, fused, segs)
        assert not fused.any(), cols
    with pytest.raises(RuntimeError, match="cols must be"):
        ext.RowsCall(arena.datas, arena.meta, torch.tensor([[1, 0]]))
    with pytest.raises(RuntimeError, match="reads the fused output; none given"):
        ext.RowsCall(arena.datas, arena.meta, torch.tensor([[1, 0, 6]]))(x, out, None, segs)
    with pytest.raises(RuntimeError, match=r"\[T, d_out\]"):                   # an out of other rows
        ext.RowsCall(arena.datas, arena.meta, torch.tensor([[0, 0, 6]]))(x, torch.zeros(4, 6), None, segs)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_runs_are_the_same_bound_and_unbound(ext, tmp_path, dtype, monkeypatch):
    """Every tiny adapter kind mixed with base requests, prefill chunks and decodes: bit-identical tokens and
    logprobs whether the decoder's steps are bound or go through apply_shared (the same kernel either way)."""
    from mtlora.base import load_config
    from mtlora.testing import make_tiny_model_dir
    from mtlora_server.engine.testing import write_tiny_adapters

    model_dir = make_tiny_model_dir(tmp_path / "m", seed=2)
    adapters = write_tiny_adapters(tmp_path / "a", load_config(model_dir))
    real, bound = lora_ops.AdapterSlots.bind_step, []

    def counting(self, *args, **kwargs):
        step = real(self, *args, **kwargs)
        bound.append(step is not None)
        return step

    monkeypatch.setattr(lora_ops.AdapterSlots, "bind_step", counting)
    runs = {"bound": _generate(model_dir, adapters, "kernel", dtype)}
    assert any(bound)
    monkeypatch.setattr(lora_ops.AdapterSlots, "bind_step", lambda self, *a, **k: None)
    runs["unbound"] = _generate(model_dir, adapters, "kernel", dtype)
    for rid, want in runs["unbound"].items():
        got = runs["bound"][rid]
        assert got.tokens == want.tokens, rid
        assert [p.logprob for p in got.logprobs[0]] == [p.logprob for p in want.logprobs[0]], rid
        assert [p.logprob for p in got.prompt_logprobs[1:]] == [p.logprob for p in want.prompt_logprobs[1:]], rid
