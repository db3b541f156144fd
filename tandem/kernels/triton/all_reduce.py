"""One-shot all-reduce (sum) over CUDA IPC buffers, for small messages on 2..8 GPUs of one
host: every rank stages its input in its own IPC buffer, then reads every rank's buffer
over NVLink and sums. One launch, no NCCL, capturable in a CUDA graph. The IPC buffers,
the pointer tables and the host-side checks live in `tandem.distributed.custom_all_reduce`;
the spec is `tandem.kernels.reference.all_reduce.all_reduce_reference`.

Each rank's IPC buffer (same layout on every rank; peers reach it through CUDA IPC):

    | flags (MAX_PROGRAMS, MAX_RANKS) int64 | data buffer 0 (data_bytes) | data buffer 1 |

    flags[p][r] = the last epoch rank r's program p announced to this rank

The message is cut into CHUNK_BYTES chunks, and chunk c always belongs to program
c % max_programs, whatever the dtype and size of the call: a byte of the buffers is always
staged and read by the same program index, so the argument below holds per program. The
grid is at most max_programs <= the SM count, so all programs are resident at once (a
program spins on its peers' same-index program). Program p, with e = its epoch on this
rank (a device counter each call increments by one, so CUDA-graph replays advance it too):

    1. stage   x[its chunks] -> my data buffer (e % 2)              plain stores
    2. signal  debug_barrier; flags[p][me] = e on every rank         release, system scope
    3. wait    flags[p][r] >= e on my flags, for every rank r        acquire, system scope
    4. reduce  debug_barrier; out = sum over r = 0, 1, ... of rank r's buffer (e % 2),
               in float32, in rank order: every rank gets the bitwise-same sum

Memory ordering. A thread's staging stores precede the CTA barrier, which precedes the
release atomic (one thread, system scope, cumulative): a peer whose acquire load reads e
(or more) then sees the whole staged slice, after its own CTA barrier. Only same-program
dependencies exist, so no grid-wide barrier is needed.

Why two data buffers suffice (no end barrier): rank R stages program p's chunks into buffer
e % 2 at epoch e + 2 only after its epoch e + 1 of program p completed, which needed every
peer Q's epoch e + 1 signal for p; Q sends that from a later kernel than its epoch e, and
kernels on one stream run in order, so Q had finished reading R's buffer e % 2 (epoch e).
At epoch e + 1 R writes the other buffer. Hence: all calls of one CustomAllReduce must be
issued on one stream per rank, in the same order and sizes on every rank (as any
collective). Epochs are int64 and never wrap; each rank counts them per program, and since
every rank launches the same grid for the same call, the counts agree.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK_BYTES = 8192  # bytes of the message per chunk; one chunk per program per loop step
MAX_RANKS = 8  # columns of the flag table: the largest world size
NUM_WARPS = 8  # 256 threads: a chunk is 2 x 16-byte vectors per thread per rank
# Every delta and buffer offset is a multiple of 256 bytes (asserted on the host), so of
# 64 elements for any dtype: the hint lets Triton keep 16-byte vector loads on peer memory.
ALIGN_ELEMS = tl.constexpr(64)  # a constexpr: the kernel reads it as a global


@triton.jit
def _one_shot_all_reduce_kernel(
        x_ptr, out_ptr, n,  # (n,) input and output, contiguous
        data_ptr,  # this rank's data buffer 0, typed as x; buffer 1 is at + buf_elems
        data_deltas,  # (WORLD,) int64: rank r's data buffer 0 is at data_ptr + data_deltas[r]
        flag_ptr,  # this rank's flags, (MAX_PROGRAMS, MAX_RANKS) int64
        flag_deltas,  # (WORLD,) int64: rank r's flags are at flag_ptr + flag_deltas[r]
        epoch_ptr,  # (MAX_PROGRAMS,) int64: calls seen by each program on this rank
        buf_elems, rank,
        WORLD: tl.constexpr, MAX_RANKS: tl.constexpr, MAX_PROGRAMS: tl.constexpr,
        BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    num_chunks = tl.cdiv(n, BLOCK)
    cols = tl.arange(0, BLOCK)
    # Only this program touches its counter; every thread loads it, thread 0 stores it
    # back after a barrier (below), so no warp can read the incremented value.
    epoch = tl.load(epoch_ptr + pid) + 1
    shift = tl.multiple_of((epoch % 2) * buf_elems, ALIGN_ELEMS)  # double buffering

    # 1. stage: my chunks of x into my data buffer (epoch % 2)
    mine = data_ptr + shift
    for c in range(pid, num_chunks, MAX_PROGRAMS):
        offs = c * BLOCK + cols
        mask = offs < n
        tl.store(mine + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)
    tl.debug_barrier()  # every thread's staging stores before the release below

    # 2. signal: flags[pid][rank] = epoch on every rank (this one included)
    slot = pid * MAX_RANKS
    for r in tl.static_range(WORLD):
        peer_flags = flag_ptr + tl.load(flag_deltas + r)
        tl.atomic_xchg(peer_flags + slot + rank, epoch, sem="release", scope="sys")

    # 3. wait until every rank has staged this epoch (a later epoch implies this one)
    for r in tl.static_range(WORLD):
        while tl.atomic_add(flag_ptr + slot + r, 0, sem="acquire", scope="sys") < epoch:
            pass
    tl.debug_barrier()  # the acquire (one thread) before every thread's peer loads
    tl.store(epoch_ptr + pid, epoch)  # read by the next call (stream order)

    # 4. reduce: rank 0's slice, + rank 1's, + ... in float32, then one rounding. The
    # loads skip L1 (".cg"): the acquire above already orders them, this just never
    # leans on L1 holding no line of the same buffer from two calls ago.
    for c in range(pid, num_chunks, MAX_PROGRAMS):
        offs = c * BLOCK + cols
        mask = offs < n
        src = data_ptr + tl.multiple_of(tl.load(data_deltas) + shift, ALIGN_ELEMS)
        acc = tl.load(src + offs, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
        for r in tl.static_range(1, WORLD):
            src = data_ptr + tl.multiple_of(tl.load(data_deltas + r) + shift, ALIGN_ELEMS)
            v = tl.load(src + offs, mask=mask, other=0.0, cache_modifier=".cg")
            acc += v.to(tl.float32)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def num_programs(numel: int, element_size: int, max_programs: int) -> int:
    """Grid size for a message: one program per chunk, at most max_programs."""
    return max(1, min(max_programs, triton.cdiv(numel * element_size, CHUNK_BYTES)))


def one_shot_all_reduce(x: torch.Tensor, out: torch.Tensor, data: torch.Tensor,
                        data_deltas: torch.Tensor, flags: torch.Tensor,
                        flag_deltas: torch.Tensor, epochs: torch.Tensor, buf_elems: int,
                        rank: int, max_programs: int) -> None:
    """out = sum over ranks of x, every rank calling with the same shape and dtype.

    x, out: contiguous, same shape and dtype. data: this rank's data buffer 0 viewed as
    x.dtype (buffer 1 follows at + buf_elems elements). data_deltas, flag_deltas: (world,)
    int64 element offsets from `data` / `flags` to each rank's copy. flags:
    (max_programs * MAX_RANKS,) int64. epochs: (max_programs,) int64. No host sync, no
    allocation: safe inside CUDA-graph capture once compiled (run it once eagerly first).
    """
    n = x.numel()
    block = CHUNK_BYTES // x.element_size()
    grid = (num_programs(n, x.element_size(), max_programs),)
    _one_shot_all_reduce_kernel[grid](
        x, out, n, data, data_deltas, flags, flag_deltas, epochs, buf_elems, rank,
        WORLD=data_deltas.numel(), MAX_RANKS=MAX_RANKS, MAX_PROGRAMS=max_programs,
        BLOCK=block, num_warps=NUM_WARPS, num_stages=1)
