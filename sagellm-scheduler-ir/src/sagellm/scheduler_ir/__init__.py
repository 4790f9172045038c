"""sagellm.scheduler_ir: continuous-batching schedulers and the execution-plan IR.

Usage::

    from sagellm.core import registry

    scheduler = registry.load("scheduler", "fcfs", {"max_num_batched_tokens": 512},
                              kv_pool=pool, max_model_len=2048)
    scheduler.add_request(request)
    output = scheduler.schedule()          # which tokens of which requests, this step
    plan = scheduler.build_plan(output)    # the IR a runtime executes
    scheduler.update_from_output(output, {"req-0": [42]})

Other policies by name: "priority", "fair", "slo", "adaptive", "pd" (see the README);
``slo`` and ``adaptive`` learn from ``scheduler.observe_step(num_tokens, seconds)``.
"""

from sagellm.scheduler_ir._version import __version__
from sagellm.scheduler_ir.config import (
    AdaptiveSchedulerConfig,
    CostAwareSchedulerConfig,
    FairSchedulerConfig,
    FCFSSchedulerConfig,
    PDSchedulerConfig,
    PrioritySchedulerConfig,
    SLOSchedulerConfig,
)
from sagellm.scheduler_ir.cost import StepCostModel
from sagellm.scheduler_ir.fcfs import FCFSScheduler
from sagellm.scheduler_ir.ir import IRBuilder, IROptimizer, IRValidationError
from sagellm.scheduler_ir.policies import (
    AdaptiveScheduler,
    FairScheduler,
    PDScheduler,
    PriorityScheduler,
    SLOScheduler,
    split_plan,
)

__all__ = [
    "AdaptiveScheduler",
    "AdaptiveSchedulerConfig",
    "CostAwareSchedulerConfig",
    "FCFSScheduler",
    "FairScheduler",
    "FairSchedulerConfig",
    "PDScheduler",
    "PDSchedulerConfig",
    "PriorityScheduler",
    "PrioritySchedulerConfig",
    "SLOScheduler",
    "SLOSchedulerConfig",
    "StepCostModel",
    "split_plan",
    "FCFSSchedulerConfig",
    "IRBuilder",
    "IROptimizer",
    "IRValidationError",
    "__version__",
]
