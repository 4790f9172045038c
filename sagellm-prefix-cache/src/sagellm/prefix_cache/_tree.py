"""What both indexes share: a tree of cached blocks with locks and leaf-first eviction.

The radix index stores several blocks per node (one edge), the block-hash index one block
per node; both are trees rooted at one root per isolation key, and everything that does
not depend on how a node is found lives here: lock references propagated to ancestors,
leaf-first eviction (LRU by default, or in the order of an injected
:class:`~sagellm.core.protocols.EvictionPolicy`), ``clear``, stats.

Recency is tracked lazily: a lookup stamps only the deepest node of its path, and a node
that loses a child folds the child's stamp into its own. A node's true last access (the
latest lookup that went through it) is therefore the maximum over its subtree, which is
exactly the node's own stamp by the time it becomes a leaf and can be evicted.
"""

from __future__ import annotations

import heapq
import time
import zlib
from collections.abc import Iterable, Sequence
from typing import ClassVar

from pydantic import BaseModel

from sagellm.core.errors import ConfigError
from sagellm.core.protocols import EvictionPolicy
from sagellm.core.telemetry import PrefixCacheStats
from sagellm.core.types import PrefixEntry, PrefixMatch
from sagellm.prefix_cache.config import PrefixIndexConfig
from sagellm.prefix_cache.errors import PrefixLockError, StalePrefixMatchError
from sagellm.prefix_cache.latency import LatencyReservoir

__all__ = ["Node", "PrefixHandle", "TreePrefixIndex"]


class Node:
    """One cached run of full blocks (radix: an edge; block hash: a single block)."""

    __slots__ = (
        "alive",
        "block_hash",
        "block_ids",
        "children",
        "end_length",
        "isolation_key",
        "last_access",
        "lock_ref",
        "node_id",
        "num_children",
        "parent",
        "pinned",
        "tokens",
    )

    def __init__(
        self,
        node_id: int,
        parent: Node | None,
        tokens: tuple[int, ...],
        block_ids: list[int],
        end_length: int,
        isolation_key: str,
        last_access: int = 0,
    ) -> None:
        self.node_id = node_id  # entry id reported by entries(); key given to a policy
        self.parent = parent  # None for a root
        self.tokens = tokens  # the tokens of this node's blocks, a multiple of block_size
        self.block_ids = block_ids  # pool blocks holding them, one per block
        self.end_length = end_length  # tokens from the sequence start to this node's end
        self.isolation_key = isolation_key
        self.children: dict[tuple[int, ...], Node] | None = None  # radix only
        self.num_children = 0
        self.lock_ref = 0  # locks of this node or of any descendant
        self.last_access = last_access  # logical time stamp (lazy, see module docstring)
        self.alive = True  # False once evicted or cleared
        self.pinned = False  # pin state mirrored in the eviction policy
        self.block_hash = 0  # chained hash of the node's last block (block-hash index)

    def __repr__(self) -> str:
        return (
            f"Node(id={self.node_id}, blocks={self.block_ids}, end={self.end_length}, "
            f"lock_ref={self.lock_ref}, children={self.num_children})"
        )


class PrefixHandle:
    """Opaque :attr:`PrefixMatch.handle`: the deepest matched node and the match length."""

    __slots__ = ("node", "num_tokens", "owner")

    def __init__(self, owner: object, node: Node, num_tokens: int) -> None:
        self.owner = owner
        self.node = node
        self.num_tokens = num_tokens

    def __repr__(self) -> str:
        return f"PrefixHandle(node={self.node.node_id}, num_tokens={self.num_tokens})"


class TreePrefixIndex:
    """Base of the tree-shaped prefix indexes; subclasses implement match and insert."""

    config_class: ClassVar[type[BaseModel]] = PrefixIndexConfig

    def __init__(
        self,
        config: PrefixIndexConfig | None = None,
        *,
        block_size: int,
        eviction_policy: EvictionPolicy | None = None,
    ) -> None:
        if config is None:
            config = self.config_class()  # type: ignore[assignment]
        if not isinstance(config, self.config_class):
            raise ConfigError(
                f"{type(self).__name__} takes a {self.config_class.__name__}, "
                f"got {type(config).__name__}"
            )
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ConfigError(
                f"block_size must be a positive int (tokens per KV block), got {block_size!r}"
            )
        if eviction_policy is not None and not isinstance(eviction_policy, EvictionPolicy):
            raise ConfigError(
                "eviction_policy must implement sagellm.core.protocols.EvictionPolicy "
                "(config_class, insert, access, remove, pin, unpin, evict, __contains__, "
                f"__len__, make_stats); got {type(eviction_policy).__name__}"
            )
        self.config = config
        self._block_size = block_size
        self._policy = eviction_policy
        self._tenant_hashes: dict[str, float] = {}  # isolation key -> tenant_hash feature
        self._owner = object()  # identifies handles made by this index
        self._roots: dict[str, Node] = {}
        self._nodes: dict[int, Node] = {}  # every non-root node by id, creation order
        self._referenced: set[int] = set()  # block ids the index holds
        self._next_id = 1  # 0 is every root's id
        self._tick = 0  # logical clock: +1 per match or insert
        self._heap: list[tuple[int, int, Node]] = []  # (stamp, id, node), lazily invalidated
        self._latency = LatencyReservoir(config.latency_reservoir_size, config.latency_seed)
        self._reset_counters()

    # ------------------------------------------------------------------ properties

    @property
    def block_size(self) -> int:
        """Tokens per block; matches are multiples of it."""
        return self._block_size

    @property
    def num_cached_blocks(self) -> int:
        """Blocks the index references."""
        return len(self._referenced)

    @property
    def num_nodes(self) -> int:
        """Cached nodes (entries), roots excluded."""
        return len(self._nodes)

    @property
    def eviction_policy(self) -> EvictionPolicy | None:
        """The policy ordering victims, or None for the built-in LRU."""
        return self._policy

    # ------------------------------------------------------------------ helpers for subclasses

    @staticmethod
    def _check_key(isolation_key: object) -> None:
        if not isinstance(isolation_key, str):
            raise ValueError(
                "isolation_key must be a str (GenerationRequest.isolation_key), "
                f"got {type(isolation_key).__name__}"
            )

    def _root(self, isolation_key: str) -> Node:
        root = self._roots.get(isolation_key)
        if root is None:
            root = Node(0, None, (), [], 0, isolation_key)
            self._roots[isolation_key] = root
        return root

    def _drop_root(self, root: Node) -> None:
        """A root lost its last child: forget it (tenants come and go)."""
        del self._roots[root.isolation_key]

    def _check_new_blocks(self, new_ids: Sequence[int]) -> None:
        """Refuse to take a block twice: a pool block holds one prefix position."""
        seen: set[int] = set()
        for bid in new_ids:
            if bid in self._referenced:
                raise ValueError(
                    f"block {bid} is already referenced by this prefix index for another "
                    "prefix; a KV block holds one prefix position, pass a fresh block id"
                )
            if bid in seen:
                raise ValueError(f"block {bid} appears twice in block_ids; pass distinct ids")
            seen.add(bid)

    def _num_full_blocks(self, token_ids: Sequence[int], block_ids: Sequence[int]) -> int:
        n = len(token_ids) // self._block_size
        if len(block_ids) < n:
            raise ValueError(
                f"insert got {len(block_ids)} block ids for {n} full blocks of "
                f"{len(token_ids)} tokens (block_size {self._block_size}); pass one block id "
                "per full block (ids of a trailing partial block are ignored)"
            )
        return n

    def _add_node(
        self, parent: Node, tokens: tuple[int, ...], block_ids: list[int], is_leaf: bool
    ) -> Node:
        """Create a child of ``parent`` stamped now; the caller links it in the structure."""
        node = Node(
            self._next_id,
            parent,
            tokens,
            block_ids,
            parent.end_length + len(tokens),
            parent.isolation_key,
            self._tick,
        )
        self._next_id += 1
        self._nodes[node.node_id] = node
        self._referenced.update(block_ids)
        parent.num_children += 1
        if parent.parent is not None and parent.num_children == 1:
            self._sync_pin(parent)
        if self._policy is not None:
            self._policy.insert(
                node.node_id, cost=float(len(block_ids)), features=self._features(node)
            )
            if not is_leaf:
                self._policy.pin(node.node_id)
                node.pinned = True
        elif is_leaf:
            heapq.heappush(self._heap, (node.last_access, node.node_id, node))
        return node

    def _touch(self, node: Node) -> None:
        """Stamp the deepest node of a lookup or insert path."""
        node.last_access = self._tick
        if self._policy is None and node.num_children == 0 and node.lock_ref == 0:
            heapq.heappush(self._heap, (node.last_access, node.node_id, node))
            if len(self._heap) > 2 * len(self._nodes) + 1024:
                self._rebuild_heap()

    def _touch_policy_path(self, node: Node) -> None:
        """A policy sees an access of every node the lookup went through."""
        policy = self._policy
        assert policy is not None
        while node.parent is not None:
            policy.access(node.node_id, features=self._features(node))
            node = node.parent

    def _features(self, node: Node) -> dict[str, float]:
        """What the index tells a policy about a node: the lifetime features it knows and
        the node's size in blocks (a policy may rank per block)."""
        key = node.isolation_key
        tenant = self._tenant_hashes.get(key)
        if tenant is None:
            # stable across processes, unlike hash() of a string
            tenant = self._tenant_hashes[key] = float(zlib.crc32(key.encode()))
        return {
            "prefix_depth": float(node.end_length),
            "num_blocks": float(len(node.block_ids)),
            "tenant_hash": tenant,
        }

    def _sync_pin(self, node: Node) -> None:
        """Keep the policy's pin equal to "not an evictable leaf" (interior or locked)."""
        if self._policy is None:
            return
        want = node.num_children > 0 or node.lock_ref > 0
        if want != node.pinned:
            if want:
                self._policy.pin(node.node_id)
            else:
                self._policy.unpin(node.node_id)
            node.pinned = want

    def _rebuild_heap(self) -> None:
        self._heap = [
            (n.last_access, n.node_id, n)
            for n in self._nodes.values()
            if n.num_children == 0 and n.lock_ref == 0
        ]
        heapq.heapify(self._heap)

    def _make_match(
        self, t0: int, num_query: int, node: Node | None, block_ids: list[int], num_tokens: int
    ) -> PrefixMatch:
        """Count the lookup and build its result (``node`` is the deepest matched node)."""
        handle = None
        if num_tokens:
            assert node is not None
            self._tick += 1
            self._touch(node)
            if self._policy is not None:
                self._touch_policy_path(node)
            handle = PrefixHandle(self._owner, node, num_tokens)
            self._num_hits += 1
        self._num_lookups += 1
        self._num_query_tokens += num_query
        self._num_matched_tokens += num_tokens
        match = PrefixMatch(tuple(block_ids), num_tokens, num_query, handle)
        self._latency.add(time.perf_counter_ns() - t0)
        return match

    # subclass hooks -------------------------------------------------------------

    def _unlink(self, node: Node) -> None:
        """Remove ``node`` from the lookup structure (its parent's children or a table)."""
        raise NotImplementedError

    def _trim(self, node: Node, num_blocks: int) -> list[int]:
        """Drop the last ``num_blocks`` blocks of a multi-block leaf; return them."""
        raise NotImplementedError

    # ------------------------------------------------------------------ locking

    def _handle_node(self, match: PrefixMatch) -> Node | None:
        handle = match.handle
        if handle is None:
            if match.num_tokens:
                raise StalePrefixMatchError(
                    "this PrefixMatch reports cached tokens but has no handle: it was not "
                    "made by this index; lock the result of this index's match()"
                )
            return None
        if not isinstance(handle, PrefixHandle) or handle.owner is not self._owner:
            raise StalePrefixMatchError(
                "this PrefixMatch comes from another prefix index; lock and unlock it on "
                "the index whose match() produced it"
            )
        node = handle.node
        if not node.alive or node.end_length != handle.num_tokens:
            raise StalePrefixMatchError(
                f"this PrefixMatch is stale: its {handle.num_tokens} tokens are no longer "
                "all cached (evicted or cleared after the lookup); call match() again and "
                "lock() before evicting"
            )
        return node

    def lock(self, match: PrefixMatch) -> None:
        """Protect the matched blocks (and every ancestor) from eviction until unlock.

        A miss (no handle) is a no-op. Raises StalePrefixMatchError when the matched blocks
        were evicted since the lookup or the match comes from another index.
        """
        node = self._handle_node(match)
        while node is not None and node.parent is not None:
            node.lock_ref += 1
            if node.lock_ref == 1:
                self._sync_pin(node)
            node = node.parent

    def unlock(self, match: PrefixMatch) -> None:
        """Undo one :meth:`lock` of the same match.

        Raises PrefixLockError when the match is not locked.
        """
        node = self._handle_node(match)
        if node is None:
            return
        if node.lock_ref == 0:
            raise PrefixLockError(
                f"unlock() of a match of {match.num_tokens} tokens that is not locked; "
                "call unlock() once per lock()"
            )
        while node.parent is not None:
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._sync_pin(node)
                if self._policy is None and node.num_children == 0:
                    heapq.heappush(self._heap, (node.last_access, node.node_id, node))
            node = node.parent

    # ------------------------------------------------------------------ eviction

    def _next_victim(self) -> Node | None:
        if self._policy is None:
            heap = self._heap
            while heap:
                stamp, _, node = heapq.heappop(heap)
                if (
                    node.alive
                    and node.num_children == 0
                    and node.lock_ref == 0
                    and node.last_access == stamp
                ):
                    return node
            return None
        decision = self._policy.evict(1)
        if not decision.victims:
            return None
        key = decision.victims[0]
        victim = self._nodes.get(key)
        if victim is None or victim.num_children or victim.lock_ref:
            raise ConfigError(
                f"eviction policy {type(self._policy).__name__} returned {key!r}, which is "
                "not an unpinned key of this index; a policy must only return held, "
                "unpinned keys"
            )
        victim.pinned = False
        return victim

    def _remove_leaf(self, node: Node) -> list[int]:
        """Drop an evictable leaf; its parent may become a leaf in turn."""
        self._unlink(node)
        node.alive = False
        del self._nodes[node.node_id]
        self._referenced.difference_update(node.block_ids)
        parent = node.parent
        assert parent is not None
        parent.num_children -= 1
        if node.last_access > parent.last_access:
            parent.last_access = node.last_access
        if parent.parent is None:
            if parent.num_children == 0:
                self._drop_root(parent)
        elif parent.num_children == 0:
            self._sync_pin(parent)
            if self._policy is None and parent.lock_ref == 0:
                heapq.heappush(self._heap, (parent.last_access, parent.node_id, parent))
        return node.block_ids[::-1]

    def evict(self, num_blocks: int) -> list[int]:
        """Drop up to ``num_blocks`` unlocked blocks, leaves first; return their ids.

        Victims are whole leaves in LRU order of their last access (or in the order of
        the eviction policy); when fewer blocks are needed than a multi-block leaf holds,
        only its last blocks go. Ids come deepest block first. The caller releases the
        index's pool reference of every returned block.
        """
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 0:
            raise ValueError(f"num_blocks must be a non-negative int, got {num_blocks!r}")
        released: list[int] = []
        while len(released) < num_blocks:
            node = self._next_victim()
            if node is None:
                break
            need = num_blocks - len(released)
            if len(node.block_ids) <= need:
                released.extend(self._remove_leaf(node))
            else:
                released.extend(self._trim(node, need))
                # still cached: give it back to whoever orders victims
                if self._policy is not None:
                    self._policy.insert(
                        node.node_id, cost=float(len(node.block_ids)), features=self._features(node)
                    )
                else:
                    heapq.heappush(self._heap, (node.last_access, node.node_id, node))
        self._num_evicted_blocks += len(released)
        return released

    def clear(self) -> list[int]:
        """Drop every unlocked entry; return the released block ids (creation order).

        Locked paths stay (their ancestors are locked too, so the tree stays connected).
        """
        victims = [n for n in self._nodes.values() if n.lock_ref == 0]
        released: list[int] = []
        for node in victims:
            self._unlink(node)
            node.alive = False
            del self._nodes[node.node_id]
            released.extend(node.block_ids)
            parent = node.parent
            assert parent is not None
            parent.num_children -= 1
            if self._policy is not None:
                self._policy.remove(node.node_id)
        self._referenced.difference_update(released)
        for root in list(self._roots.values()):
            if root.num_children == 0:
                self._drop_root(root)
        for node in self._nodes.values():  # locked survivors may have lost children
            self._sync_pin(node)
        self._rebuild_heap()
        return released

    # ------------------------------------------------------------------ inspection

    def _reset_counters(self) -> None:
        self._num_lookups = 0
        self._num_hits = 0
        self._num_query_tokens = 0
        self._num_matched_tokens = 0
        self._num_evicted_blocks = 0
        self._latency.reset()

    def make_stats(self) -> PrefixCacheStats:
        """Counters since the previous snapshot (then reset) and the cached-block gauge."""
        stats = PrefixCacheStats(
            num_lookups=self._num_lookups,
            num_hits=self._num_hits,
            num_query_tokens=self._num_query_tokens,
            num_matched_tokens=self._num_matched_tokens,
            num_evicted_blocks=self._num_evicted_blocks,
            num_cached_blocks=self.num_cached_blocks,
            lookup_p50_us=self._latency.percentile_us(0.5),
            lookup_p99_us=self._latency.percentile_us(0.99),
        )
        self._reset_counters()
        return stats

    def entries(self) -> Iterable[PrefixEntry]:
        """Every cached node as a PrefixEntry (whole path's blocks from the start)."""
        raise NotImplementedError

    def lock_ref(self, match: PrefixMatch) -> int:
        """Locks currently held on the deepest node of ``match`` (0 for a miss)."""
        node = self._handle_node(match)
        return 0 if node is None else node.lock_ref

    def _debug_check(self) -> None:
        """Assert the structural invariants (tests call it after every operation)."""
        seen: set[int] = set()
        for node in self._nodes.values():
            assert node.alive
            parent = node.parent
            assert parent is not None and (parent.alive or parent.parent is None)
            assert len(node.tokens) == len(node.block_ids) * self._block_size
            assert node.end_length == parent.end_length + len(node.tokens)
            assert node.lock_ref >= 0
            assert node.lock_ref <= parent.lock_ref or parent.parent is None
            for bid in node.block_ids:
                assert bid not in seen, f"block {bid} referenced twice"
                seen.add(bid)
        assert seen == self._referenced
        children: dict[int, list[Node]] = {}
        for node in self._nodes.values():
            assert node.parent is not None
            children.setdefault(id(node.parent), []).append(node)
        for node in list(self._nodes.values()) + list(self._roots.values()):
            kids = children.get(id(node), [])
            assert node.num_children == len(kids)
            if node.parent is not None:
                # own locks plus every descendant's: at least the children's sum
                assert node.lock_ref >= sum(k.lock_ref for k in kids)
        for root in self._roots.values():
            assert root.num_children > 0 and root.lock_ref == 0

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(block_size={self._block_size}, "
            f"num_cached_blocks={self.num_cached_blocks}, num_nodes={len(self._nodes)})"
        )
