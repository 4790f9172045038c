"""An approximate prefix index of the texts a router has sent to one worker.

A radix tree over characters: every edge holds a run of characters, every node the
time it was last touched. :meth:`PrefixTree.match` answers how many leading characters
of a text the worker has already seen (the longest common prefix with any text inserted
and not yet evicted). The tree is *approximate* in the sense that it says what the router
sent, not what the worker's KV cache still holds; evicting the least recently used leaves
once the tree is over ``max_chars`` keeps that guess bounded and biased towards what the
worker most likely still caches.
"""

from __future__ import annotations

import heapq
import itertools

__all__ = ["PrefixTree", "common_prefix_len"]


def common_prefix_len(a: str, b: str, start: int = 0) -> int:
    """Length of the common prefix of ``a`` and ``b[start:]``."""
    n = min(len(a), len(b) - start)
    if n <= 0:
        return 0
    if b.startswith(a[:n], start):
        return n
    # binary search on prefix equality (string comparisons run in C)
    lo, hi = 0, n - 1  # a[:lo] matches, a[:hi + 1] does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if b.startswith(a[:mid], start):
            lo = mid
        else:
            hi = mid - 1
    return lo


class _Node:
    __slots__ = ("children", "label", "last_used", "parent")

    def __init__(self, label: str, parent: _Node | None, last_used: int) -> None:
        self.label = label  # characters on the edge from the parent
        self.parent = parent
        self.children: dict[str, _Node] = {}  # first character of the child's label -> child
        self.last_used = last_used


class PrefixTree:
    """Radix tree over characters with least-recently-used eviction.

    ``size`` is the number of characters stored on all edges; after every
    :meth:`insert` it is at most ``max_chars``, or the inserted text's length when that
    is longer (whole leaves are evicted, oldest first, down to 7/8 of ``max_chars``).
    """

    def __init__(self, max_chars: int = 1 << 22) -> None:
        if max_chars < 0:
            raise ValueError("max_chars must be >= 0")
        self.max_chars = max_chars
        self._clock = itertools.count(1)
        self._root = _Node("", None, 0)
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def _walk(self, text: str, touch: int | None) -> tuple[_Node, int, int]:
        """Follow ``text`` down: (last node, characters matched, matched into its edge).

        The third value is how many characters of the last node's label matched; it is
        the whole label unless the match stopped inside that edge.
        """
        node, pos = self._root, 0
        while pos < len(text):
            child = node.children.get(text[pos])
            if child is None:
                break
            k = common_prefix_len(child.label, text, pos)
            pos += k
            if k < len(child.label):  # stopped inside the edge: the caller decides
                return child, pos, k
            if touch is not None:
                child.last_used = touch
            node = child
        return node, pos, len(node.label)

    def match(self, text: str) -> int:
        """Characters of ``text`` matched: its longest common prefix with a stored text.

        Marks the matched path as used (a matched prefix is worth keeping).
        """
        now = next(self._clock)
        node, pos, k = self._walk(text, now)
        if 0 < k < len(node.label):
            node.last_used = now
        return pos

    def peek(self, text: str) -> int:
        """Like :meth:`match`, without touching the LRU order."""
        return self._walk(text, None)[1]

    def insert(self, text: str) -> None:
        """Store ``text`` (marks its path as the most recently used), then evict."""
        now = next(self._clock)
        node, pos, k = self._walk(text, now)
        if k < len(node.label):  # split node's edge after k characters
            parent = node.parent
            assert parent is not None
            upper = _Node(node.label[:k], parent, now)
            parent.children[upper.label[0]] = upper
            node.label = node.label[k:]
            node.parent = upper
            upper.children[node.label[0]] = node
            node = upper
        if pos < len(text):
            leaf = _Node(text[pos:], node, now)
            node.children[leaf.label[0]] = leaf
            self.size += len(leaf.label)
        if self.size > self.max_chars:
            # down to 7/8 of the limit, so a full tree is not scanned on every insert;
            # the text just inserted (stamped ``now``) is kept
            self.evict(self.max_chars - self.max_chars // 8, keep_from=now)

    def evict(self, max_chars: int, *, keep_from: int | None = None) -> None:
        """Remove least recently used leaves until ``size <= max_chars``.

        Leaves used at or after ``keep_from`` (a clock value) stay, even if that leaves
        the tree larger than ``max_chars``.
        """
        if self.size <= max_chars:
            return
        heap: list[tuple[int, int, _Node]] = []
        seq = itertools.count()
        stack = [self._root]
        while stack:
            n = stack.pop()
            if n.children:
                stack.extend(n.children.values())
            elif n is not self._root:
                heap.append((n.last_used, next(seq), n))
        heapq.heapify(heap)
        while self.size > max_chars and heap:
            if keep_from is not None and heap[0][0] >= keep_from:
                break
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            assert parent is not None
            del parent.children[leaf.label[0]]
            self.size -= len(leaf.label)
            if parent is not self._root and not parent.children:
                heapq.heappush(heap, (parent.last_used, next(seq), parent))

    def clear(self) -> None:
        """Forget everything."""
        self._root = _Node("", None, 0)
        self.size = 0
