"""More registered adapters than device slots: every request is answered as if all adapters were resident, eviction
never takes an adapter with work in flight, a corrupt adapter fails only its own requests (once, no retry loop),
and adapters can be registered / unregistered while requests run."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from mtlora.errors import AdapterBusyError, AdapterNotFoundError, RequestFailedError
from mtlora.testing import make_tiny_model_dir
from mtlora_server.engine.adapter_registry import NEVER, scan_adapter_dir
from mtlora_server.engine.core import EngineCore
from mtlora_server.engine.engine import Engine
from mtlora_server.engine.testing import TINY_ADAPTERS, run_to_completion, tiny_engine_args, write_random_adapter
from mtlora_server.engine.types import GenerationRequest, SamplingParams

KINDS = list(TINY_ADAPTERS)
NUM_ADAPTERS = 7


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("many-adapters")
    model_dir = make_tiny_model_dir(root / "model", seed=7)
    hf_config = EngineCore(tiny_engine_args(model_dir)).hf_config
    paths = {}
    for i in range(NUM_ADAPTERS):                    # every method and placement, different weights
        kind = KINDS[i % len(KINDS)]
        paths[f"a{i}"] = str(write_random_adapter(root / "adapters" / f"a{i}", hf_config, seed=100 + i,
                                                  **TINY_ADAPTERS[kind]))
    resident = EngineCore(tiny_engine_args(model_dir, adapters=paths, max_adapters=8))
    return model_dir, paths, resident


def _prompt(seed: int, n: int) -> list[int]:
    return torch.randint(3, 259, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _req(rid, ids, adapter, max_tokens=5, **kw):
    return GenerationRequest(rid, ids, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw),
                             adapter=adapter)


def _workload(names, per_adapter=3):
    reqs = []
    for k in range(per_adapter):                     # interleaved: consecutive requests want different adapters
        for j, name in enumerate(names):
            reqs.append(_req(f"{name}-{k}", _prompt(10 * j + k, 9 + 5 * k + j), name, max_tokens=4 + k,
                             logprobs=1))
    return reqs


def _watch_evictions(core: EngineCore) -> list[str]:
    """Record every eviction, asserting that the victim has no admitted work and no pinned waiting work."""
    evicted, evict = [], core.registry._evict

    def checked(name: str, slot: int) -> None:
        rec = core.registry.records[name]
        assert not any(s.adapter_name == name for s in core.scheduler.running), f"{name} evicted while running"
        assert not any(s.adapter_name == name and s.seq_id < rec.drain_from for s in core.scheduler.waiting), \
            f"{name} evicted with pinned requests waiting"
        evicted.append(name)
        evict(name, slot)

    core.registry._evict = checked
    return evicted


@pytest.mark.parametrize("cache_size", [0, 1 << 30])
def test_seven_adapters_two_slots_match_all_resident(env, cache_size):
    model_dir, paths, resident = env
    core = EngineCore(tiny_engine_args(model_dir, adapters=paths, max_adapters=2, adapter_cache_size=cache_size))
    assert len(core.registry.records) == NUM_ADAPTERS and len(core.adapters) == 2
    evicted = _watch_evictions(core)
    execute, steps = core.runner.execute, []

    def checked_step(scheduled, *args, **kwargs):           # every chunk runs on its own adapter's slot
        for c in scheduled.chunks:
            name = c.seq.adapter_name
            assert c.seq.adapter_slot == (core.adapters[name].slot if name else -1)
        steps.append({c.seq.adapter_name for c in scheduled.chunks} - {None})
        return execute(scheduled, *args, **kwargs)

    core.runner.execute = checked_step
    installs, load = [], core.slots.load                     # was each slot copy handed the kernel's data?
    core.slots.load = lambda slot, config, tensors, **kw: installs.append(kw.get("prepared")) or load(
        slot, config, tensors, **kw)
    reqs = _workload([None, *paths])
    want = run_to_completion(resident, _workload([None, *paths]))
    got = run_to_completion(core, reqs)
    assert core.take_failures() == {}
    for r in reqs:
        rid = r.request_id
        assert got[rid].finished and got[rid].tokens == want[rid].tokens, rid
        a = torch.tensor([lp.logprob for lp in got[rid].logprobs[0]])
        b = torch.tensor([lp.logprob for lp in want[rid].logprobs[0]])
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    c = core.registry.counters
    assert c.loads_total >= NUM_ADAPTERS - 2 and c.evictions_total == len(evicted) >= NUM_ADAPTERS - 2
    assert len(core.adapters) <= 2 and c.load_failures_total == 0
    assert max(map(len, steps)) == 2                            # never more adapters in a step than slots
    if core.slots.cpu_kernel is not None:                    # read in the load workers, so no arena on the step
        assert installs and all(p is not None for p in installs)   # thread (issue 18)
    if cache_size:
        assert c.disk_loads_total == NUM_ADAPTERS - 2          # each non-startup adapter read once, then cached
    else:
        assert c.cache_hits_total == 0 and c.disk_loads_total == c.loads_total
    assert c.wait_count > 0 and core.stats().adapters_registered == NUM_ADAPTERS
    metrics = _scrape(core)
    assert metrics["mtlora:adapters_registered"] == NUM_ADAPTERS and metrics["mtlora:adapters_resident"] == 2
    assert metrics["mtlora:adapter_evictions_total"] == len(evicted)
    assert metrics["mtlora:adapter_host_cache_hits_total"] == c.cache_hits_total
    assert metrics["mtlora:adapter_wait_seconds_count"] == c.wait_count > 0


def _scrape(core: EngineCore) -> dict[str, float]:
    """/metrics of an API server over this core (the collector reads stats() and list_adapters())."""
    from types import SimpleNamespace

    from mtlora_server.api.metrics import Metrics

    view = SimpleNamespace(stats=core.stats, list_adapters=lambda: [r.info for r in core.registry.records.values()])
    text = Metrics(view).render().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_busy_adapters_are_never_evicted(env):
    """Both slots run long requests; a request for a third adapter waits until one of them is idle, then runs."""
    model_dir, paths, resident = env
    core = EngineCore(tiny_engine_args(model_dir, adapters=paths, max_adapters=2))
    evicted = _watch_evictions(core)
    long_a = _req("long0", _prompt(1, 12), "a0", max_tokens=12)
    long_b = _req("long1", _prompt(2, 12), "a1", max_tokens=24)
    cold = _req("cold", _prompt(3, 12), "a5", max_tokens=4)
    got = run_to_completion(core, [long_a, long_b, cold])
    assert evicted == ["a0"]                                    # a1 still ran when a5 came in
    want = run_to_completion(resident, [_req("cold", _prompt(3, 12), "a5", max_tokens=4)])
    assert got["cold"].tokens == want["cold"].tokens
    assert len(got["long1"].tokens[0]) == 24


def test_steady_load_does_not_starve_a_cold_adapter(env):
    """Resident adapters that keep getting requests are drained so a waiting cold adapter gets a slot."""
    model_dir, paths, _ = env
    core = EngineCore(tiny_engine_args(model_dir, adapters=paths, max_adapters=2))
    core.add_request(_req("cold", _prompt(5, 8), "a6", max_tokens=2))
    finished, n = set(), 0
    for step in range(400):
        if "cold" in finished:
            break
        for name in ("a0", "a1"):                               # a steady stream for the resident two
            if len([r for r in core.requests if r.startswith(name)]) < 2:
                core.add_request(_req(f"{name}-{n}", _prompt(n, 6), name, max_tokens=3))
                n += 1
        finished |= {o.request_id for o in core.step() if o.finished}
        if core.last_step_idle:
            core.registry.wait_for_load(0.05)
    assert "cold" in finished
    assert any(r.drain_from != NEVER or r.slot is None for r in (core.registry.records["a0"],
                                                               core.registry.records["a1"]))


def test_host_cache_keeps_prefix_salt_disk_reload_does_not(env):
    model_dir, paths, _ = env
    cached = EngineCore(tiny_engine_args(model_dir, adapters=paths, max_adapters=1))
    uncached = EngineCore(tiny_engine_args(model_dir, adapters=paths, max_adapters=1, adapter_cache_size=0))
    for core in (cached, uncached):
        uids = []
        for rid, name in (("x", "a2"), ("y", "a3"), ("z", "a2")):
            run_to_completion(core, [_req(rid, _prompt(9, 20), name, max_tokens=1)])
            uids.append(core.adapters[name].uid)
        assert (uids[0] == uids[2]) == (core is cached)
    # The cached one reused the K/V blocks that a2 computed before it was evicted.
    assert cached.prefix_cache.hits > uncached.prefix_cache.hits


def _corrupt(src: str, dst: Path) -> str:
    import shutil

    shutil.copytree(src, dst)
    weights = dst / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])             # truncated: the config still parses
    return str(dst)


def test_corrupt_adapter_fails_only_its_requests_once(env, tmp_path):
    model_dir, paths, resident = env
    adapters = {"a0": paths["a0"], "a1": paths["a1"], "bad": _corrupt(paths["a2"], tmp_path / "bad"),
                "a3": paths["a3"]}
    core = EngineCore(tiny_engine_args(model_dir, adapters=adapters, max_adapters=2))
    reqs = [_req("bad-0", _prompt(1, 7), "bad"), _req("good-0", _prompt(2, 7), "a3"),
            _req("bad-1", _prompt(3, 7), "bad"), _req("good-1", _prompt(4, 7), "a0")]
    got = run_to_completion(core, reqs)
    failures = core.take_failures()
    assert set(failures) == {"bad-0", "bad-1"}
    for err in failures.values():
        assert isinstance(err, RequestFailedError)
        assert "'bad'" in str(err) and "corrupt or truncated" in str(err)
    want = run_to_completion(resident, [_req("good-0", _prompt(2, 7), "a3"), _req("good-1", _prompt(4, 7), "a0")])
    for rid in ("good-0", "good-1"):
        assert got[rid].finished and got[rid].tokens == want[rid].tokens
    c = core.registry.counters
    assert c.load_failures_total == 1 and c.disk_loads_total == 2   # bad once, a3 once: no retry loop
    with pytest.raises(RequestFailedError, match="'bad' could not be loaded: .*corrupt or truncated"):
        core.add_request(_req("bad-2", [5, 6], "bad"))
    for _ in range(5):
        core.step()
    assert c.disk_loads_total == 2 and not core.registry.loads_in_flight()
    core.remove_adapter("bad")                                  # fixed files: register again and it serves
    core.register_adapter("bad", paths["a2"])
    again = run_to_completion(core, [_req("bad-3", _prompt(1, 7), "bad")])
    assert again["bad-3"].tokens == run_to_completion(resident, [_req("r", _prompt(1, 7), "a2")])["r"].tokens


def test_register_unregister_while_requests_run(env, tmp_path):
    model_dir, paths, resident = env
    core = EngineCore(tiny_engine_args(model_dir, adapters={"a0": paths["a0"]}, max_adapters=2))
    core.add_request(_req("run0", _prompt(1, 10), "a0", max_tokens=20))
    outputs = {}
    for _ in range(3):
        for o in core.step():
            outputs[o.request_id] = o
    for name in ("a1", "a2", "a3"):                             # beyond the free slot: registered, not resident
        core.install_adapter(name, *core.read_adapter(paths[name]), paths[name])
    assert set(core.registry.records) == {"a0", "a1", "a2", "a3"} and len(core.adapters) == 2
    with pytest.raises(AdapterBusyError):
        core.remove_adapter("a0")
    core.remove_adapter("a2")                                   # idle and not resident
    with pytest.raises(AdapterNotFoundError):
        core.add_request(_req("gone", [5, 6], "a2"))
    got = run_to_completion(core, [_req("n3", _prompt(2, 8), "a3"), _req("n1", _prompt(3, 8), "a1")])
    want = run_to_completion(resident, [_req("n3", _prompt(2, 8), "a3"), _req("n1", _prompt(3, 8), "a1")])
    assert got["n3"].tokens == want["n3"].tokens and got["n1"].tokens == want["n1"].tokens
    assert "run0" not in core.requests
    core.remove_adapter("a0")
    assert "a0" not in core.adapters and "a0" not in core.registry.records


def test_engine_serves_cold_adapters_while_loading_and_unloading(env):
    """The async engine: loads happen in worker threads while other requests stream; dynamic load / unload under
    load; every answer equals the all-resident engine's."""
    model_dir, paths, resident = env
    names = list(paths)
    want = run_to_completion(resident, [_req(f"r{i}", _prompt(i, 8), names[i % 5], max_tokens=6) for i in range(10)])

    async def run() -> dict[str, list[int]]:
        engine = Engine.from_args(tiny_engine_args(model_dir, adapters={n: paths[n] for n in names[:4]},
                                                   max_adapters=2, adapter_cache_size=0))
        await engine.start()

        async def one(i: int) -> tuple[str, list[int]]:
            tokens = []
            async for out in engine.generate(_req(f"r{i}", _prompt(i, 8), names[i % 5], max_tokens=6)):
                tokens.extend(t for d in out.deltas for t in d.token_ids)
            return f"r{i}", tokens

        try:
            first = [asyncio.create_task(one(i)) for i in range(10) if names[i % 5] != "a4"]
            info = await engine.load_adapter("a4", paths["a4"])     # registered while the others run
            assert info.name == "a4" and "a4" in {a.name for a in engine.list_adapters()}
            later = [asyncio.create_task(one(i)) for i in range(10) if names[i % 5] == "a4"]
            results = dict(await asyncio.gather(*first, *later))
            await engine.unload_adapter("a3")
            assert "a3" not in {a.name for a in engine.list_adapters()}
            stats = engine.stats()
            assert stats.adapters_registered == 4 and stats.adapters_resident <= 2
            assert stats.adapter_counters.evictions_total > 0
            return results
        finally:
            await engine.shutdown()

    results = asyncio.run(run())
    assert results == {rid: f.tokens[0] for rid, f in want.items()}


def test_scan_adapter_dir(env, tmp_path):
    _, paths, _ = env
    root = Path(paths["a0"]).parent
    assert scan_adapter_dir(root) == {n: paths[n] for n in sorted(paths)}
    (tmp_path / "not-an-adapter").mkdir()
    assert scan_adapter_dir(tmp_path) == {}
    with pytest.raises(ValueError, match="not a directory"):
        scan_adapter_dir(tmp_path / "missing")


def test_adapter_installed_from_memory_survives_eviction_without_cache(env):
    """Weights handed over in memory (no files to re-read) are kept even with the host cache off."""
    model_dir, paths, resident = env
    core = EngineCore(tiny_engine_args(model_dir, adapters={"a0": paths["a0"]}, max_adapters=1,
                                       adapter_cache_size=0))
    core.install_adapter("mem", *core.read_adapter(paths["a4"]))          # path "<memory>", not resident
    got = {}
    for r in (_req("m1", _prompt(6, 9), "mem"), _req("z", _prompt(7, 9), "a0"), _req("m2", _prompt(8, 9), "mem")):
        got.update(run_to_completion(core, [r]))                          # mem, a0, mem: two evictions
    assert core.take_failures() == {} and core.registry.counters.evictions_total >= 2
    want = run_to_completion(resident, [_req("m1", _prompt(6, 9), "a4"), _req("m2", _prompt(8, 9), "a4")])
    assert got["m1"].tokens == want["m1"].tokens and got["m2"].tokens == want["m2"].tokens


def test_preload_fills_the_host_cache_and_serves_like_all_resident(env, tmp_path, caplog):
    """--preload-adapters: the non-resident adapters are in the host cache before the first request (none read
    from disk while serving), outputs equal the all-resident engine's; a broken adapter is skipped with a warning
    and still fails only its own requests; preloading stops where the cache is full."""
    model_dir, paths, resident = env
    adapters = {**paths, "bad": _corrupt(paths["a2"], tmp_path / "bad")}
    with caplog.at_level("WARNING", logger="mtlora_server.engine.adapter_registry"):
        core = EngineCore(tiny_engine_args(model_dir, adapters=adapters, max_adapters=2, preload_adapters=True))
    reg = core.registry
    assert {n for n in adapters if n in reg.cache} == set(paths)          # 2 installed at start, 5 preloaded
    assert "preload skipped adapter bad" in caplog.text and "corrupt or truncated" in caplog.text
    preloaded = reg.counters.disk_loads_total
    reqs = _workload(list(paths), per_adapter=2) + [_req("bad-0", _prompt(1, 7), "bad")]
    got = run_to_completion(core, reqs)
    want = run_to_completion(resident, _workload(list(paths), per_adapter=2))
    assert all(got[rid].tokens == w.tokens for rid, w in want.items())
    assert set(core.take_failures()) == {"bad-0"}
    assert reg.counters.disk_loads_total == preloaded + 1        # only "bad" was read while serving (and failed)

    size = {n: reg.cache.get(n).nbytes for n in paths}
    limit = size["a0"] + size["a1"] + size["a2"] + 1                          # the start-up two, then a2 only
    small = EngineCore(tiny_engine_args(model_dir, adapters=paths, max_adapters=2, preload_adapters=True,
                                        adapter_cache_size=limit))
    assert [n for n in paths if n in small.registry.cache] == ["a0", "a1", "a2"]


def test_preload_without_a_host_cache_reads_nothing(env, caplog):
    model_dir, paths, _ = env
    with caplog.at_level("WARNING", logger="mtlora_server.engine.adapter_registry"):
        core = EngineCore(tiny_engine_args(model_dir, adapters=paths, max_adapters=2, preload_adapters=True,
                                           adapter_cache_size=0))
    assert core.registry.counters.disk_loads_total == 0 and core.registry.cache.bytes == 0
    assert "does nothing without a host cache" in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device (none on this machine)")
def test_seven_adapters_two_slots_under_cuda_graphs_match_all_resident_eager(env):
    """Slot swaps while decode steps replay captured CUDA graphs: the graphs read the slots' buffers, so a swap
    that the graphs did not see (a stale view, a layout key that missed a change) would answer with the wrong
    adapter. Every request must equal the all-resident eager engine on the same GPU (fp32)."""
    model_dir, paths, _ = env
    eager = EngineCore(tiny_engine_args(model_dir, adapters=paths, max_adapters=8, device="cuda",
                                        enforce_eager=True))
    core = EngineCore(tiny_engine_args(model_dir, adapters=paths, max_adapters=2, device="cuda"))
    graphs = core.runner.decode_graphs
    assert graphs is not None and graphs.mode == "cudagraph" and eager.runner.decode_graphs is None
    want = run_to_completion(eager, _workload([None, *paths]))
    got = run_to_completion(core, _workload([None, *paths]))
    assert core.take_failures() == {}
    for rid, w in want.items():
        assert got[rid].finished and got[rid].tokens == w.tokens, rid
        a = torch.tensor([lp.logprob for lp in got[rid].logprobs[0]])
        b = torch.tensor([lp.logprob for lp in w.logprobs[0]])
        torch.testing.assert_close(a, b, atol=1e-3, rtol=0)
    assert core.registry.counters.evictions_total >= NUM_ADAPTERS - 2
    assert len(graphs._graphs) > 0                            # the steps really replayed graphs
