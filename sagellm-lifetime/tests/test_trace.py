"""The seeded KV access trace and its labels."""

from __future__ import annotations

from collections import Counter

from sagellm.core.types import RequestKind
from sagellm.lifetime import TtlBuckets
from sagellm.lifetime.trace import KVAccess, TraceConfig, generate_trace, label_trace

SMALL = TraceConfig(duration_s=120.0, request_rate=5.0, seed=3)
BUCKETS = TtlBuckets((1.0, 10.0, 60.0, 300.0))


def test_trace_is_seeded_and_time_ordered() -> None:
    a = generate_trace(SMALL)
    assert a == generate_trace(SMALL)
    assert a != generate_trace(TraceConfig(duration_s=120.0, request_rate=5.0, seed=4))
    assert all(x.time <= y.time for x, y in zip(a, a[1:]))
    assert a[0].time >= 0 and a[-1].time < 120.0


def test_features_follow_the_access_history() -> None:
    trace = generate_trace(SMALL)
    seen: dict[str, float] = {}
    count: Counter[str] = Counter()
    for x in trace:
        count[x.key] += 1
        assert x.features["access_count"] == count[x.key]
        prev = seen.get(x.key)
        expected = -1.0 if prev is None else x.time - prev
        assert x.features["seconds_since_last_access"] == expected
        assert x.features["request_kind"] == list(RequestKind).index(x.kind)
        seen[x.key] = x.time
    prefixes = Counter(x.key.split(":")[0] for x in trace)
    assert set(prefixes) == {"sys", "conv", "cmp", "tpl", "fsq", "one"}
    assert all(count[k] == 1 for k in count if k.startswith(("one:", "fsq:")))
    assert max(count[k] for k in count if k.startswith("sys:")) > 50  # shared prompts


def test_labels_are_next_gaps_or_never() -> None:
    f = {"prefix_depth": 1.0}
    trace = [
        KVAccess(0.0, "a", RequestKind.CHAT, "t", f),
        KVAccess(0.5, "b", RequestKind.CHAT, "t", f),
        KVAccess(5.0, "a", RequestKind.CHAT, "t", f),
        KVAccess(100.0, "a", RequestKind.CHAT, "t", f),
        KVAccess(500.0, "c", RequestKind.CHAT, "t", f),
    ]
    # a: 5 s then 95 s then nothing for >= 300 s before the end (700); b: never;
    # c: the trace ends 200 s after it, too soon to know
    assert label_trace(trace, BUCKETS, end=700.0) == [1, 4, 3, 4, None]
