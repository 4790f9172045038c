"""Hash-chained full-block index (registered as ``block_hash``).

Anchor: vLLM v1 automatic prefix caching (``hash_block_tokens``: a block's hash covers
its parent's hash, its tokens and extra keys such as the cache salt; a table from hash
to cached block). Differences: the table is per isolation key (tenant and cache salt)
and the key also enters every hash; each entry keeps its tokens and its parent, and a hit
counts only when both are equal, so a hash collision is a miss, never a wrong prefix;
eviction is leaf-first (a block goes only after every block that extends it), LRU among
leaves unless an eviction policy is given.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import ClassVar

from pydantic import BaseModel

from sagellm.core.protocols import EvictionPolicy
from sagellm.core.types import PrefixEntry, PrefixMatch
from sagellm.prefix_cache._tree import Node, TreePrefixIndex
from sagellm.prefix_cache.config import BlockHashPrefixIndexConfig
from sagellm.prefix_cache.hashing import (
    ROOT_HASH,
    BlockHashFunction,
    builtin_block_hash,
    sha256_block_hash,
)

__all__ = ["BlockHashPrefixIndex"]


class BlockHashPrefixIndex(TreePrefixIndex):
    """Prefix index as a table from chained block hashes to cached blocks.

    Built as ``BlockHashPrefixIndex(BlockHashPrefixIndexConfig(), block_size=16)``.
    ``hash_function=`` replaces the configured hash (tests inject colliding ones); it is
    called as ``f(parent_hash, block_tokens, isolation_key)``.
    """

    config_class: ClassVar[type[BaseModel]] = BlockHashPrefixIndexConfig

    def __init__(
        self,
        config: BlockHashPrefixIndexConfig | None = None,
        *,
        block_size: int,
        eviction_policy: EvictionPolicy | None = None,
        hash_function: BlockHashFunction | None = None,
    ) -> None:
        super().__init__(config, block_size=block_size, eviction_policy=eviction_policy)
        if hash_function is None:
            algorithm = self.config.hash_algorithm  # type: ignore[attr-defined]
            hash_function = sha256_block_hash if algorithm == "sha256" else builtin_block_hash
        self._hash = hash_function
        self._tables: dict[str, dict[int, Node]] = {}
        self._num_collisions = 0

    @property
    def num_collisions(self) -> int:
        """Lookups or inserts that met a hash already used by different content."""
        return self._num_collisions

    # ------------------------------------------------------------------ structure

    def _drop_root(self, root: Node) -> None:
        super()._drop_root(root)
        del self._tables[root.isolation_key]

    def _unlink(self, node: Node) -> None:
        del self._tables[node.isolation_key][node.block_hash]

    def _trim(self, node: Node, num_blocks: int) -> list[int]:  # pragma: no cover
        raise AssertionError("block-hash nodes hold one block; they are never trimmed")

    def _walk(
        self, table: dict[int, Node], root: Node, tokens: tuple[int, ...], n_full: int, key: str
    ) -> tuple[Node, int, int, Node | None, int]:
        """Follow the hash chain: (deepest node, tokens matched, its hash, blocker, next hash).

        ``blocker`` is the entry that sits on the next block's hash with other content (a
        collision), or None when the next hash is free or everything matched.
        """
        bs = self._block_size
        hash_fn = self._hash
        inline = hash_fn is builtin_block_hash  # same value, without a call per block
        node = root
        h = ROOT_HASH
        pos = 0
        while pos < n_full:
            block = tokens[pos : pos + bs]
            nh = hash((h, block, key)) if inline else hash_fn(h, block, key)
            child = table.get(nh)
            if child is None:
                return node, pos, h, None, nh
            if child.parent is not node or child.tokens != block:
                self._num_collisions += 1
                return node, pos, h, child, nh
            node = child
            h = nh
            pos += bs
        return node, pos, h, None, h

    # ------------------------------------------------------------------ protocol

    def match(self, token_ids: Sequence[int], isolation_key: str = "") -> PrefixMatch:
        """Longest cached prefix of ``token_ids`` in full blocks, within ``isolation_key``.

        A block counts only when its stored tokens and parent equal the query's. Counts as
        an access (the deepest matched block becomes most recently used). Does not lock.
        """
        t0 = time.perf_counter_ns()
        self._check_key(isolation_key)
        num_query = len(token_ids)
        n_full = num_query - num_query % self._block_size
        table = self._tables.get(isolation_key)
        if table is None or n_full == 0:
            return self._make_match(t0, num_query, None, [], 0)
        root = self._roots[isolation_key]
        tokens = tuple(token_ids[:n_full])
        node, pos, _, _, _ = self._walk(table, root, tokens, n_full, isolation_key)
        block_ids: list[int] = []
        walker = node
        while walker.parent is not None:
            block_ids.append(walker.block_ids[0])
            walker = walker.parent
        block_ids.reverse()
        return self._make_match(t0, num_query, node, block_ids, pos)

    def insert(
        self, token_ids: Sequence[int], block_ids: Sequence[int], isolation_key: str = ""
    ) -> list[int]:
        """Record that ``block_ids`` hold the full blocks of ``token_ids``.

        Returns the ids the index newly references, in order. Ids given for an already
        cached prefix are not taken. A block whose hash is taken by other content (a
        collision) is not cached, nor is anything after it in this sequence. Raises
        ValueError when fewer ids than full blocks are given or a new id is already
        referenced by the index.
        """
        self._check_key(isolation_key)
        n_blocks = self._num_full_blocks(token_ids, block_ids)
        if n_blocks == 0:
            return []
        bs = self._block_size
        n_full = n_blocks * bs
        tokens = tuple(token_ids[:n_full])
        root = self._root(isolation_key)
        table = self._tables.setdefault(isolation_key, {})
        self._tick += 1
        node, pos, _, blocker, nh = self._walk(table, root, tokens, n_full, isolation_key)
        if pos == n_full or blocker is not None:
            if node is not root:
                self._touch(node)
            elif root.num_children == 0:
                self._drop_root(root)
            return []
        first = pos // bs
        candidate_ids = [int(b) for b in block_ids[first:n_blocks]]
        try:
            self._check_new_blocks(candidate_ids)
        except ValueError:
            if root.num_children == 0:
                self._drop_root(root)
            raise
        # Hashes of the new blocks; stop before one that collides with a cached entry.
        hashes = [nh]
        h = nh
        for i in range(first + 1, n_blocks):
            h = self._hash(h, tokens[i * bs : (i + 1) * bs], isolation_key)
            if h in table or h in hashes:
                self._num_collisions += 1
                break
            hashes.append(h)
        new_ids = candidate_ids[: len(hashes)]
        last = len(hashes) - 1
        for j, (bid, bh) in enumerate(zip(new_ids, hashes)):
            i = first + j
            child = self._add_node(node, tokens[i * bs : (i + 1) * bs], [bid], j == last)
            child.block_hash = bh
            table[bh] = child
            node = child
        return new_ids

    def entries(self) -> Iterator[PrefixEntry]:
        """Every cached block; ``token_hash`` is its chained block hash."""
        for key, table in list(self._tables.items()):
            paths: dict[int, tuple[int, ...]] = {}
            for node in list(table.values()):  # a parent is always inserted before a child
                parent = node.parent
                assert parent is not None
                ids = paths.get(parent.node_id, ()) + (node.block_ids[0],)
                paths[node.node_id] = ids
                yield PrefixEntry(node.node_id, node.block_hash, node.end_length, ids, key)
