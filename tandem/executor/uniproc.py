"""`UniProcExecutor`: the model runner in the engine's process, called directly."""

from __future__ import annotations

from tandem.config import EngineConfig
from tandem.executor.base import Executor
from tandem.outputs import StepPlan, StepResult
from tandem.runner.model_runner import Launched, ModelRunner


class UniProcExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        self.runner = ModelRunner(config)
        self.runner.init_kv_cache(self.runner.available_kv_blocks())
        self.device, self.dtype = self.runner.device, self.runner.dtype
        self.num_blocks, self.block_bytes = self.runner.num_blocks, self.runner.block_bytes
        self.spec_costs = self.runner.profile_spec_costs()

    def launch(self, plan: StepPlan) -> Launched:
        return self.runner.launch(plan)

    def collect(self, handle: Launched) -> StepResult:
        return self.runner.collect(handle)
