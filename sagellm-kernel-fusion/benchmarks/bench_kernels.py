"""asv benchmarks of sagellm.kernel_fusion: each kernel side by side with the eager path it
replaces, in the same class; ``track_*`` methods report the ratio (eager / kernel)."""

from __future__ import annotations

import time

import torch
from torch.nn import functional as F

from sagellm.kernel_fusion.onednn import OneDNNLinear, onednn_available
from sagellm.kernel_fusion.provider import FusedKernels


def _median_ms(fn, repeats: int = 15) -> float:  # type: ignore[no-untyped-def]
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1e3 * times[len(times) // 2]


class PagedDecodeAttention:
    """64 decodes of 100-200 positions, the embedded model's heads (9 query, 3 KV, 64)."""

    timeout = 120

    def setup(self) -> None:
        torch.set_num_threads(2)
        g = torch.Generator().manual_seed(0)
        b, h, hkv, d, bs, nb = 64, 9, 3, 64, 16, 2048
        self.lens = torch.randint(100, 200, (b,), generator=g).to(torch.int32)
        width = int((self.lens.max() + bs - 1) // bs)
        self.tables = torch.randperm(nb, generator=g)[: b * width].view(b, width).to(torch.int32)
        dt = torch.bfloat16
        self.k = torch.randn(nb, bs, hkv, d, generator=g).to(dt)
        self.v = torch.randn(nb, bs, hkv, d, generator=g).to(dt)
        self.q = torch.randn(b, h, d, generator=g).to(dt)
        self.kernel = FusedKernels().get("paged_decode_attention")
        length = int(self.lens.max())
        slots = (self.tables.long().unsqueeze(2) * bs + torch.arange(bs)).view(b, -1)[:, :length]
        allowed = torch.arange(length).unsqueeze(0) < self.lens.unsqueeze(1)
        self.slots = torch.where(allowed, slots, slots[:, :1]).reshape(-1)
        mask = torch.zeros(allowed.shape, dtype=dt).masked_fill_(~allowed, float("-inf"))
        self.mask = mask.view(b, 1, 1, length)
        self.shape = (b, length, hkv, d)

    def _kernel(self) -> None:
        self.kernel(self.q, self.k, self.v, self.tables, self.lens, 0.125)

    def _gather(self) -> None:
        b, length, hkv, d = self.shape
        kb = self.k.view(-1, hkv, d).index_select(0, self.slots).view(b, length, hkv, d)
        vb = self.v.view(-1, hkv, d).index_select(0, self.slots).view(b, length, hkv, d)
        q = self.q.view(b, hkv, -1, d)
        F.scaled_dot_product_attention(
            q, kb.transpose(1, 2), vb.transpose(1, 2), attn_mask=self.mask, scale=0.125
        )

    def time_kernel(self) -> None:
        self._kernel()

    def time_gather_sdpa(self) -> None:
        self._gather()

    def track_speedup_over_gather(self) -> float:
        ratios = []
        for _ in range(3):  # interleaved: A B A B A B
            a = _median_ms(self._gather, 5)
            k = _median_ms(self._kernel, 5)
            ratios.append(a / k)
        ratios.sort()
        return ratios[1]

    track_speedup_over_gather.unit = "x"  # type: ignore[attr-defined]


class DenseLinear:
    """The embedded model's four projections of one layer, bf16, at 1, 16, 64 and 512 rows."""

    params = [1, 16, 64, 512]
    param_names = ["rows"]
    timeout = 120

    def setup(self, rows: int) -> None:
        if not onednn_available(torch.bfloat16):
            raise NotImplementedError("oneDNN bf16 linear unavailable here")
        torch.set_num_threads(2)
        g = torch.Generator().manual_seed(0)
        shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
        self.plain = [torch.randn(n, k, generator=g).to(torch.bfloat16) for n, k in shapes]
        self.layers = []
        for w in self.plain:
            layer = torch.nn.Module()
            layer.weight = torch.nn.Parameter(w.clone(), requires_grad=False)
            layer.bias = None
            method = OneDNNLinear()
            method.process_weights(layer)
            self.layers.append((method, layer))
        self.x = [torch.randn(rows, k, generator=g).to(torch.bfloat16) for _, k in shapes]

    def _onednn(self) -> None:
        for (method, layer), x in zip(self.layers, self.x):
            method.apply(layer, x)

    def _f_linear(self) -> None:
        for w, x in zip(self.plain, self.x):
            F.linear(x, w)

    def time_onednn(self, rows: int) -> None:
        self._onednn()

    def time_f_linear(self, rows: int) -> None:
        self._f_linear()

    def track_speedup_over_f_linear(self, rows: int) -> float:
        ratios = []
        for _ in range(3):
            a = _median_ms(self._f_linear, 7)
            b = _median_ms(self._onednn, 7)
            ratios.append(a / b)
        ratios.sort()
        return ratios[1]

    track_speedup_over_f_linear.unit = "x"  # type: ignore[attr-defined]
