"""Prefill/decode disaggregation: the engine's side of the ``kv_transfer`` slot.

A *producer* instance (prefill) computes a prompt, samples its first token and, when the
request asked for it (``kv_transfer_params={"do_remote_decode": true}``), keeps the
prompt's KV blocks and offers them through its channel; the request's output carries
the parameters a decode instance needs (vLLM's ``kv_transfer_params``). A *consumer*
instance (decode) given those parameters allocates local blocks, loads the remote KV
through its channel while other requests keep stepping, then queues the request with the
prompt already computed (:meth:`FCFSScheduler.add_prefilled_request`): only the last
prompt token is computed again, for the logits of the first output token, as vLLM's
disaggregated decode does. A load that fails (the producer died, the lease ran out) falls
back to computing the prompt locally, so a request is never lost to the transfer.

The channel is any implementation of core's ``KVTransferChannel`` found in the
``sagellm.kv_transfer`` group (``torch``, ``mooncake``, ``nixl``), built from
``--kv-transfer-config`` as vLLM spells it::

    sagellm serve --port 8100 --kv-transfer-config \\
        '{"kv_connector": "torch", "kv_role": "kv_producer", "kv_port": 29600}'
    sagellm serve --port 8200 --kv-transfer-config \\
        '{"kv_connector": "torch", "kv_role": "kv_consumer", "kv_ip": "127.0.0.1", "kv_port": 29600}'

A channel joins one producer with one consumer; ``sagellm router --prefill URL --decode
URL`` pairs them in the order given and orchestrates each request (prefill with
``max_tokens=1``, then decode with the returned parameters).
"""

from __future__ import annotations

import hashlib
import logging
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sagellm.core import registry
from sagellm.core.errors import CapabilityMismatchError, ConfigError, InvalidRequestError
from sagellm.core.types import GenerationRequest, TransferPlan
from sagellm.engine.config import json_object

__all__ = [
    "DisaggregationStats",
    "KVTransferHooks",
    "KVTransferSettings",
    "prompt_digest",
]

logger = logging.getLogger(__name__)

#: Blocks per message of the torch channel unless kv_connector_extra_config says otherwise.
TORCH_CHUNK_BLOCKS = 64

#: vLLM's connector names and the channels that play their part here.
CONNECTOR_ALIASES: Mapping[str, str] = {
    "NixlConnector": "nixl",
    "MooncakeConnector": "mooncake",
    "MooncakeConnectorV1": "mooncake",
    "P2pNcclConnector": "torch",
}


class KVTransferSettings(BaseModel):
    """``kv_transfer_config`` as vLLM spells it (the fields this engine uses)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kv_connector: str = "torch"  # channel name in sagellm.kv_transfer (or a vLLM alias)
    kv_role: Literal["kv_producer", "kv_consumer"]
    # producer: where its store listens (port 0: any free one, read back from the channel);
    # consumer: where the producer's store is
    kv_ip: str = "127.0.0.1"
    kv_port: int = Field(0, ge=0, le=65535)
    engine_id: str = ""  # name of this instance in plans ("" : role@address)
    # channel options beside role and address: chunk_blocks, compression, pipeline,
    # lease_s, timeout_s, ... (see the channel's config class)
    kv_connector_extra_config: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def parse(cls, value: str | Mapping[str, Any] | KVTransferSettings) -> KVTransferSettings:
        """From a JSON string (``--kv-transfer-config``) or a mapping; ConfigError if bad."""
        if isinstance(value, KVTransferSettings):
            return value
        value = json_object(
            value,
            "kv_transfer_config",
            '{"kv_connector": "torch", "kv_role": "kv_producer", "kv_port": 29600}',
        )
        if value.get("kv_role") == "kv_both":
            raise ConfigError(
                "kv_role 'kv_both' is not supported: run the prefill instance with "
                "'kv_producer' and the decode instance with 'kv_consumer'"
            )
        try:
            settings = cls.model_validate(value)
        except ValidationError as exc:
            raise ConfigError(f"bad kv_transfer_config: {exc}") from exc
        if settings.kv_role == "kv_consumer" and settings.kv_port == 0:
            raise ConfigError(
                "kv_transfer_config: a kv_consumer needs the producer's kv_ip and kv_port "
                "(the port the producer's kv_transfer_config names)"
            )
        return settings

    @property
    def channel_name(self) -> str:
        return CONNECTOR_ALIASES.get(self.kv_connector, self.kv_connector)

    @property
    def role(self) -> str:
        """``producer`` or ``consumer`` (the channel's spelling)."""
        return "producer" if self.kv_role == "kv_producer" else "consumer"

    def channel_options(self) -> dict[str, Any]:
        host = self.kv_ip if ":" not in self.kv_ip else f"[{self.kv_ip}]"
        options = dict(self.kv_connector_extra_config)
        if self.channel_name == "torch":
            # a prompt's blocks of one layer in one message: gloo's cost per message, not
            # bandwidth, bounds a load (480 tokens of the embedded model, 22 MB in
            # float32: 41 ms in chunks of 8 blocks, 14 ms in one of up to 64)
            options.setdefault("chunk_blocks", TORCH_CHUNK_BLOCKS)
        options.update(role=self.role, address=f"{host}:{self.kv_port}")
        if self.engine_id:
            options["instance_id"] = self.engine_id
        return options


def prompt_digest(token_ids: Sequence[int]) -> str:
    """Hex SHA-256 of token ids (little-endian int64): both instances must hold the same
    prompt, token for token, for the KV of one to be the KV of the other."""
    return hashlib.sha256(struct.pack(f"<{len(token_ids)}q", *token_ids)).hexdigest()


@dataclass(slots=True)
class DisaggregationStats:
    """Counters since the previous ``make_stats()`` (``num_loading`` is a gauge)."""

    num_offers: int = 0  # producer: requests whose KV was offered
    num_offered_tokens: int = 0  # producer
    num_loads: int = 0  # consumer: loads that completed
    num_loaded_tokens: int = 0  # consumer
    num_load_failures: int = 0  # consumer: loads that failed (prompt computed locally)
    load_seconds: float = 0.0  # consumer: summed wall time of completed loads
    num_loading: int = 0  # gauge: loads in flight or waiting for blocks


@dataclass(slots=True)
class _Load:
    """A consumer-side request whose prompt KV is on its way."""

    request: GenerationRequest
    offer: TransferPlan
    num_tokens: int  # prompt positions the load brings
    started: float = field(default_factory=time.monotonic)
    plan: TransferPlan | None = None  # None: still waiting for local blocks
    block_ids: list[int] = field(default_factory=list)


class KVTransferHooks:
    """What :class:`~sagellm.engine.llm_engine.LLMEngine` does for disaggregation.

    Producer: :meth:`offer` when a request that asked for it finishes. Consumer:
    :meth:`start` instead of queueing a request that brings remote KV, then
    :meth:`poll` at every step, which queues each request whose KV has arrived.
    """

    def __init__(
        self,
        settings: KVTransferSettings,
        *,
        kv_pool: Any,
        scheduler: Any,
        prefix_index: Any = None,
    ) -> None:
        self.settings = settings
        self.role = settings.role
        self.pool = kv_pool
        self.scheduler = scheduler
        self.prefix_index = prefix_index
        self.block_size: int = kv_pool.schema.block_size
        if self.role == "consumer" and not callable(
            getattr(scheduler, "add_prefilled_request", None)
        ):
            raise CapabilityMismatchError(
                f"a kv_consumer needs a scheduler that takes prefilled requests "
                f"(add_prefilled_request); {type(scheduler).__name__} does not: use the fcfs "
                "scheduler family"
            )
        if self.role == "producer" and not callable(getattr(scheduler, "get_request", None)):
            raise CapabilityMismatchError(
                f"a kv_producer needs a scheduler that exposes request blocks (get_request); "
                f"{type(scheduler).__name__} does not: use the fcfs scheduler family"
            )
        self.channel = registry.load(
            "kv_transfer", settings.channel_name, settings.channel_options(), pool=kv_pool
        )
        self._loads: dict[str, _Load] = {}  # by the remote request id (the channel's key)
        self._by_local: dict[str, str] = {}  # local request id -> remote request id
        self._dropped: dict[str, _Load] = {}  # aborted while in flight: freed when done
        self._offered: set[str] = set()  # producer: offers the channel still holds
        self._stats = DisaggregationStats()
        self.total = DisaggregationStats()  # since construction

    @property
    def address(self) -> str:
        """``host:port`` of the channel's store (a producer's, for its consumer)."""
        return str(self.channel.address)

    # ------------------------------------------------------------------ requests

    def check_params(self, params: Mapping[str, Any], n: int) -> None:
        """Refuse ``kv_transfer_params`` this instance cannot act on (InvalidRequestError)."""
        if not isinstance(params, Mapping):
            raise InvalidRequestError("kv_transfer_params must be a JSON object")
        if params.get("do_remote_decode") and params.get("do_remote_prefill"):
            raise InvalidRequestError(
                "kv_transfer_params: do_remote_decode and do_remote_prefill are exclusive"
            )
        if params.get("do_remote_decode") and self.role != "producer":
            raise InvalidRequestError(
                "kv_transfer_params asks this instance to offer its KV (do_remote_decode) but "
                "it is a kv_consumer: send the prefill to the kv_producer"
            )
        if params.get("do_remote_prefill") and self.role != "consumer":
            raise InvalidRequestError(
                "kv_transfer_params brings remote KV (do_remote_prefill) but this instance is "
                "a kv_producer: send the decode to the kv_consumer"
            )
        if (params.get("do_remote_decode") or params.get("do_remote_prefill")) and n != 1:
            raise InvalidRequestError(
                f"kv_transfer_params with n={n}: a disaggregated request has one completion"
            )

    def remote_offer(
        self, params: Mapping[str, Any], prompt: Sequence[int]
    ) -> tuple[TransferPlan, int] | None:
        """What a consumer request's ``kv_transfer_params`` offer, and how many prompt
        positions to take from it (None: they bring no KV)."""
        if not params.get("do_remote_prefill"):
            return None
        try:
            block_ids = tuple(int(b) for b in params["remote_block_ids"])
            num_tokens = int(params["num_tokens"])
            remote_id = str(params["remote_request_id"])
            digest = str(params["prompt_sha256"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidRequestError(
                f"kv_transfer_params lacks or misstates {exc}: pass on the kv_transfer_params "
                "object the prefill instance returned, unchanged"
            ) from None
        source = f"{params.get('remote_host', '')}:{params.get('remote_port', '')}"
        if source != self.address:
            raise InvalidRequestError(
                f"the prompt's KV is on the producer at {source}, but this decode instance "
                f"is paired with {self.address}: send the decode to that producer's consumer"
            )
        if not 0 < num_tokens <= len(prompt) or digest != prompt_digest(prompt[:num_tokens]):
            raise InvalidRequestError(
                "kv_transfer_params were computed for another prompt (its token count or "
                "digest differ from this request's): send both instances the same prompt "
                "and model"
            )
        offer = TransferPlan(
            source=source,
            target="",
            block_ids=block_ids,
            total_bytes=int(params.get("total_bytes", 0)),
            request_id=remote_id,
            num_tokens=num_tokens,
        )
        # the last prompt token is computed here again, for the first output's logits
        return offer, min(num_tokens, len(prompt) - 1)

    def start(self, request: GenerationRequest, offer: TransferPlan, num_tokens: int) -> None:
        """Consumer: load ``request``'s prompt KV, then queue it (from :meth:`poll`)."""
        load = _Load(request, offer, num_tokens)
        remote_id = offer.request_id
        if remote_id in self._loads:
            raise InvalidRequestError(
                f"the KV of remote request {remote_id!r} is already being loaded here"
            )
        if load.num_tokens == 0:  # a one-token prompt: nothing worth loading
            self.scheduler.add_request(request)
            return
        self.channel.add_remote_request(load.offer)
        self._loads[remote_id] = load
        self._by_local[request.request_id] = remote_id
        self._begin(load)

    def _begin(self, load: _Load) -> bool:
        """Allocate local blocks and start the load; False while the pool is short."""
        num_blocks = -(-load.offer.num_tokens // self.block_size)
        blocks = self._allocate(num_blocks)
        if blocks is None:
            return False
        rid = load.offer.request_id
        matched = self.channel.get_num_matched_tokens(rid, 0)
        plan = self.channel.update_state_after_alloc(rid, blocks, matched)
        load.block_ids = blocks
        load.plan = plan
        self.channel.start_load(plan)
        return True

    def _allocate(self, num_blocks: int) -> list[int] | None:
        blocks: list[int] | None = self.pool.allocate(num_blocks)
        if blocks is None and self.prefix_index is not None:
            short = num_blocks - self.pool.num_free_blocks
            released = self.prefix_index.evict(short)
            if released:
                self.pool.free(released)
            blocks = self.pool.allocate(num_blocks)
        return blocks

    def abort(self, request_id: str) -> bool:
        """Drop a consumer request still loading; True when it was one. A load in
        flight keeps its blocks until it ends (a later :meth:`poll` frees them)."""
        remote_id = self._by_local.pop(request_id, None)
        if remote_id is None:
            return False
        load = self._loads.pop(remote_id)
        if load.plan is not None:
            self._dropped[remote_id] = load
        return True

    @property
    def busy(self) -> bool:
        """True while the channel holds offers or loads: :meth:`poll` has work even when no
        request runs (leases to reap, aborted loads to free)."""
        return bool(self._offered or self._loads or self._dropped)

    @property
    def num_loading(self) -> int:
        """Requests whose KV is in flight or waits for local blocks."""
        return len(self._loads)

    # ------------------------------------------------------------------ every step

    def poll(self) -> int:
        """Release what the channel is done with; consumer: queue every request whose KV
        has arrived (or, when its load failed, queue it to be computed here). Returns the
        number of requests queued."""
        released, received = self.channel.get_finished()
        self._offered -= released
        for remote_id in received & self._dropped.keys():
            self._free_dropped(self._dropped.pop(remote_id))
        queued = 0
        for remote_id in list(self._loads):
            load = self._loads[remote_id]
            if load.plan is None and not self._begin(load):
                if not self.scheduler.has_unfinished_requests():
                    # nothing will free blocks: compute the prompt here instead
                    self._fail(load, "no free KV blocks to receive it")
                    queued += 1
                continue
            if remote_id not in received:
                continue
            assert load.plan is not None
            try:
                seconds = self.channel.wait(load.plan)
            except Exception as exc:
                self.pool.free(load.block_ids)
                self._fail(load, str(exc))
                queued += 1
                continue
            self._done(load)
            self._count(num_loads=1, num_loaded_tokens=load.num_tokens, load_seconds=seconds)
            queued += 1
        return queued

    def _free_dropped(self, load: _Load) -> None:
        assert load.plan is not None
        try:
            self.channel.wait(load.plan)  # done: returns (or raises) at once
        except Exception:  # the outcome of an aborted load does not matter
            logger.debug("aborted load of %s failed", load.request.request_id, exc_info=True)
        self.pool.free(load.block_ids)

    def _done(self, load: _Load) -> None:
        del self._loads[load.offer.request_id]
        self._by_local.pop(load.request.request_id, None)
        keep = -(-load.num_tokens // self.block_size)
        if keep < len(load.block_ids):  # the load brought the last prompt token's block too
            self.pool.free(load.block_ids[keep:])
        self.scheduler.add_prefilled_request(load.request, load.block_ids[:keep], load.num_tokens)

    def _fail(self, load: _Load, why: str) -> None:
        del self._loads[load.offer.request_id]
        self._by_local.pop(load.request.request_id, None)
        logger.warning(
            "request %s: loading its prompt's KV from %s failed (%s); computing it here",
            load.request.request_id,
            load.offer.source,
            why,
        )
        self._count(num_load_failures=1)
        self.scheduler.add_request(load.request)

    # ------------------------------------------------------------------ producer

    def offer(self, request_id: str, prompt: Sequence[int]) -> dict[str, Any] | None:
        """Producer: keep the prompt's KV of ``request_id`` (called before the scheduler
        frees the request) and return its ``kv_transfer_params``; None when it has no
        computed prompt token."""
        state = self.scheduler.get_request(request_id)
        if state is None:
            return None
        num_tokens = min(int(state.num_computed_tokens), len(prompt))
        if num_tokens <= 0:
            return None
        blocks = [int(b) for b in state.block_ids[: -(-num_tokens // self.block_size)]]
        self.pool.share(blocks)  # the channel's reference, freed when the consumer has them
        try:
            keep, plan = self.channel.request_finished(request_id, blocks, num_tokens)
        except BaseException:
            self.pool.free(blocks)
            raise
        if not keep or plan is None:
            self.pool.free(blocks)
            return None
        host, _, port = self.address.rpartition(":")
        self._offered.add(request_id)
        self._count(num_offers=1, num_offered_tokens=num_tokens)
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": str(self.channel.instance_id),
            "remote_host": host,
            "remote_port": int(port),
            "remote_block_ids": list(plan.block_ids),
            "remote_request_id": request_id,
            "num_tokens": num_tokens,
            "total_bytes": plan.total_bytes,
            "prompt_sha256": prompt_digest(prompt[:num_tokens]),
        }

    # ------------------------------------------------------------------ stats, end

    def _count(self, **deltas: float) -> None:
        for name, value in deltas.items():
            for st in (self._stats, self.total):
                setattr(st, name, getattr(st, name) + value)

    def make_stats(self) -> DisaggregationStats:
        stats, self._stats = self._stats, DisaggregationStats()
        stats.num_loading = len(self._loads)
        return stats

    def close(self) -> None:
        """Drop every load (freeing its blocks) and close the channel (a producer frees
        the blocks it still offers)."""
        for request_id in list(self._by_local):
            self.abort(request_id)
        self.channel.close()  # ends every load still in flight
        for load in self._dropped.values():
            self._free_dropped(load)
        self._dropped.clear()
