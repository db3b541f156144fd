"""The model runner: everything with tensors for one step. Owns the model, the paged KV pool
(kv_memory.py), input building (input_batch.py) and the batched sampler (sampler.py).
Receives a `StepPlan`, returns a `StepResult`."""
