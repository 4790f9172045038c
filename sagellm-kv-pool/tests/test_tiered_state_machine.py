"""Property test: blocks keep their content and ids stay unique across tier moves."""

from __future__ import annotations

import shutil
import tempfile

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sagellm.core.types import KVCacheSchema
from sagellm.kv_pool.config import DiskTierConfig, PagedKVPoolConfig, TieredKVStoreConfig
from sagellm.kv_pool.disk import DiskBlockStore
from sagellm.kv_pool.paged import PagedKVPool
from sagellm.kv_pool.tiered import TieredKVStore

SCHEMA = KVCacheSchema(num_layers=2, num_kv_heads=1, head_dim=2, block_size=2)
SIZES = {"device": 6, "host": 4, "disk": 4}
TIERS = ("device", "host", "disk")


class TierMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="sagellm-kv-test-")
        config = TieredKVStoreConfig(
            device=PagedKVPoolConfig(num_blocks=SIZES["device"]),
            host=PagedKVPoolConfig(num_blocks=SIZES["host"]),
            disk=DiskTierConfig(num_blocks=SIZES["disk"], directory=self.dir),
            quotas={"t": 4},
        )
        self.store = TieredKVStore(config, schema=SCHEMA)
        self.entries: list[list[object]] = []  # [tier, block id, tag] per live block
        self.next_tag = 1

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def content(self, tier: str, block_id: int) -> np.ndarray:
        alloc = self.store.tier(tier)
        if isinstance(alloc, PagedKVPool):
            return alloc.storage[:, :, block_id].reshape(-1).numpy().copy()
        assert isinstance(alloc, DiskBlockStore)
        buf = np.empty((1, SCHEMA.bytes_per_block), dtype=np.uint8)
        alloc.read_blocks([block_id], buf)
        return buf.view(np.float32).reshape(-1)

    @rule(n=st.integers(1, 3), tenant=st.sampled_from(["", "t"]))
    def allocate(self, n: int, tenant: str) -> None:
        before = self.store.num_free_blocks
        usage = self.store.usage().get("t", 0)
        ids = self.store.allocate(n, tenant=tenant)
        if n > before or (tenant == "t" and usage + n > 4):
            assert ids is None
            return
        assert ids is not None
        for b in ids:
            assert all(not (e[0] == "device" and e[1] == b) for e in self.entries)
            self.store.device_pool.storage[:, :, b] = float(self.next_tag)
            self.entries.append(["device", b, self.next_tag])
            self.next_tag += 1

    @precondition(lambda self: bool(self.entries))
    @rule(data=st.data())
    def move(self, data: st.DataObject) -> None:
        tier = data.draw(st.sampled_from(sorted({str(e[0]) for e in self.entries})))
        mine = [e for e in self.entries if e[0] == tier]
        picked = data.draw(st.lists(st.sampled_from(mine), min_size=1, max_size=3, unique_by=id))
        ids = [e[1] for e in picked]
        dst = data.draw(st.sampled_from([t for t in TIERS if t != tier]))
        if TIERS.index(dst) > TIERS.index(tier):
            r = self.store.demote(ids, src_tier=tier, dst_tier=dst)
        else:
            r = self.store.promote(ids, src_tier=tier, dst_tier=dst)
        if r is not None:
            assert r.plan.block_ids == tuple(ids)
            for e, new_id in zip(picked, r.plan.dst_block_ids):
                e[0] = dst
                e[1] = new_id

    @precondition(lambda self: bool(self.entries))
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.entries) - 1))
        tier, b, _tag = self.entries.pop(i)
        self.store.free(tier, [b])

    @rule(tier=st.sampled_from(TIERS))
    def defragment(self, tier: str) -> None:
        mapping = self.store.defragment(tier)
        for e in self.entries:
            if e[0] == tier:
                e[1] = mapping.get(e[1], e[1])  # type: ignore[call-overload]
        used = sorted(e[1] for e in self.entries if e[0] == tier)  # type: ignore[type-var]
        assert used == list(range(len(used)))

    @invariant()
    def content_and_ids(self) -> None:
        for tier in TIERS:
            mine = [e[1] for e in self.entries if e[0] == tier]
            assert len(mine) == len(set(mine))
            assert self.store.tier(tier).num_used_blocks == len(mine)
        for tier, b, tag in self.entries:
            assert (self.content(tier, b) == float(tag)).all(), (tier, b, tag)  # type: ignore[arg-type]
        charged = sum(
            1
            for tier, b, _ in self.entries
            if tier == "device" and self.store.block_info(b).tenant_id == "t"  # type: ignore[arg-type]
        )
        assert self.store.usage().get("t", 0) == charged


TestTierMachine = TierMachine.TestCase
TestTierMachine.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)
