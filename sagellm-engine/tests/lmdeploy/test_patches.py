"""The run-time patches on lmdeploy's real Scheduler, BlockManager and BlockTrie (no model)."""

from __future__ import annotations

import pytest

lmdeploy = pytest.importorskip("lmdeploy", reason="lmdeploy is not installed (nox -s lmdeploy)")
torch = pytest.importorskip("torch")

from lmdeploy.pytorch.config import CacheConfig, SchedulerConfig  # noqa: E402
from lmdeploy.pytorch.messages import SequenceMeta, UpdateTokenMode  # noqa: E402
from lmdeploy.pytorch.paging import prefill_scheduler  # noqa: E402
from lmdeploy.pytorch.paging.block_trie.kv_lifecycle import KVBlockLifecycle  # noqa: E402
from lmdeploy.pytorch.paging.block_trie.trie import BlockTrie  # noqa: E402
from lmdeploy.pytorch.paging.scheduler import Scheduler  # noqa: E402
from lmdeploy.pytorch.strategies.ar.sequence import ARSequenceStrategy  # noqa: E402

from sagellm.core.errors import CapabilityMismatchError  # noqa: E402
from sagellm.engine.runtime.lmdeploy import (  # noqa: E402
    EvictionEvent,
    LMDeployHooks,
    LMDeployKVManager,
    LMDeployPatcher,
    PatchTargetMissingError,
    PrefixMatchEvent,
    PrefixStoreEvent,
    ShortestPromptFirstPolicy,
    UnsupportedLMDeployVersionError,
    patch_statuses,
)
from sagellm.engine.runtime.lmdeploy import patches as patches_mod  # noqa: E402

pytestmark = pytest.mark.skipif(
    not lmdeploy.__version__.startswith("0.18."), reason="these scenarios use 0.18's layout"
)

BS = 16


def make_scheduler(num_gpu_blocks: int = 8) -> Scheduler:
    cc = CacheConfig(
        max_batches=4,
        block_size=BS,
        num_cpu_blocks=0,
        num_gpu_blocks=num_gpu_blocks,
        enable_prefix_caching=True,
    )
    sc = SchedulerConfig(
        max_batches=4, max_session_len=256, max_request_output_len=64, eviction_type="recompute"
    )
    return Scheduler(sc, cc, seq_meta=SequenceMeta(BS, strategy=ARSequenceStrategy()))


def run_prefill(s: Scheduler):
    out = s.schedule(is_prefill=True)
    s.activate_seqs(out.running)
    return out.running


def decode(s: Scheduler, seq, token: int = 7):
    seq.update_token_ids(torch.tensor([token]), mode=UpdateTokenMode.DECODE)
    return s.schedule_running([seq], num_required_tokens=1, prealloc_size=0)


@pytest.fixture
def hooks():
    h = LMDeployHooks()
    p = LMDeployPatcher(h).apply()
    yield h
    p.unpatch()


def test_unpatch_restores_the_exact_originals():
    targets = [
        (BlockTrie, "match"),
        (BlockTrie, "allocate"),
        (KVBlockLifecycle, "evict"),
        (Scheduler, "schedule_running"),
        (prefill_scheduler._PrefillReorderer, "reorder"),
        (prefill_scheduler._PrefillAdmissionAttempt, "run"),
        (prefill_scheduler._TentativePrefixMatch, "commit"),
    ]
    import lmdeploy.pytorch.distributed as ld_dist
    import torch.distributed as dist

    before = [cls.__dict__[name] for cls, name in targets]
    funcs = [ld_dist.all_reduce, dist.all_reduce, ld_dist.DistGroup.__dict__["all_reduce_"]]
    p = LMDeployPatcher().apply()
    assert all(cls.__dict__[n] is not b for (cls, n), b in zip(targets, before))
    assert ld_dist.all_reduce is not funcs[0] and dist.all_reduce is not funcs[1]
    assert ld_dist.all_reduce.__wrapped__ is funcs[0]
    p.unpatch()
    assert all(cls.__dict__[n] is b for (cls, n), b in zip(targets, before))
    assert ld_dist.all_reduce is funcs[0] and dist.all_reduce is funcs[1]
    assert ld_dist.DistGroup.__dict__["all_reduce_"] is funcs[2]
    assert not p.is_applied


def test_second_patcher_is_refused_while_one_is_applied(hooks):
    with pytest.raises(Exception, match="already applied in this process; call its unpatch"):
        LMDeployPatcher().apply()


def test_unknown_version_is_refused_with_the_known_ones():
    with pytest.raises(UnsupportedLMDeployVersionError) as err:
        LMDeployPatcher(version="0.15.2")
    assert str(err.value) == (
        "lmdeploy 0.15.2 is not supported by sageLLM's run-time patches (they know 0.11.x, "
        "0.18.x); install one of those, e.g. `pip install --no-deps lmdeploy==0.18.0`"
    )


def test_moved_target_fails_the_whole_apply(monkeypatch):
    spec = patches_mod.PATCHES[0]
    moved = patches_mod.PatchSpec(spec.name, spec.target + "_gone", spec.series, spec.factory)
    monkeypatch.setattr(patches_mod, "PATCHES", (moved, *patches_mod.PATCHES[1:]))
    original = BlockTrie.__dict__["allocate"]
    with pytest.raises(
        PatchTargetMissingError,
        match=r"prefix.match .*BlockTrie.match_gone\): "
        r"target moved: BlockTrie defines no match_gone",
    ):
        LMDeployPatcher().apply()
    assert BlockTrie.__dict__["allocate"] is original  # nothing left patched


def test_every_patch_applies_to_the_installed_release():
    statuses = patch_statuses()
    assert [s.name for s in statuses if not s.applies] == []
    assert len(statuses) == 21


def test_prefix_hooks_see_match_commit_store_and_lru_eviction(hooks):
    s = make_scheduler()
    a = s.add_session(0).add_sequence(torch.arange(35))
    assert [q.seq_id for q in run_prefill(s)] == [a.seq_id]
    assert decode(s, a) == [True]
    s.end_session(0)
    b = s.add_session(1).add_sequence(torch.arange(40))  # same 32-token prefix
    run_prefill(s)
    assert b.num_history_ids == 32
    blocks_a = (0, 1)
    assert hooks.matches[:2] == [
        PrefixMatchEvent("match", a.seq_id, 0, ()),
        PrefixMatchEvent("commit", a.seq_id, 0, ()),
    ]
    shared = tuple(hooks.stores[0].block_ids[:2])
    assert hooks.matches[2:] == [
        PrefixMatchEvent("match", b.seq_id, 32, shared),
        PrefixMatchEvent("commit", b.seq_id, 32, shared),
    ]
    assert hooks.stores[0] == PrefixStoreEvent(a.seq_id, shared, shared)
    assert len(shared) == len(blocks_a)
    info = LMDeployKVManager(s, hooks).get_block_info()
    assert info["block_tables"][b.seq_id][0][:2] == list(shared)
    assert info["ref_counts"][shared[0]] == 2  # trie + sequence b


def test_trie_eviction_is_reported_to_callbacks(hooks):
    s = make_scheduler(num_gpu_blocks=8)
    kv = LMDeployKVManager(s, hooks)
    seen: list[EvictionEvent] = []
    kv.register_eviction_callback(seen.append)
    a = s.add_session(0).add_sequence(torch.arange(35))
    run_prefill(s)
    decode(s, a)
    s.end_session(0)
    held = kv.get_block_info()["trie_leaves"]
    b = s.add_session(1).add_sequence(torch.arange(100, 200))  # 7 blocks, no shared prefix
    assert [q.seq_id for q in run_prefill(s)] == [b.seq_id]
    assert seen == hooks.evictions
    assert [e.chooser for e in seen] == ["lmdeploy"]
    assert set(held) <= set(seen[0].block_ids)


def test_policy_orders_and_caps_admitted_prefills():
    hooks = LMDeployHooks(scheduling_policy=ShortestPromptFirstPolicy(max_prefills=2))
    with LMDeployPatcher(hooks):
        s = make_scheduler(num_gpu_blocks=16)
        long_ = s.add_session(0).add_sequence(torch.arange(40))
        short = s.add_session(1).add_sequence(torch.arange(1000, 1010))
        mid = s.add_session(2).add_sequence(torch.arange(2000, 2020))
        first = run_prefill(s)
        second = run_prefill(s)
    assert [q.seq_id for q in first] == [short.seq_id, mid.seq_id]
    assert [q.seq_id for q in second] == [long_.seq_id]
    assert hooks.admitted_prefills == [[short.seq_id, mid.seq_id], [long_.seq_id]]


class PreemptFirst(ShortestPromptFirstPolicy):
    def preempt_decodes(self, running):
        return [running[0].seq_id]


def test_policy_preempts_decodes():
    hooks = LMDeployHooks(scheduling_policy=PreemptFirst())
    with LMDeployPatcher(hooks):
        s = make_scheduler(num_gpu_blocks=16)
        a = s.add_session(0).add_sequence(torch.arange(15))
        b = s.add_session(1).add_sequence(torch.arange(100, 115))
        run_prefill(s)
        for seq in (a, b):
            seq.update_token_ids(torch.tensor([7]), mode=UpdateTokenMode.DECODE)
        mask = s.schedule_running([a, b], num_required_tokens=1, prealloc_size=0)
    assert mask == [False, True]
    assert hooks.preempted == [a.seq_id]
    assert a.status.name == "WAITING"


def test_eviction_policy_chooses_the_trie_victims():
    from sagellm.eviction.lru import LRUPolicy

    policy = LRUPolicy()
    hooks = LMDeployHooks(eviction_policy=policy)
    with LMDeployPatcher(hooks):
        s = make_scheduler(num_gpu_blocks=8)
        a = s.add_session(0).add_sequence(torch.arange(35))
        run_prefill(s)
        decode(s, a)
        s.end_session(0)
        stored = hooks.stores[-1].block_ids
        b = s.add_session(1).add_sequence(torch.arange(100, 200))
        assert [q.seq_id for q in run_prefill(s)] == [b.seq_id]
    # b needs 7 of 8 blocks, 6 are free: the policy gives up the deepest leaf only
    assert stored == (0, 1)
    assert hooks.evictions == [EvictionEvent((1,), "policy")]
    assert len(policy) == 7  # block 0 kept, then b stored 6 full blocks (reusing 1)


def test_comm_hooks_record_bytes_per_collective(tmp_path):
    import socket

    import lmdeploy.pytorch.distributed as ld_dist
    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
    try:
        hooks = LMDeployHooks()
        with LMDeployPatcher(hooks):
            x = torch.ones(8, dtype=torch.float32)
            ld_dist.all_reduce(x, group=dist.group.WORLD)
            dist.all_reduce(torch.ones(4, dtype=torch.float64))
            group = ld_dist.DistGroup(gpu_group=dist.group.WORLD)
            group.all_reduce_(torch.ones(2, dtype=torch.float16))
        assert [(e.op, e.num_bytes, e.source) for e in hooks.comm] == [
            ("all_reduce", 32, "lmdeploy"),
            ("all_reduce", 32, "torch"),
            ("all_reduce", 4, "lmdeploy"),
        ]
        assert hooks.comm_totals()["all_reduce"][:2] == (3, 68)
    finally:
        dist.destroy_process_group()


def test_fusion_seam_replaces_fused_all_reduce_rms_norm():
    import lmdeploy.pytorch.distributed as ld_dist

    calls = []

    def fused(inp, residual, weight, eps):
        calls.append((tuple(inp.shape), eps))
        return inp + residual, residual

    hooks = LMDeployHooks(fused_all_reduce_rms_norm=fused)
    with LMDeployPatcher(hooks):
        group = ld_dist.DistGroup()
        out = group.try_fused_all_reduce_residual_rms_norm(
            input=torch.ones(2, 4), residual=torch.ones(2, 4), weight=torch.ones(4), eps=1e-6
        )
    assert calls == [((2, 4), 1e-6)]
    assert torch.equal(out[0], torch.full((2, 4), 2.0))
    assert [(e.op, e.num_bytes, e.source) for e in hooks.comm] == [
        ("all_reduce_rms_norm", 32, "fused")
    ]


def test_runtime_refuses_cpu_with_a_clear_message():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    from sagellm.engine.runtime.lmdeploy.runtime import LMDeployRuntime

    with pytest.raises(CapabilityMismatchError) as err:
        LMDeployRuntime(model="any")
    assert "needs a cuda device" in str(err.value) and "runtime='native', which runs on CPU" in str(
        err.value
    )
