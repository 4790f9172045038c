"""Radix tree over token ids at block granularity (registered as ``radix``).

Anchor: SGLang ``RadixCache``. Every edge holds whole blocks of tokens, children are keyed
by the tokens of their first block, and a lookup that stops inside an edge splits it at
that block boundary, so a match always ends exactly at a node and locking that node locks
exactly the matched blocks. Differences from the anchor: the index never owns KV memory
(it reports the block ids it takes and releases), there is one tree per isolation key,
the eviction order can come from any :class:`~sagellm.core.protocols.EvictionPolicy`,
and ``evict`` never releases more blocks than asked (it trims the tail of a leaf).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import ClassVar

from pydantic import BaseModel

from sagellm.core.protocols import EvictionPolicy
from sagellm.core.types import PrefixEntry, PrefixMatch
from sagellm.prefix_cache._tree import Node, TreePrefixIndex
from sagellm.prefix_cache.config import RadixPrefixIndexConfig
from sagellm.prefix_cache.hashing import ROOT_HASH, builtin_block_hash

__all__ = ["RadixPrefixIndex"]


class RadixPrefixIndex(TreePrefixIndex):
    """Prefix index as a radix tree whose edges are runs of full blocks.

    Built as ``RadixPrefixIndex(RadixPrefixIndexConfig(), block_size=16)``; pass
    ``eviction_policy=`` to let a policy order the evictable leaves (keys are node ids;
    interior and locked nodes are pinned in it). Without one, leaves go in LRU order.
    """

    config_class: ClassVar[type[BaseModel]] = RadixPrefixIndexConfig

    def __init__(
        self,
        config: RadixPrefixIndexConfig | None = None,
        *,
        block_size: int,
        eviction_policy: EvictionPolicy | None = None,
    ) -> None:
        super().__init__(config, block_size=block_size, eviction_policy=eviction_policy)

    # ------------------------------------------------------------------ structure

    def _split(self, child: Node, num_blocks: int) -> Node:
        """Cut ``child``'s edge after ``num_blocks`` blocks; return the new upper node."""
        bs = self._block_size
        parent = child.parent
        assert parent is not None and parent.children is not None
        cut = num_blocks * bs
        upper = Node(
            self._next_id,
            parent,
            child.tokens[:cut],
            child.block_ids[:num_blocks],
            parent.end_length + cut,
            child.isolation_key,
            child.last_access,
        )
        self._next_id += 1
        upper.lock_ref = child.lock_ref  # every lock through child goes through upper
        child.tokens = child.tokens[cut:]
        child.block_ids = child.block_ids[num_blocks:]
        child.parent = upper
        upper.children = {child.tokens[:bs]: child}
        upper.num_children = 1
        parent.children[upper.tokens[:bs]] = upper  # same first block as before
        self._nodes[upper.node_id] = upper
        if self._policy is not None:
            self._policy.insert(
                upper.node_id, cost=float(num_blocks), features=self._features(upper)
            )
            self._policy.pin(upper.node_id)
            upper.pinned = True
        return upper

    def _descend(
        self, root: Node, tokens: tuple[int, ...], n_full: int, block_ids: list[int]
    ) -> tuple[Node, int]:
        """Follow ``tokens`` down from ``root``, splitting an edge where the match stops.

        Appends the matched blocks to ``block_ids``; returns the deepest matched node and
        the number of tokens matched.
        """
        bs = self._block_size
        node = root
        pos = 0
        while pos < n_full:
            children = node.children
            if not children:
                break
            child = children.get(tokens[pos : pos + bs])
            if child is None:
                break
            key = child.tokens
            end = pos + len(key)
            if end <= n_full and tokens[pos:end] == key:
                block_ids.extend(child.block_ids)
                node = child
                pos = end
                continue
            # the edge matches only partly: count its equal blocks (the first one is)
            limit = min(len(key), n_full - pos)
            k = 1
            while (k + 1) * bs <= limit and (
                key[k * bs : (k + 1) * bs] == tokens[pos + k * bs : pos + (k + 1) * bs]
            ):
                k += 1
            upper = self._split(child, k)
            block_ids.extend(upper.block_ids)
            return upper, pos + k * bs
        return node, pos

    def _unlink(self, node: Node) -> None:
        parent = node.parent
        assert parent is not None and parent.children is not None
        del parent.children[node.tokens[: self._block_size]]

    def _trim(self, node: Node, num_blocks: int) -> list[int]:
        keep = len(node.block_ids) - num_blocks
        assert keep > 0 and node.num_children == 0
        dropped = node.block_ids[keep:]
        node.block_ids = node.block_ids[:keep]
        node.tokens = node.tokens[: keep * self._block_size]
        node.end_length -= num_blocks * self._block_size
        self._referenced.difference_update(dropped)
        return dropped[::-1]

    # ------------------------------------------------------------------ protocol

    def match(self, token_ids: Sequence[int], isolation_key: str = "") -> PrefixMatch:
        """Longest cached prefix of ``token_ids`` in full blocks, within ``isolation_key``.

        Splits an edge where the match ends inside it. Counts as an access (the matched
        leaf becomes most recently used). Does not lock.
        """
        t0 = time.perf_counter_ns()
        self._check_key(isolation_key)
        num_query = len(token_ids)
        n_full = num_query - num_query % self._block_size
        root = self._roots.get(isolation_key)
        block_ids: list[int] = []
        if root is None or n_full == 0:
            return self._make_match(t0, num_query, None, block_ids, 0)
        tokens = tuple(token_ids[:n_full])
        node, num_tokens = self._descend(root, tokens, n_full, block_ids)
        return self._make_match(t0, num_query, node, block_ids, num_tokens)

    def insert(
        self, token_ids: Sequence[int], block_ids: Sequence[int], isolation_key: str = ""
    ) -> list[int]:
        """Record that ``block_ids`` hold the full blocks of ``token_ids``.

        Returns the ids the index newly references (the uncached tail, in order). Ids
        given for an already cached prefix are not taken. Raises ValueError when fewer ids
        than full blocks are given or a new id is already referenced by the index.
        """
        self._check_key(isolation_key)
        n_blocks = self._num_full_blocks(token_ids, block_ids)
        if n_blocks == 0:
            return []
        bs = self._block_size
        n_full = n_blocks * bs
        tokens = tuple(token_ids[:n_full])
        root = self._root(isolation_key)
        self._tick += 1
        node, pos = self._descend(root, tokens, n_full, [])
        if pos == n_full:  # all cached already
            self._touch(node)
            return []
        new_ids = [int(b) for b in block_ids[pos // bs : n_blocks]]
        try:
            self._check_new_blocks(new_ids)
        except ValueError:
            if root.num_children == 0:
                self._drop_root(root)
            raise
        leaf = self._add_node(node, tokens[pos:], new_ids, is_leaf=True)
        if node.children is None:
            node.children = {}
        node.children[leaf.tokens[:bs]] = leaf
        return list(new_ids)

    def entries(self) -> Iterator[PrefixEntry]:
        """Every node in depth-first preorder; ``token_hash`` chains the builtin block hash."""
        bs = self._block_size
        for key, root in list(self._roots.items()):
            stack: list[tuple[Node, tuple[int, ...], int]] = [
                (child, (), ROOT_HASH) for child in reversed((root.children or {}).values())
            ]
            while stack:
                node, parent_ids, h = stack.pop()
                ids = parent_ids + tuple(node.block_ids)
                for i in range(0, len(node.tokens), bs):
                    h = builtin_block_hash(h, node.tokens[i : i + bs], key)
                yield PrefixEntry(node.node_id, h, node.end_length, ids, key)
                stack.extend((c, ids, h) for c in reversed((node.children or {}).values()))
