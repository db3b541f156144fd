"""Distributed execution: how the ranks of a tensor-parallel group talk.

    parallel.py           ParallelContext: a rank's place in the group; all_reduce after
                          row-parallel layers, all_gather of vocab-parallel logits
    custom_all_reduce.py  CustomAllReduce: one-shot all-reduce of small CUDA messages over
                          CUDA IPC buffers (NVLink), for decode; NCCL takes the rest

Nothing is imported here, so `import tandem.distributed.<module>` costs only that module.
"""
