"""Compiled decode (decode_graphs.py): static-shape decode steps at bucketed batch sizes give the eager forward's
logits (fp32 <= 1e-5) at bucket edges, with mixed adapters, and with adapters loaded and unloaded between
compiled steps; padding rows never touch a real KV slot; greedy tokens through EngineCore are the same with
enforce_eager True and False. The static BGMV adapter op equals the stacked-layout reference (molora_stacked)."""

from __future__ import annotations

import pytest
import torch
from molora_stacked import molora_reference
from torch._dynamo.utils import counters

from mtlora.base import load_config
from mtlora.config import AdapterConfig
from mtlora.errors import ConfigError
from mtlora.reference import random_adapter_tensors
from mtlora.testing import make_tiny_model_dir
from mtlora_server.engine.core import EngineCore
from mtlora_server.engine.decode_graphs import (DecodeGraphs, batch_buckets, bgmv_delta, context_bucket,
                                                resolve_mode)
from mtlora_server.engine.kv_cache import KVCachePool
from mtlora_server.engine.lora_ops import SITES, AdapterSlots
from mtlora_server.engine.model import LlamaDecoder
from mtlora_server.engine.runner import ModelRunner
from mtlora_server.engine.scheduler import Chunk, Sequence
from mtlora_server.engine.testing import TINY_ADAPTERS, run_to_completion, tiny_engine_args, write_tiny_adapters
from mtlora_server.engine.types import GenerationRequest, SamplingParams

MAX_SEQS = 5                       # buckets 1, 2, 4, 5
BLOCK = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("compiled") / "model", seed=3)


class Rig:
    """A model, KV pool and adapter slots with the tiny adapters loaded in slots 0..4, an eager runner and a
    DecodeGraphs over the same state."""

    def __init__(self, model_dir, mode: str, dtype=torch.float32):
        self.hf = load_config(model_dir)
        self.model = LlamaDecoder.from_dir(model_dir, dtype, "cpu", max_len=256)
        c = self.model.cfg
        self.pool = KVCachePool(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, 64, BLOCK, dtype)
        self.slots = AdapterSlots(self.hf, 6, 8, 4, 4, dtype, "cpu")
        for slot, name in enumerate(TINY_ADAPTERS):
            self.load(slot, name, seed=slot)
        self.eager = ModelRunner(self.model, self.pool, self.slots, torch.device("cpu"))
        self.graphs = DecodeGraphs(self.model, self.pool, self.slots, MAX_SEQS, 256, mode)
        self.seqs: list[Sequence] = []

    def load(self, slot: int, name: str, seed: int) -> None:
        cfg = AdapterConfig(**TINY_ADAPTERS[name])
        self.slots.load(slot, cfg, random_adapter_tensors(cfg, self.hf, seed=seed, scale=0.3))

    def prefill(self, lengths: list[int], slots: list[int]) -> None:
        """Add sequences (prompt lengths, adapter slots) and prefill them eagerly."""
        gen = torch.Generator().manual_seed(len(self.seqs))
        new = []
        for n, slot in zip(lengths, slots):
            ids = torch.randint(3, 250, (n,), generator=gen).tolist()
            seq = Sequence(len(self.seqs), ids, n, adapter_slot=slot)
            seq.blocks = self.pool.allocate(self.pool.blocks_for(n + 16))
            self.seqs.append(seq)
            new.append(seq)
        self.eager.run([Chunk(s, 0, s.num_tokens) for s in new], [[s.num_tokens - 1] for s in new])
        for s in new:
            s.token_ids.append(int(s.seq_id) + 7)           # the "sampled" token the next decode reads

    def decode_both(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        """Eager and graph logits of one decode step over `seqs` (both write the same K/V slots)."""
        chunks = [Chunk(s, s.num_tokens - 1, 1) for s in seqs]
        wanted = [[c.start] for c in chunks]
        eager = self.eager.run(chunks, wanted)
        with torch.inference_mode():
            got = self.graphs.run(chunks, wanted)
        assert got is not None, "a decode step that fits a bucket must be served by the graphs"
        for s in seqs:
            s.token_ids.append(int(eager[seqs.index(s)].argmax()))
        return eager, got


def test_buckets():
    assert batch_buckets(1) == [1] and batch_buckets(5) == [1, 2, 4, 5] and batch_buckets(64)[-1] == 64
    assert [context_bucket(n, 1000) for n in (1, 64, 65, 600, 999)] == [64, 64, 128, 1000, 1000]


def test_bgmv_matches_reference(tiny):
    rig = Rig(tiny, "static")
    rig.slots.clear(3)                                                  # a cleared slot: zero delta
    gen = torch.Generator().manual_seed(0)
    for layer in range(rig.model.cfg.num_hidden_layers):
        for site in SITES:
            bufs = rig.slots.buffers(layer, site)
            if bufs is None:
                continue
            slot_idx = torch.tensor([0, 1, 2, 3, 4, -1, 4, 0, 2])      # mixed, base, unused-at-site and cleared
            x = torch.randn(len(slot_idx), bufs[0].shape[2], generator=gen)
            used = rig.slots.used(layer, site)
            eff = torch.where((slot_idx >= 0) & used[slot_idx.clamp_min(0)], slot_idx, -1)
            want = molora_reference(x, eff, *bufs)
            r, N, G = rig.slots.layout().get((layer, site), (1, 1, 1))
            A, B, R, mask, groups, scaling = bufs
            site_t = (A[:, :r], B[:, :N, :r], R[:, :G, :N], mask[:, :N], groups, scaling, used)
            got = bgmv_delta(x, slot_idx.clamp_min(0), slot_idx >= 0, site_t)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)   # |delta| up to ~10 here


@pytest.mark.parametrize("mode", ["static", "compile"])
def test_graph_logits_equal_eager_at_bucket_edges(tiny, mode):
    rig = Rig(tiny, mode)
    rig.prefill([3, 9, 14, 5, 22], [0, -1, 3, 4, 1])                    # mixed adapters and a base row
    sizes = [1, 2, 3, 4, 5] if mode == "static" else [2, 3]            # compile: one bucket and its next size
    for n in sizes:
        for _ in range(2):
            eager, got = rig.decode_both(rig.seqs[:n])
            torch.testing.assert_close(got, eager, atol=1e-5, rtol=0)
    if mode == "compile":                                               # dynamo really compiled (fullgraph)
        assert counters["stats"]["unique_graphs"] >= 2 and not counters["graph_break"]


def test_padding_rows_write_only_the_scratch_slot(tiny):
    rig = Rig(tiny, "static")
    rig.prefill([6, 7, 3], [0, 2, -1])
    before_k, before_v = rig.pool.k.clone(), rig.pool.v.clone()
    chunks = [Chunk(s, s.num_tokens - 1, 1) for s in rig.seqs]          # 3 rows: bucket 4, one padding row
    with torch.inference_mode():
        rig.graphs.run(chunks, [[c.start] for c in chunks])
    written = {s.blocks[c.start // BLOCK] * BLOCK + c.start % BLOCK for s, c in zip(rig.seqs, chunks)}
    changed = ((rig.pool.k != before_k) | (rig.pool.v != before_v)).flatten(0, 1).any(0).any(-1)   # [slots]
    assert set(changed.nonzero().flatten().tolist()) <= written | {rig.pool.scratch_slot}
    assert changed[sorted(written)].all()


@pytest.mark.parametrize("mode", ["static", "compile"])
def test_adapters_loaded_and_unloaded_between_steps(tiny, mode):
    rig = Rig(tiny, mode)
    rig.prefill([4, 8, 11], [0, 1, 4])
    seqs = rig.seqs
    eager, got = rig.decode_both(seqs)
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=0)
    rig.slots.clear(1)                                                  # unload: row 1 becomes base-only
    eager, got = rig.decode_both(seqs)
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=0)
    rig.load(1, "hydra", seed=9)                                        # a different adapter in the same slot
    rig.load(4, "mt_ffn", seed=10)
    eager, got = rig.decode_both(seqs)
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=0)
    for slot in range(5):                                               # nothing loaded: every site idle
        rig.slots.clear(slot)
    eager, got = rig.decode_both(seqs)
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=0)


def test_bf16_graph_logits_close_to_eager(tiny):
    rig = Rig(tiny, "static", dtype=torch.bfloat16)
    rig.prefill([5, 9, 12], [2, -1, 0])
    eager, got = rig.decode_both(rig.seqs)
    torch.testing.assert_close(got, eager, atol=3e-2, rtol=3e-2)


def test_steps_the_graphs_do_not_serve_fall_back():
    class _Seq:
        adapter_slot, blocks, token_ids = -1, [0], [1, 2]

    class _Stub(DecodeGraphs):
        def __init__(self):                                             # only the routing checks of run()
            self.buckets, self.max_len = [1, 2], 8

    g, s = _Stub(), _Seq()
    assert g.run([Chunk(s, 0, 2)], [[1]]) is None                       # a prefill chunk
    assert g.run([Chunk(s, 1, 1)], [[0, 1]]) is None                    # logits beyond the decode position
    assert g.run([Chunk(s, 1, 1)] * 3, [[1]] * 3) is None               # more rows than the largest bucket
    assert g.run([Chunk(s, 8, 1)], [[8]]) is None                       # context beyond max_len


@pytest.mark.parametrize("mode", ["static", "compile"])
def test_engine_greedy_tokens_same_with_and_without_graphs(tiny, tmp_path, mode):
    paths = write_tiny_adapters(tmp_path, load_config(tiny))
    names = [None, "mt_ffn", "hydra", "lora", "mt_both", None]
    if mode == "compile":               # fewer variants to compile: the static run covers base rows in the mix
        names = ["mt_ffn", "hydra", "lora", "mt_both"]
    results = {}
    for eager in (True, False):
        core = EngineCore(tiny_engine_args(tiny, adapters=paths, max_num_seqs=2, enforce_eager=eager,
                                           decode_graphs=mode))
        assert (core.runner.decode_graphs is None) == eager
        reqs = [GenerationRequest(f"r{i}", torch.randint(3, 250, (4 + 3 * i,), generator=torch.Generator()
                                                         .manual_seed(i)).tolist(),
                                  SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True), adapter=name)
                for i, name in enumerate(names)]
        results[eager] = {k: v.tokens for k, v in run_to_completion(core, reqs).items()}
    assert results[True] == results[False]


def test_mode_resolution():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_mode("auto", cuda, False, False) == "cudagraph"
    assert resolve_mode("auto", cpu, False, False) is None                     # measured: eager is faster on CPU
    assert resolve_mode("compile", cpu, False, False) == "compile"
    assert resolve_mode("compile", cpu, True, False) is None                   # --enforce-eager wins
    assert resolve_mode("cudagraph", cuda, False, True) is None                # batch-invariant runs eager
    with pytest.raises(ConfigError, match="decode_graphs"):
        resolve_mode("cudagraph", cpu, False, False)
    with pytest.raises(ConfigError, match="decode_graphs"):
        tiny_engine_args("x", decode_graphs="fast")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device (none on this machine)")
def test_cuda_graph_logits_equal_eager(tiny):
    rig = Rig(tiny, "static")
    cuda = torch.device("cuda")
    rig.model = LlamaDecoder.from_dir(tiny, torch.float32, cuda, max_len=256)
    c = rig.model.cfg
    rig.pool = KVCachePool(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, 64, BLOCK, torch.float32, cuda)
    rig.slots = AdapterSlots(rig.hf, 6, 8, 4, 4, torch.float32, cuda)
    for slot, name in enumerate(TINY_ADAPTERS):
        rig.load(slot, name, seed=slot)
    rig.eager = ModelRunner(rig.model, rig.pool, rig.slots, cuda)
    rig.graphs = DecodeGraphs(rig.model, rig.pool, rig.slots, MAX_SEQS, 256, "cudagraph")
    rig.prefill([3, 9, 14, 5, 22], [0, -1, 3, 4, 1])
    for n in (1, 2, 3, 4, 5):
        eager, got = rig.decode_both(rig.seqs[:n])
        torch.testing.assert_close(got.cpu(), eager.cpu(), atol=1e-4, rtol=0)
    rig.slots.clear(0)
    rig.load(0, "lora", seed=12)
    eager, got = rig.decode_both(rig.seqs)
    torch.testing.assert_close(got.cpu(), eager.cpu(), atol=1e-4, rtol=0)
