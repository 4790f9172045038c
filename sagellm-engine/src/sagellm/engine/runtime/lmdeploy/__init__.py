"""The patched LMDeploy runtime: lmdeploy's PyTorch engine steered by sageLLM policies.

Patches are applied at run time to the installed lmdeploy (0.11.x, 0.18.x) and undone by
``unpatch()``::

    from sagellm.engine.runtime.lmdeploy import LMDeployHooks, LMDeployPatcher

    hooks = LMDeployHooks(scheduling_policy=ShortestPromptFirstPolicy(max_prefills=2))
    with LMDeployPatcher(hooks):
        ...  # lmdeploy's Scheduler now asks the policy; hooks.matches etc. record
"""

from sagellm.engine.runtime.lmdeploy.hooks import (
    CommEvent,
    EvictionEvent,
    LMDeployHooks,
    LMDeploySchedulingPolicy,
    PrefixMatchEvent,
    PrefixStoreEvent,
    SequenceView,
    ShortestPromptFirstPolicy,
)
from sagellm.engine.runtime.lmdeploy.kv_manager import LMDeployKVManager
from sagellm.engine.runtime.lmdeploy.patches import (
    PATCHES,
    LMDeployPatcher,
    PatchStatus,
    PatchTargetMissingError,
    patch_statuses,
)
from sagellm.engine.runtime.lmdeploy.versions import (
    SUPPORTED_SERIES,
    UnsupportedLMDeployVersionError,
    check_version,
)

__all__ = [
    "PATCHES",
    "SUPPORTED_SERIES",
    "CommEvent",
    "EvictionEvent",
    "LMDeployHooks",
    "LMDeployKVManager",
    "LMDeployPatcher",
    "LMDeploySchedulingPolicy",
    "PatchStatus",
    "PatchTargetMissingError",
    "PrefixMatchEvent",
    "PrefixStoreEvent",
    "SequenceView",
    "ShortestPromptFirstPolicy",
    "UnsupportedLMDeployVersionError",
    "check_version",
    "patch_statuses",
]
