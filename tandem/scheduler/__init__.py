"""Scheduling: which requests run each step and how many tokens each computes. No torch.

Owns the waiting queue, the running list and every live request's counters; delegates block
bookkeeping to `tandem.kv_cache.KVCacheManager`.

    Engine.add_request -> Scheduler.add_request (waiting queue)
    Engine.step:  Scheduler.schedule() -> StepPlan -> runner -> StepResult
                  -> Scheduler.update(plan, result) -> requests with new tokens / finished
    Engine.abort  -> Scheduler.abort_requests / finish_request (stop strings)

    scheduler.py   Scheduler, SchedulerStats
"""

from tandem.scheduler.scheduler import Scheduler, SchedulerStats

__all__ = ["Scheduler", "SchedulerStats"]
