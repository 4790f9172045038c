"""The shared PrefixIndex conformance suite of sagellm.core.testing, for both indexes."""

from __future__ import annotations

import pytest

from sagellm.prefix_cache import (
    BlockHashPrefixIndex,
    BlockHashPrefixIndexConfig,
    RadixPrefixIndex,
    RadixPrefixIndexConfig,
)

testing = pytest.importorskip("sagellm.core.testing")
PrefixIndexConformance = getattr(testing, "PrefixIndexConformance", None)
if PrefixIndexConformance is None:
    pytest.skip("sagellm.core.testing has no PrefixIndexConformance", allow_module_level=True)


class TestRadixConformance(PrefixIndexConformance):  # type: ignore[misc, valid-type]
    def make_index(self, block_size: int) -> RadixPrefixIndex:
        return RadixPrefixIndex(RadixPrefixIndexConfig(), block_size=block_size)


class TestBlockHashConformance(PrefixIndexConformance):  # type: ignore[misc, valid-type]
    def make_index(self, block_size: int) -> BlockHashPrefixIndex:
        return BlockHashPrefixIndex(BlockHashPrefixIndexConfig(), block_size=block_size)
