"""The CPU small-slot adapter kernel (engine/cpu_adapters.py, csrc/adapter_rows.cpp): per token it must equal the
MoLoRA module of the token's own adapter (fp32 1e-5) in every layout the plan gives it, match the torch small-slot
path in bf16 (to the rounding of the output), follow an adapter replaced in its slot, refuse malformed inputs
before writing, and give whole engine runs the same tokens and logprobs as the torch ops. Also: the engine flag,
the environment switch and the build-failure fallback."""

from __future__ import annotations

import dataclasses
import logging
import types

import pytest
import torch

from cpu_kernels import break_the_build, built
from mtlora import grouped
from mtlora.errors import ConfigError
from mtlora.sites import site_dims
from mtlora.testing import make_tiny_model_dir
from mtlora_server.engine import cpu_adapters, lora_ops
from mtlora_server.engine.args import EngineArgs
from mtlora_server.engine.core import EngineCore
from mtlora_server.engine.lora_ops import KERNEL_ROWS, SlotPlan
from mtlora_server.engine.testing import run_to_completion, tiny_engine_args, write_tiny_adapters
from mtlora_server.engine.types import GenerationRequest, SamplingParams
from test_lora_ops import CFG, SHARED, _native, _oracle_delta
from test_slot_stack import LAYOUTS, LORA, MT, SLOT_CFG, _modules, _run, _slots


@pytest.fixture(scope="module")
def ext():
    return built(cpu_adapters, "CPU adapter kernel")


@pytest.fixture
def calls(monkeypatch):
    """Segments handed to the kernel, per call."""
    seen = []
    real = cpu_adapters.add_rows

    def counting(ext, x, outs, arena, segs, stats=None):
        seen.append(segs[:, 0].tolist())
        return real(ext, x, outs, arena, segs, stats)

    monkeypatch.setattr(cpu_adapters, "add_rows", counting)
    return seen


def _kernel_slots(ext, dtype=torch.float32):
    slots, oracles = _slots(dtype)
    slots.cpu_kernel = ext
    return slots, oracles


LAYOUTS_K = dict(LAYOUTS, rows_not_multiple_of_4=[0] * 5 + [1] * 7 + [2] * 6 + [3] + [4] * 9 + [5] * 2 + [-1] * 3,
                 one_row_each=[5, 4, 3, 2, 1, 0, -1],
                 beyond_kernel_rows=[0] * 130 + [1] * 3 + [-1] * 2 + [2] * 2 + [5] * 129)


@torch.no_grad()
@pytest.mark.parametrize("layout", list(LAYOUTS_K))
@pytest.mark.parametrize("group", list(SHARED))
def test_kernel_equals_each_tokens_module(ext, group, layout, calls):
    slots, oracles = _kernel_slots(ext)
    slot_idx = torch.tensor(LAYOUTS_K[layout])
    x = torch.randn(slot_idx.shape[0], site_dims(CFG, SHARED[group][0])[0], generator=torch.Generator().manual_seed(3))
    for layer in range(CFG.num_hidden_layers):
        for site, got in _run(slots, group, slot_idx, x, layer):
            want = _oracle_delta(oracles, slot_idx, x, layer, site, got.shape[1])
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    plan = SlotPlan(slot_idx)
    small = {s for s, rows in plan.groups.items() if isinstance(rows, slice) and rows.stop - rows.start <= KERNEL_ROWS}
    assert bool(calls) == bool(small) and all(set(c) == small for c in calls)


@torch.no_grad()
@pytest.mark.parametrize("pairs", [False, True], ids=["rows", "pairs"])
@pytest.mark.parametrize("group", list(SHARED))
def test_kernel_bf16_matches_the_torch_small_slot_path(ext, group, pairs, monkeypatch):
    """bf16 x and outputs against the per-slot torch path (fp32 math, rounded once). B in rows: the kernel
    computes in fp32 too, so they agree to one bf16 rounding step of the output almost everywhere. B in pairs
    (AVX-512 BF16): the kernel rounds the routed input to bf16 first, so more outputs differ by that step; both
    stay within bf16 tolerances."""
    if pairs and not ext.BF16_DOT:
        pytest.skip("the pair layout needs a kernel built with AVX-512 BF16 (this CPU has no avx512_bf16)")
    monkeypatch.setattr(lora_ops, "STACK_MIN_SLOTS", 10 ** 6)                     # torch side: per slot, fp32
    slot_idx = torch.tensor(LAYOUTS_K["rows_not_multiple_of_4"])
    x = torch.randn(slot_idx.shape[0], site_dims(CFG, SHARED[group][0])[0],
                    generator=torch.Generator().manual_seed(5)).bfloat16()
    kernel = ext if pairs else types.SimpleNamespace(adapter_rows=ext.adapter_rows, BF16_DOT=False)
    got = {}
    for k in (None, kernel):
        slots, _ = _slots(torch.bfloat16)
        slots.cpu_kernel = k
        got[k is not None] = [t for _, t in _run(slots, group, slot_idx, x, 1)]
    for a, b in zip(got[True], got[False]):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2 * float(b.abs().max()), rtol=2 ** -7)
        assert (a == b).float().mean() > (0.75 if pairs else 0.9)


@torch.no_grad()
def test_an_adapter_replaced_in_its_slot_is_followed(ext, calls):
    slots, oracles = _kernel_slots(ext)
    slot_idx = torch.tensor(LAYOUTS["equal_rows_view"])
    x = torch.randn(slot_idx.shape[0], 48, generator=torch.Generator().manual_seed(4))
    _run(slots, "attn_in", slot_idx, x, 0)                                         # arenas built
    for cfg, seed in ((MT, 99), (LORA, 98)):          # same shape, then another shape
        oracles[1] = _modules(cfg, seed)
        others = {k: a.data for k, a in slots._kcalls.slot_arenas().items() if k[-1] != 1}
        slots.load(1, cfg, _native(oracles[1]))
        # A swap drops that slot's rows only: the others are kept, not rebuilt (loads under churn stay cheap).
        kept = slots._kcalls.slot_arenas()
        assert others and all(kept[k].data is a for k, a in others.items())
        assert not any(k[-1] == 1 for k in kept)
        for site, got in _run(slots, "attn_in", slot_idx, x, 0):
            want = _oracle_delta(oracles, slot_idx, x, 0, site, got.shape[1])
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    slots.clear(1)
    oracles.pop(1)
    for site, got in _run(slots, "attn_in", slot_idx, x, 0):
        torch.testing.assert_close(got, _oracle_delta(oracles, slot_idx, x, 0, site, got.shape[1]), atol=1e-5,
                                   rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("dtype,pairs", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)],
                         ids=["fp32", "bf16-rows", "bf16-pairs"])
def test_prepared_adapters_give_the_arenas_the_slot_buffers_give(ext, dtype, pairs, monkeypatch):
    """`AdapterSlots.prepare` (the load worker's kernel data, issue 18) must be exactly what the lazy path derives
    from the slot buffers: the same arena vectors (bit for bit) and meta rows in every call, the same outputs --
    and with it a step derives nothing from the buffers (`pack_slot` is never called)."""
    if pairs and not ext.BF16_DOT:
        pytest.skip("the pair layout needs a kernel built with AVX-512 BF16 (this CPU has no avx512_bf16)")
    kernel = ext if pairs else types.SimpleNamespace(adapter_rows=ext.adapter_rows, BF16_DOT=False)
    slot_idx = torch.tensor(LAYOUTS_K["rows_not_multiple_of_4"])
    xs = {g: torch.randn(slot_idx.shape[0], site_dims(CFG, SHARED[g][0])[0],
                         generator=torch.Generator().manual_seed(6)).to(dtype) for g in SHARED}
    runs = {}
    for use_prepared in (False, True):
        slots, oracles = _slots(dtype)
        slots.cpu_kernel = kernel
        if use_prepared:
            for slot, cfg in SLOT_CFG.items():
                native = {k: t.to(dtype) for k, t in _native(oracles[slot]).items()}
                prepared = slots.prepare(cfg, native)
                assert prepared is not None and prepared.pairs == pairs
                slots.load(slot, cfg, native, prepared=prepared)
            monkeypatch.setattr(lora_ops, "pack_slot", lambda *a: pytest.fail("a prepared slot derived a pack"))
        outs = [t.clone() for layer in range(CFG.num_hidden_layers) for g in SHARED
                for _, t in _run(slots, g, slot_idx, xs[g], layer)]
        runs[use_prepared] = (outs, slots._kcalls.slot_arenas())
        monkeypatch.undo()
    (lazy_out, lazy), (prep_out, prep) = runs[False], runs[True]
    assert lazy.keys() == prep.keys() and len(lazy) > 20
    for key, a in lazy.items():
        assert a.meta == prep[key].meta, key
        assert a.data.dtype == prep[key].data.dtype and torch.equal(a.data, prep[key].data), key
    assert all(torch.equal(a, b) for a, b in zip(lazy_out, prep_out))
    if not pairs:                              # one site of a group alone (`apply`): derived, not the prepared data
        x = xs["attn_in"].to(torch.float32) if dtype == torch.float32 else xs["attn_in"]
        got = slots.apply(0, "self_attn.k_proj", x, slot_idx)
        want = _oracle_delta(oracles, slot_idx, x.float(), 0, "self_attn.k_proj", got.shape[1])
        tol = 1e-5 if dtype == torch.float32 else 5e-2
        torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


@torch.no_grad()
def test_prepared_data_of_another_dtype_or_a_cleared_slot_is_not_used(ext):
    """A PreparedAdapter made for other slots (dtype) is ignored by `load`; `clear` forgets the slot's; and
    `prepare` returns None where the kernel does not run the adapter work."""
    slots, oracles = _kernel_slots(ext)
    native = _native(oracles[0])
    other = cpu_adapters.prepare(MT, {k: t.bfloat16() for k, t in native.items()},
                                 {s: MT.groups_for(site_dims(CFG, s)[1]) for s in MT.sites()},
                                 CFG.num_hidden_layers, torch.bfloat16, False)
    slots.load(0, MT, native, prepared=other)
    assert 0 not in slots._prepared
    slots.load(0, MT, native, prepared=slots.prepare(MT, native))
    assert 0 in slots._prepared
    slots.clear(0)
    assert 0 not in slots._prepared
    slots.cpu_kernel = None
    assert slots.prepare(MT, native) is None


@torch.no_grad()
def test_a_failing_prepare_only_logs_and_the_slot_derives_its_data(ext, monkeypatch, caplog):
    slots, oracles = _kernel_slots(ext)
    native = _native(oracles[0])
    monkeypatch.setattr(cpu_adapters, "prepare", lambda *a, **k: 1 / 0)
    with caplog.at_level(logging.WARNING):
        assert slots.prepare(MT, native) is None
    assert "not prepared (ZeroDivisionError" in caplog.text


def _direct_inputs(ext):
    """A one-site arena for slot 0 (d_in 8, d_out 6, r 2, N 3, g 2) and inputs for 5 rows."""
    g = torch.Generator().manual_seed(0)
    site = grouped.SiteWeights(torch.randn(2, 8, generator=g), torch.randn(3, 2, 6, generator=g),
                               torch.randn(2, 3, 8, generator=g), 0.5)
    pk = grouped.pack([site])
    arena = cpu_adapters.Arena.of([cpu_adapters.SlotArena.build(pk, [0], 1)], nsite=1)
    x, out = torch.randn(5, 8, generator=g), torch.zeros(5, 6)
    return pk, arena, x, out


NO_STATS = (torch.zeros(0), torch.zeros(0, 0, dtype=torch.long))
BAD = {  # name -> (mutation of (x, outs, arena, segs), message fragment)
    "a segment naming a slot past the table": (lambda a: a.update(segs=torch.tensor([[0, 0, 5], [1, 0, 5]])),
                                               "outside the 1 meta rows"),
    "a negative slot": (lambda a: a.update(segs=torch.tensor([[-1, 0, 5]])), "outside the 1 meta rows"),
    "segment rows past T": (lambda a: a.update(segs=torch.tensor([[0, 3, 6]])), "out of range"),
    "out dtype": (lambda a: a.update(outs=[a["outs"][0].double()]), "x's dtype"),
    "out rows": (lambda a: a.update(outs=[torch.zeros(4, 6)]), "[T, d_out]"),
    "meta width": (lambda a: a.update(meta=torch.zeros(1, 3, dtype=torch.long)), "meta"),
    "pair layout of fp32 B": (lambda a: a.update(meta=a["meta"].clone().index_fill_(1, torch.tensor([2]), 1)),
                              "layout 1"),
    "arena count": (lambda a: a.update(data=a["data"] * 2), "one arena per meta row"),
    "B outside arena": (lambda a: a.update(data=[a["data"][0][:-1].clone()]), "outside the arena"),
    "arena dtype": (lambda a: a.update(data=[a["data"][0].double()]), "arenas must be"),
    "x dtype": (lambda a: a.update(x=a["x"].half(), outs=[a["outs"][0].half()]), "float32 or bfloat16"),
}


@torch.no_grad()
def test_direct_call_equals_grouped_and_refuses_bad_inputs_before_writing(ext):
    pk, arena, x, out = _direct_inputs(ext)
    empty = cpu_adapters.SlotArena.empty(1, torch.float32)                         # a slot adapting no site here
    both = cpu_adapters.Arena.of([cpu_adapters.SlotArena.build(pk, [0], 1), empty], nsite=1)
    cpu_adapters.add_rows(ext, x, [out], both, torch.tensor([[0, 0, 5], [1, 0, 5]]))
    want = torch.zeros(5, 6)
    grouped.expand_into(grouped.shrink(x, pk), pk.parts[0], want)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)
    for name, (mutate, fragment) in BAD.items():
        args = dict(x=x, outs=[torch.zeros(5, 6)], data=arena.datas, meta=arena.meta, segs=torch.tensor([[0, 0, 5]]))
        mutate(args)
        before = [o.clone() for o in args["outs"]]
        with pytest.raises(RuntimeError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
            ext.adapter_rows(args["x"], args["outs"], args["data"], args["meta"], args["segs"], *NO_STATS)
        assert all(torch.equal(o, b) for o, b in zip(args["outs"], before)), name
    out = torch.zeros(5, 6)
    with pytest.raises(RuntimeError, match="routing weights outside wout"):    # 5 rows x g 2 x N 3 need 30 floats
        ext.adapter_rows(x, [out], arena.datas, arena.meta, torch.tensor([[0, 0, 5]]), torch.zeros(29),
                         torch.zeros(1, 1, dtype=torch.long))
    assert not out.any()


@torch.no_grad()
def test_the_table_is_indexed_by_slot_and_only_named_rows_are_read(ext):
    """Segments name table rows by slot: a step over slot 2 alone reads row 2 and nothing else -- a stale row
    (an arena dropped under its meta row, as after an adapter swap) breaks nothing until a segment names it, and
    then the kernel refuses it before any write."""
    pk, _, x, _ = _direct_inputs(ext)
    real = cpu_adapters.SlotArena.build(pk, [0], 1)
    table = cpu_adapters.Arena.of([real, real, real], nsite=1)
    table.drop(1)                                                 # stale: meta row kept, arena released
    assert table.ready == {0, 2} and table.datas[1].numel() == 0
    want = torch.zeros(5, 6)
    grouped.expand_into(grouped.shrink(x, pk), pk.parts[0], want)
    for segs in ([[2, 0, 5]], [[0, 0, 2], [2, 2, 5]]):
        out = torch.zeros(5, 6)
        cpu_adapters.add_rows(ext, x, [out], table, torch.tensor(segs))
        torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)
    out = torch.zeros(5, 6)
    with pytest.raises(RuntimeError, match="slot 1 shrink rows outside the arena"):
        cpu_adapters.add_rows(ext, x, [out], table, torch.tensor([[1, 0, 5]]))
    assert not out.any()
    table.put(1, real)
    cpu_adapters.add_rows(ext, x, [out], table, torch.tensor([[1, 0, 5]]))
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="does not fit"):
        table.put(0, cpu_adapters.SlotArena(real.data.bfloat16(), real.meta))


def _fp32_math(x: torch.Tensor, pk: grouped.Pack, round_lhs: bool) -> torch.Tensor:
    """One site's delta in fp32 from the pack's values: shrink, per-group softmax, routed input u [T, g, N*r]
    (rounded to bf16 once with round_lhs, as the pair layout's expand takes it), u @ B per group."""
    part = pk.parts[0]
    T, g, N, r = x.shape[0], part.g, part.N, part.r
    hz = x @ pk.W.T                                                                  # [T, rows]
    h = hz[:, part.a_off:part.a_off + r]
    w = torch.softmax(hz[:, part.r_off:part.r_off + g * N].view(T, g, N), dim=-1)
    u = (w[..., None] * h[:, None, None, :]).reshape(T, g, N * r)
    if round_lhs:
        u = u.bfloat16().float()
    return torch.einsum("tgk,gkc->tgc", u, part.B).reshape(T, -1)


@torch.no_grad()
@pytest.mark.parametrize("pairs", [False, True], ids=["rows", "pairs"])
@pytest.mark.parametrize("d_out,r,N", [(144, 4, 3), (104, 3, 3)], ids=["tail8-even", "tail20-odd"])
def test_bf16_kernel_is_fp32_math_of_the_bf16_values_over_several_chunks(ext, pairs, d_out, r, N):
    """bf16 x and weights, d_in and d_out/g spanning several column chunks with narrower tails (8 and 20 columns:
    one and two 16-lane halves), N*r even and odd, rows in blocks of 4 and a remainder (the AVX-512 BF16 shrink
    where the CPU has it, else the widening one): the kernel's output is the fp32 math of the same bf16 values
    (with the pair layout: the routed input rounded to bf16 first), rounded once -- within one bf16 step
    everywhere, equal almost everywhere. Also: the arena's chunk width is the kernel's."""
    if pairs and not ext.BF16_DOT:
        pytest.skip("the pair layout needs a kernel built with AVX-512 BF16 (this CPU has no avx512_bf16)")
    assert ext.CHUNK == cpu_adapters.CHUNK
    g = torch.Generator().manual_seed(1)
    d_in, groups, T = 80, 2, 9
    site = grouped.SiteWeights(torch.randn(r, d_in, generator=g), torch.randn(N, r, d_out, generator=g),
                               torch.randn(groups, N, d_in, generator=g), 0.5)
    pk = grouped.pack([site])
    pk16 = grouped.Pack(pk.W.bfloat16(), [dataclasses.replace(p, B=p.B.bfloat16()) for p in pk.parts])
    x = torch.randn(T, d_in, generator=g).bfloat16()
    base = torch.randn(T, d_out, generator=g).bfloat16()
    out = base.clone()
    arena = cpu_adapters.Arena.of([cpu_adapters.SlotArena.build(pk16, [0], 1, pairs=pairs)], nsite=1)
    cpu_adapters.add_rows(ext, x, [out], arena, torch.tensor([[0, 0, T]]))
    want = (base.float() + _fp32_math(x.float(), pk16.float(), round_lhs=pairs)).bfloat16()
    step = want.float().abs().clamp_min(2 ** -100) * 2 ** -7
    assert ((out.float() - want.float()).abs() <= step).all()
    assert (out == want).float().mean() > 0.97


@torch.no_grad()
@pytest.mark.parametrize("bf16_dot", [True, False])
def test_bf16_slots_beyond_kernel_rows_go_to_the_kernel_only_with_bf16_dot_products(ext, bf16_dot, calls):
    """bf16 with a kernel that has AVX-512 BF16 dot products: every contiguous slot goes through it whatever its
    rows (prefill chunks too), and each token's delta is its own adapter's (to bf16 rounding); without them the
    limit stays KERNEL_ROWS."""
    if bf16_dot and not ext.BF16_DOT:
        pytest.skip("this kernel was built without AVX-512 BF16 (this CPU has no avx512_bf16)")
    kernel = ext if bf16_dot else types.SimpleNamespace(adapter_rows=ext.adapter_rows, BF16_DOT=False)
    slots, oracles = _kernel_slots(ext, torch.bfloat16)
    slots.cpu_kernel = kernel
    slot_idx = torch.tensor(LAYOUTS_K["beyond_kernel_rows"])
    x = torch.randn(slot_idx.shape[0], site_dims(CFG, SHARED["attn_in"][0])[0],
                    generator=torch.Generator().manual_seed(6)).bfloat16()
    for site, got in _run(slots, "attn_in", slot_idx, x, 0):
        want = _oracle_delta(oracles, slot_idx, x.float(), 0, site, got.shape[1])
        torch.testing.assert_close(got.float(), want, atol=3e-2 * float(want.abs().max()), rtol=2 ** -6)
    big = {s for s, rows in SlotPlan(slot_idx).groups.items()
           if isinstance(rows, slice) and rows.stop - rows.start > KERNEL_ROWS}
    assert big and calls
    assert all(big <= set(c) if bf16_dot else not big & set(c) for c in calls)


def _generate(model_dir, adapters, mode: str, dtype: str):
    core = EngineCore(tiny_engine_args(model_dir, adapters=adapters, cpu_adapters=mode, dtype=dtype))
    assert (core.slots.cpu_kernel is not None) == (mode == "kernel")
    gen = torch.Generator().manual_seed(7)
    names = list(adapters) + [None]
    reqs = [GenerationRequest(f"r{i}", torch.randint(3, 250, (5 + 3 * i,), generator=gen).tolist(),
                              SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=2,
                                             prompt_logprobs=1),
                              adapter=names[i % len(names)]) for i in range(12)]
    return run_to_completion(core, reqs)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_runs_are_the_same_with_the_kernel(ext, tmp_path, dtype, monkeypatch):
    """Every tiny adapter kind mixed in one batch with base requests: the same greedy tokens with the kernel as
    with the torch ops, and (fp32) the same logprobs to 1e-5. In bf16 the torch path computes slots of more than
    SMALL_ROWS rows (prefill chunks) with bf16 GEMMs, the kernel in fp32: different roundings, so there the kernel
    takes only the slots both compute in fp32 (decode), and those must give the same tokens."""
    if dtype == "bfloat16":
        monkeypatch.setattr(lora_ops, "KERNEL_ROWS", lora_ops.SMALL_ROWS)
        monkeypatch.setattr(lora_ops, "KERNEL_ROWS_BF16_DOT", lora_ops.SMALL_ROWS)
        monkeypatch.setattr(cpu_adapters, "pair_layout", lambda ext, dtype: False)     # fp32 math (next test)
    model_dir = make_tiny_model_dir(tmp_path / "m", seed=2)
    from mtlora.base import load_config
    adapters = write_tiny_adapters(tmp_path / "a", load_config(model_dir))
    torch_run, kernel_run = (_generate(model_dir, adapters, mode, dtype) for mode in ("torch", "kernel"))
    for rid, want in torch_run.items():
        got = kernel_run[rid]
        assert got.tokens == want.tokens, rid
        if dtype == "float32":
            for a, b in zip(got.logprobs[0], want.logprobs[0]):
                assert abs(a.logprob - b.logprob) < 1e-5


def _prompt_logprobs(run: dict) -> dict:
    return {rid: torch.tensor([p.logprob for p in f.prompt_logprobs[1:]]) for rid, f in run.items()}


def test_engine_runs_with_the_pair_layout_round_as_the_torch_bf16_path(ext, tmp_path, monkeypatch):
    """bf16 with B in pairs (AVX-512 BF16 dot products in the expand): the kernel rounds the routed input to bf16
    as the torch path's bf16 GEMMs do (SMALL_ROWS 0: every torch slot in bf16), so the two engines' prompt
    logprobs (teacher-forced, no sampling divergence) agree within 0.2 on these tiny random adapters -- where a
    B layout off by one pair element is off by ~0.6 (measured while writing this test) -- and most greedy tokens
    agree (a random tiny model's near-ties may flip a few)."""
    if not ext.BF16_DOT:
        pytest.skip("the pair layout needs a kernel built with AVX-512 BF16 (this CPU has no avx512_bf16)")
    monkeypatch.setattr(lora_ops, "SMALL_ROWS", 0)
    model_dir = make_tiny_model_dir(tmp_path / "m", seed=2)
    from mtlora.base import load_config
    adapters = write_tiny_adapters(tmp_path / "a", load_config(model_dir))
    torch_run, kernel_run = (_generate(model_dir, adapters, mode, "bfloat16") for mode in ("torch", "kernel"))
    want, got = _prompt_logprobs(torch_run), _prompt_logprobs(kernel_run)
    assert max(float((got[rid] - want[rid]).abs().max()) for rid in want) < 0.2
    assert sum(kernel_run[rid].tokens == torch_run[rid].tokens for rid in torch_run) >= 9


def test_required_kernel_names_the_flag_and_env_forces_torch(monkeypatch, caplog):
    break_the_build(monkeypatch, cpu_adapters)
    slots, _ = _slots()
    with caplog.at_level(logging.WARNING):
        assert cpu_adapters.enable(slots) is False and slots.cpu_kernel is None
    assert "could not be built" in caplog.text and "c++: not found" in caplog.text
    with pytest.raises(ConfigError) as info:
        cpu_adapters.enable(slots, required=True)
    assert info.value.field == "cpu_adapters"
    monkeypatch.setattr(cpu_adapters.EXTENSION, "_state", {})
    monkeypatch.setenv(cpu_adapters.ENV, "torch")
    assert cpu_adapters.kernel() is None
    with pytest.raises(ConfigError) as info:
        EngineArgs(cpu_adapters="fast")
    assert info.value.field == "cpu_adapters"


@torch.no_grad()
@pytest.mark.parametrize("layout", ["rows_not_multiple_of_4", "large_slot_beside_small", "one_row_each"])
def test_routing_stats_from_the_kernel_equal_the_torch_paths(ext, layout, calls):
    """A sampled step: the kernel returns the softmax weights it routed with; per-slot sums, entropies and counts
    equal those of the torch paths (exact-form records: ones for sites without a router)."""
    from mtlora_server.engine.lora_ops import RoutingStats
    slot_idx = torch.tensor(LAYOUTS_K[layout])
    got = {}
    for kernel in (None, ext):
        slots, _ = _slots()
        slots.cpu_kernel = kernel
        stats = RoutingStats()
        for group in SHARED:
            x = torch.randn(slot_idx.shape[0], site_dims(CFG, SHARED[group][0])[0],
                            generator=torch.Generator().manual_seed(11))
            for layer in range(CFG.num_hidden_layers):
                sites = SHARED[group]
                widths = [site_dims(CFG, s)[1] for s in sites]
                fused = torch.zeros(x.shape[0], sum(widths))
                starts = [sum(widths[:k]) for k in range(len(sites))]
                targets = [(s, fused[:, a:a + w]) for s, a, w in zip(sites, starts, widths)]
                slots.apply_shared(layer, x, targets, slot_idx, stats=stats, plan=SlotPlan(slot_idx))
        got[kernel is not None] = (stats.weight_sum.clone(), stats.entropy_sum.clone(), stats.count.clone())
    assert calls, "the kernel did not run"
    for a, b in zip(got[True], got[False]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert got[True][2].sum() > 0


def _chunks_by_loop(B: torch.Tensor, pairs: bool) -> torch.Tensor:
    """The arena layouts written the plain way, one slice per chunk of CHUNK columns (the oracle for the permutes)."""
    C = cpu_adapters.CHUNK
    g, nr, dg = B.shape
    if pairs:
        if nr % 2:
            B = torch.cat([B, B.new_zeros(g, 1, dg)], dim=1)
        bp = B.reshape(g, -1, 2, dg)
        parts = [bp[..., c0:c0 + C].transpose(2, 3).reshape(g, -1) for c0 in range(0, dg, C)]
    else:
        parts = [B[:, :, c0:c0 + C].reshape(g, -1) for c0 in range(0, dg, C)]
    return torch.cat(parts, dim=1).reshape(-1)


@pytest.mark.parametrize("g,nr,dg", [(1, 16, 1536), (2, 17, 288), (3, 1, 20), (1, 128, 32), (2, 3, 33), (1, 5, 8)])
def test_arena_layouts_equal_the_chunk_by_chunk_definition(g, nr, dg):
    B = torch.randn(g, nr, dg, generator=torch.Generator().manual_seed(nr * dg)).to(torch.bfloat16)
    assert torch.equal(cpu_adapters.chunk_major(B), _chunks_by_loop(B, pairs=False))
    assert torch.equal(cpu_adapters.pair_major(B), _chunks_by_loop(B, pairs=True))
