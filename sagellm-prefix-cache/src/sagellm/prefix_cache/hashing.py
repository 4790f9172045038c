"""Block hash functions: the hash of a full block chains its parent's hash.

A block's hash covers ``(parent hash, the block's tokens, isolation key)``, so equal
hashes mean equal whole prefixes (up to collisions, which the indexes rule out by
comparing the stored tokens) and two isolation keys never share a hash space.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable

__all__ = ["ROOT_HASH", "BlockHashFunction", "builtin_block_hash", "sha256_block_hash"]

#: ``f(parent_hash, block_tokens, isolation_key) -> hash`` of one full block.
BlockHashFunction = Callable[[int, tuple[int, ...], str], int]

#: Parent hash of the first block of every sequence.
ROOT_HASH = 0


def builtin_block_hash(parent_hash: int, block_tokens: tuple[int, ...], isolation_key: str) -> int:
    """Python's tuple hash: fastest; string hashing is randomised per process."""
    return hash((parent_hash, block_tokens, isolation_key))


def sha256_block_hash(parent_hash: int, block_tokens: tuple[int, ...], isolation_key: str) -> int:
    """First 8 bytes of SHA-256 over the parent hash, the tokens and the key.

    Stable across processes and machines. Token ids must fit in a signed 64-bit int.
    """
    digest = hashlib.sha256(
        parent_hash.to_bytes(8, "little")
        + array("q", block_tokens).tobytes()
        + isolation_key.encode("utf-8")
    ).digest()
    return int.from_bytes(digest[:8], "little")
