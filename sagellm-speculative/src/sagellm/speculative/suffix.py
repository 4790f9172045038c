"""Suffix-tree drafts over the request's own tokens and recent requests' outputs.

Anchor: SuffixDecoding (Oliaro et al., arXiv 2411.04975): a per-request tree over the
prompt and the output so far, and a global tree over the outputs of recent requests;
the longest suffix of the context found in a tree is extended by its most frequent
continuations, and the tree whose path is more likely wins. Repetitive and agentic
traffic (the same tool calls, templates and answers again and again) is where a global
tree pays. Differences: one path per request rather than a speculation tree (the engine
verifies a chain), and the stored depth is bounded by ``max_tree_depth``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

from sagellm.core.types import DraftRequest, SpeculativeDraft
from sagellm.speculative.config import SuffixConfig

__all__ = ["SuffixProposer", "SuffixTree"]


class _Node:
    __slots__ = ("children", "count")

    def __init__(self) -> None:
        self.children: dict[int, _Node] = {}
        self.count = 0  # occurrences of this node's path among the stored windows


class SuffixTree:
    """Counts every substring of at most ``max_depth`` tokens of the sequences added.

    ``count(path)`` is the number of places where ``path`` occurs in the stored sequences
    (a sequence added twice counts twice); ``remove`` undoes one ``add`` exactly. A tree
    can also grow one token at a time (:meth:`extend`) for a request's live context.

    Usage::

        tree = SuffixTree(max_depth=4)
        tree.add([1, 2, 3, 1, 2, 4])
        tree.count([1, 2])  # 2
        tree.draft([9, 1], num_tokens=2)  # ((2, 3), ...): 2 always follows 1, then 3 or 4
    """

    def __init__(self, max_depth: int) -> None:
        if max_depth < 1:
            raise ValueError(f"max_depth must be at least 1, got {max_depth}")
        self.max_depth = max_depth
        self.root = _Node()
        # (node, depth) of every suffix of the extended sequence shorter than max_depth
        self._active: list[tuple[_Node, int]] = []
        self.num_tokens = 0  # tokens taken by extend() since the last reset_stream()

    # ------------------------------------------------------------------ building

    def add(self, token_ids: Sequence[int]) -> None:
        """Store every window of ``token_ids`` (one more occurrence of each substring)."""
        active: list[tuple[_Node, int]] = []
        for tok in token_ids:
            active = self._push(active, int(tok))

    def extend(self, token_ids: Sequence[int]) -> None:
        """Append ``token_ids`` to the stream this tree is being grown from."""
        for tok in token_ids:
            self._active = self._push(self._active, int(tok))
        self.num_tokens += len(token_ids)

    def _push(self, active: list[tuple[_Node, int]], tok: int) -> list[tuple[_Node, int]]:
        self.root.count += 1
        out = []
        for node, depth in [(self.root, 0), *active]:
            child = node.children.get(tok)
            if child is None:
                child = node.children[tok] = _Node()
            child.count += 1
            if depth + 1 < self.max_depth:
                out.append((child, depth + 1))
        return out

    def remove(self, token_ids: Sequence[int]) -> None:
        """Undo one :meth:`add` of ``token_ids``; raises ValueError when it was not added."""
        tokens = [int(t) for t in token_ids]
        for start in range(len(tokens)):
            if self.count(tokens[start : start + self.max_depth]) <= 0:
                raise ValueError("remove() of a sequence that was not added to this tree")
        for start in range(len(tokens)):
            self.root.count -= 1
            node = self.root
            for tok in tokens[start : start + self.max_depth]:
                child = node.children[tok]
                child.count -= 1
                if child.count == 0:
                    # every descendant counted only occurrences that ran through this one
                    del node.children[tok]
                    break
                node = child

    # ------------------------------------------------------------------ queries

    def _find(self, path: Sequence[int]) -> _Node | None:
        node = self.root
        for tok in path:
            nxt = node.children.get(int(tok))
            if nxt is None:
                return None
            node = nxt
        return node

    def count(self, path: Sequence[int]) -> int:
        """Occurrences of ``path`` (0 when it is absent or longer than ``max_depth``)."""
        if len(path) > self.max_depth:
            return 0
        node = self._find(path)
        return 0 if node is None else node.count

    def match(self, context: Sequence[int], max_len: int, min_len: int = 1) -> tuple[_Node, int]:
        """The node of the longest suffix of ``context`` of ``min_len..max_len`` tokens that
        the tree holds with at least one continuation, and its length; ``(root, 0)`` when
        none."""
        longest = min(max_len, len(context), self.max_depth)
        for n in range(longest, min_len - 1, -1):
            node = self._find(context[len(context) - n :])
            if node is not None and node.children:
                return node, n
        return self.root, 0

    def draft(
        self,
        context: Sequence[int],
        num_tokens: int,
        *,
        min_token_prob: float = 0.0,
        min_match_len: int = 1,
    ) -> tuple[tuple[int, ...], float]:
        """The most frequent continuation of the longest matching suffix of ``context``.

        Each step takes the most frequent child (ties: the smaller token id) while its
        frequency relative to its parent is at least ``min_token_prob``. Returns the
        tokens and a score, the sum of the path's cumulative probabilities (the expected
        number of drafts accepted if the tree's statistics hold).
        """
        if num_tokens <= 0:
            return (), 0.0
        # a match deeper than max_depth - num_tokens leaves no stored room for the draft
        longest = max(min_match_len, self.max_depth - num_tokens)
        node, depth = self.match(context, longest, min_match_len)
        if depth == 0:
            return (), 0.0
        tokens: list[int] = []
        prob = 1.0
        score = 0.0
        while len(tokens) < num_tokens and node.children:
            tok, child = max(node.children.items(), key=lambda kv: (kv[1].count, -kv[0]))
            p = child.count / node.count
            if p < min_token_prob:
                break
            prob *= p
            score += prob
            tokens.append(tok)
            node = child
        return tuple(tokens), score

    def paths(self) -> Iterator[tuple[tuple[int, ...], int]]:
        """Every stored path with its count (depth first, for tests and inspection)."""
        stack: list[tuple[tuple[int, ...], _Node]] = [((), self.root)]
        while stack:
            path, node = stack.pop()
            if path:
                yield path, node.count
            for tok, child in node.children.items():
                stack.append(((*path, tok), child))


class SuffixProposer:
    """Drafts from suffix trees (SuffixDecoding), ``{"method": "suffix", ...}``.

    Each live request has a tree over its prompt and output, grown as tokens arrive; a
    global tree holds the outputs of the last ``max_cached_requests`` finished requests.
    For each request both trees propose and the higher-scoring path is the draft.

    Usage::

        proposer = SuffixProposer(SuffixConfig(num_speculative_tokens=4))
        proposer.observe_finished("a", [1, 2], [7, 8, 9, 10, 11])
        [draft] = proposer.propose([DraftRequest("b", [3, 4], [7, 8], 4)])
        draft.token_ids  # (9, 10, 11): learnt from request "a"
    """

    config_class: ClassVar[type[SuffixConfig]] = SuffixConfig

    def __init__(self, config: SuffixConfig | None = None, **context: Any) -> None:
        self.config = config or SuffixConfig()
        self.global_tree = SuffixTree(self.config.max_tree_depth)
        self._cached: deque[tuple[int, ...]] = deque()
        self._trees: dict[str, SuffixTree] = {}

    @property
    def num_speculative_tokens(self) -> int:
        return self.config.num_speculative_tokens

    def _request_tree(self, req: DraftRequest) -> tuple[SuffixTree, list[int]]:
        context = req.token_ids
        tree = self._trees.get(req.request_id)
        if tree is None or tree.num_tokens > len(context):
            tree = self._trees[req.request_id] = SuffixTree(self.config.max_tree_depth)
        # The newest token is left out: a request tree must propose what follows the
        # context's end, so that end must be matched elsewhere, not against itself.
        upto = len(context) - 1
        if tree.num_tokens < upto:
            tree.extend(context[tree.num_tokens : upto])
        return tree, context

    def propose(self, requests: Sequence[DraftRequest]) -> list[SpeculativeDraft]:
        cfg = self.config
        out = []
        for req in requests:
            k = min(req.num_tokens, cfg.num_speculative_tokens)
            if k <= 0:
                out.append(SpeculativeDraft(req.request_id, ()))
                continue
            tree, context = self._request_tree(req)
            best: tuple[int, ...] = ()
            best_score = 0.0
            for t in (tree, self.global_tree):
                tokens, score = t.draft(
                    context,
                    k,
                    min_token_prob=cfg.min_token_prob,
                    min_match_len=cfg.min_match_len,
                )
                if score > best_score:
                    best, best_score = tokens, score
            out.append(SpeculativeDraft(req.request_id, best))
        return out

    def observe_finished(
        self, request_id: str, prompt_token_ids: Sequence[int], output_token_ids: Sequence[int]
    ) -> None:
        self._trees.pop(request_id, None)
        limit = self.config.max_cached_requests
        if limit == 0 or not output_token_ids:
            return
        output = tuple(int(t) for t in output_token_ids)
        self.global_tree.add(output)
        self._cached.append(output)
        while len(self._cached) > limit:
            self.global_tree.remove(self._cached.popleft())

    @property
    def num_live_requests(self) -> int:
        """Requests that hold a per-request tree."""
        return len(self._trees)
