"""tandem: an LLM inference engine built around the prefill/decode split.

A request's path, with the file that owns each arrow:

    LLM.generate / server endpoint          engine/llm.py, server/
      (server: AsyncEngine -> engine process) engine/async_engine.py, core_process.py
      -> InputProcessor                     engine/input_processor.py (tokenize, validate)
      -> Engine.add_request                 engine/engine.py (n x Request)
      -> Scheduler.schedule -> StepPlan     scheduler/scheduler.py, kv_cache/ (pure Python)
      -> ModelRunner.execute                runner/model_runner.py (inputs -> model -> sampler)
           model.forward(ids, positions, attn_metadata)   models/, layers/, kernels/
      -> StepResult -> Scheduler.update     (append tokens, finish, free or cache blocks)
      -> OutputProcessor.process            engine/output_processor.py (detokenize, stops)
      -> RequestOutput                      outputs.py
"""

from importlib import metadata as _metadata

from tandem.assets import default_draft_model_dir, default_model_dir
from tandem.engine.llm import LLM
from tandem.outputs import CompletionOutput, RequestOutput
from tandem.request import SamplingParams

try:
    __version__ = _metadata.version("tandem")
except _metadata.PackageNotFoundError:  # a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__", "LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "default_model_dir",
           "default_draft_model_dir"]
