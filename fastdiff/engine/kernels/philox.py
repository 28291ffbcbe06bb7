"""Counter-based Gaussian noise: Philox-4x32-10 keyed by (seed, global element index, step, stream).

Noise for element g at step k is a pure function of (seed, g, k, stream), so it does not depend
on the block size, the launch grid, graph capture, or how a batch is split across calls
(invariant 3 of docs/design.md). One Philox call yields four 32-bit words, turned into four normals
by two Box-Muller pairs: element g takes word g % 4 of the call with counter
(g // 4, k, stream). Using all four words makes the generator cost a quarter of one call per
element, which keeps the noisy steps memory-bound.

Uniforms are (w >> 9 + 0.5) * 2**-23, exact in float32 and never 0 or 1, so log() is finite;
the tails are therefore cut at |z| = sqrt(2 * 24 ln 2) ~ 5.77.

The file holds the Triton device functions (used inside the step kernels: ``normal_block`` for
a block of consecutive indices, ``normal_at`` for any indices, e.g. a shard's), a standalone
launcher that fills a tensor with noise, and a plain-torch implementation producing the same
32-bit words bit for bit (the normals agree to float32 rounding of log/cos/sin).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ... import _ext
from ..backend import resolve
from ..checks import check_int

# Streams separate independent uses of one seed.
STREAM_STEP = 0
STREAM_INIT = 1
# The step and the stream are 32-bit counter words; both backends take them from [0, 2**31), which
# Triton passes as int32 (a Python int at or above 2**31 would be specialised as a wider type).
COUNTER_MAX = 2**31

_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_ROUNDS = 10
_M32 = 0xFFFFFFFF
_TWO_PI = 6.283185307179586

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - exercised on platforms without triton
    triton = None
    tl = None


if triton is not None:

    @triton.jit
    def philox4(seed, c0, c1, c2, c3):
        """Philox-4x32-10 on uint32 counter blocks; ``seed`` is a 64-bit scalar key."""
        seed = seed.to(tl.uint64)
        k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
        k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
        for _ in tl.static_range(10):
            _c0 = c0
            _c2 = c2
            c0 = tl.umulhi(0xCD9E8D57, _c2) ^ c1 ^ k0
            c2 = tl.umulhi(0xD2511F53, _c0) ^ c3 ^ k1
            c1 = _c2 * 0xCD9E8D57
            c3 = _c0 * 0xD2511F53
            k0 = k0 + 0x9E3779B9
            k1 = k1 + 0xBB67AE85
        return c0, c1, c2, c3

    @triton.jit
    def _uniform(w):
        # 23 random bits + 0.5, times 2**-23: exact in float32, strictly inside (0, 1).
        return ((w >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07

    @triton.jit
    def _words(seed, q, step, stream):
        """The four Philox words of the groups ``q`` (int64 group indices) at (step, stream)."""
        c0 = (q & 0xFFFFFFFF).to(tl.uint32)
        c1 = ((q >> 32) & 0xFFFFFFFF).to(tl.uint32)
        zero = c0 * 0
        c2 = zero + step.to(tl.uint32)
        c3 = zero + stream
        return philox4(seed, c0, c1, c2, c3)

    @triton.jit
    def normal_block(seed, g0, step, stream, BLOCK: tl.constexpr):
        """Normals for global element indices g0 .. g0 + BLOCK - 1; g0 must be a multiple of 4."""
        q = (g0 // 4) + tl.arange(0, BLOCK // 4).to(tl.int64)
        w0, w1, w2, w3 = _words(seed, q, step, stream)
        r01 = tl.sqrt(-2.0 * tl.log(_uniform(w0)))
        r23 = tl.sqrt(-2.0 * tl.log(_uniform(w2)))
        th01 = 6.283185307179586 * _uniform(w1)
        th23 = 6.283185307179586 * _uniform(w3)
        n0 = r01 * tl.cos(th01)
        n1 = r01 * tl.sin(th01)
        n2 = r23 * tl.cos(th23)
        n3 = r23 * tl.sin(th23)
        # join stacks on a new last axis: z[q, j, i] = (n0, n2)[j] if i == 0 else (n1, n3)[j], so the
        # row-major flattening puts word j of call q at element 4q + j.
        z = tl.join(tl.join(n0, n2), tl.join(n1, n3))
        return tl.reshape(z, (BLOCK,))

    @triton.jit
    def normal_at(seed, g, step, stream):
        """The normals ``normal_block`` gives elements ``g`` (any int64 indices >= 0, e.g. a slice
        of a larger tensor): word g % 4 of the call with counter (g // 4, step, stream), through the
        same operations, so the bits are the same. One Philox call per element: 4x the work."""
        q = g // 4
        lane = g % 4
        w0, w1, w2, w3 = _words(seed, q, step, stream)
        first_pair = lane < 2
        r = tl.sqrt(-2.0 * tl.log(_uniform(tl.where(first_pair, w0, w2))))
        th = 6.283185307179586 * _uniform(tl.where(first_pair, w1, w3))
        return tl.where(lane % 2 == 0, r * tl.cos(th), r * tl.sin(th))

    # A Python int equal to 1 would be specialised into a constexpr, which has no .to():
    # keep step and stream runtime values (triton-lang/triton#2939).
    @triton.jit(do_not_specialize=["step", "stream"])
    def _randn_kernel(out_ptr, seed_ptr, n, g_base, step, stream, BLOCK: tl.constexpr, SHIFT: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        seed = tl.load(seed_ptr)
        z = normal_block(seed, g_base + pid * BLOCK, step, stream, BLOCK)
        local = pid * BLOCK - SHIFT + tl.arange(0, BLOCK)
        mask = (local >= 0) & (local < n)
        tl.store(out_ptr + local, z.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["step", "stream"])
    def _randn_run_kernel(out_ptr, seed_ptr, n, g_base, run_len, run_stride, step, stream, BLOCK: tl.constexpr):
        # Element j of out is global index g_base + (j // run_len) * run_stride + j % run_len.
        local = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        g = g_base + (local // run_len) * run_stride + local % run_len
        z = normal_at(tl.load(seed_ptr), g, step, stream)
        tl.store(out_ptr + local, z.to(out_ptr.dtype.element_ty), mask=local < n)


def _philox4_torch(seed: torch.Tensor, c0, c1, c2, c3):
    """Philox-4x32-10 on int64 tensors holding uint32 values; same words as ``philox4``."""
    seed = seed.to(torch.int64)
    k0 = seed & _M32
    k1 = (seed >> 32) & _M32
    for _ in range(_ROUNDS):
        p0 = _ROUND_A * c0  # < 2**64: int64 wraps to the exact low 64 bits
        p2 = _ROUND_B * c2
        hi0 = (p0 >> 32) & _M32
        hi2 = (p2 >> 32) & _M32
        c0, c1, c2, c3 = (hi2 ^ c1 ^ k0), (p2 & _M32), (hi0 ^ c3 ^ k1), (p0 & _M32)
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def normals_torch(seed: torch.Tensor, g: torch.Tensor, step, stream: int) -> torch.Tensor:
    """float32 normals for int64 global indices ``g`` (any shape); ``seed``/``step`` may be tensors."""
    q = g // 4
    lane = g % 4
    c0 = q & _M32
    c1 = (q >> 32) & _M32
    c2 = _step_counter(q, step)
    c3 = torch.full_like(q, stream)
    words = _philox4_torch(torch.as_tensor(seed, device=g.device), c0, c1, c2, c3)
    return _box_muller4(*words).gather(-1, lane.unsqueeze(-1)).squeeze(-1)


def _box_muller4(w0, w1, w2, w3) -> torch.Tensor:
    """Four Philox words -> [..., 4] float32 normals, as ``normal_block`` computes them."""

    def uniform(w):
        return ((w >> 9).to(torch.float32) + 0.5) * 1.1920928955078125e-07

    r01 = torch.sqrt(-2.0 * torch.log(uniform(w0)))
    r23 = torch.sqrt(-2.0 * torch.log(uniform(w2)))
    th01 = _TWO_PI * uniform(w1)
    th23 = _TWO_PI * uniform(w3)
    return torch.stack([r01 * torch.cos(th01), r01 * torch.sin(th01),
                        r23 * torch.cos(th23), r23 * torch.sin(th23)], dim=-1)


# Elements per chunk of the torch generator: its ~150 int64 passes stay in cache (6x faster on
# 16M elements than one pass over everything: 0.43 s vs 2.6 s on 2 CPU cores).
_TORCH_CHUNK = 1 << 20


def normals_range(seed: torch.Tensor, start: int, n: int, step, stream: int, device) -> torch.Tensor:
    """``normals_torch`` for the contiguous indices start .. start + n - 1, one Philox call per
    group of four (4x less work than per element)."""
    if n > _TORCH_CHUNK:
        out = torch.empty(n, device=device, dtype=torch.float32)
        for lo in range(0, n, _TORCH_CHUNK):
            hi = min(lo + _TORCH_CHUNK, n)
            out[lo:hi] = normals_range(seed, start + lo, hi - lo, step, stream, device)
        return out
    q0, q1 = start // 4, (start + n - 1) // 4
    q = torch.arange(q0, q1 + 1, device=device, dtype=torch.int64)
    words = _philox4_torch(torch.as_tensor(seed, device=device), q & _M32, (q >> 32) & _M32,
                           _step_counter(q, step), torch.full_like(q, stream))
    return _box_muller4(*words).reshape(-1)[start - 4 * q0: start - 4 * q0 + n]


def run_indices(start: int, index_run, lo: int, hi: int, device) -> torch.Tensor:
    """int64 global indices of elements lo .. hi - 1 laid out as ``index_run`` = (length, stride):
    element j is start + (j // length) * stride + j % length (runs of ``length`` consecutive
    indices, ``stride`` apart: a slice of a larger row-major tensor along one dimension)."""
    length, stride = index_run
    j = torch.arange(lo, hi, device=device, dtype=torch.int64)
    return start + torch.div(j, length, rounding_mode="floor") * stride + j % length


def normals_run(seed: torch.Tensor, start: int, n: int, index_run, step, stream: int, device) -> torch.Tensor:
    """``normals_torch`` for the n elements of ``run_indices``, in chunks like ``normals_range``."""
    out = torch.empty(n, device=device, dtype=torch.float32)
    length, stride = index_run
    # Runs that start on a multiple of 4 and have lengths and strides of multiples of 4 (a latent
    # whose inner sizes are) consist of whole Philox groups: one call per group of four, as in
    # normals_range, instead of one per element (6.5x faster on 1M elements, 2 CPU cores).
    grouped = start % 4 == 0 and length % 4 == 0 and stride % 4 == 0
    for lo in range(0, n, _TORCH_CHUNK):  # _TORCH_CHUNK is a multiple of 4
        hi = min(lo + _TORCH_CHUNK, n)
        if grouped:
            q = run_indices(start // 4, (length // 4, stride // 4), lo // 4, hi // 4, device)
            words = _philox4_torch(torch.as_tensor(seed, device=device), q & _M32, (q >> 32) & _M32,
                                   _step_counter(q, step), torch.full_like(q, stream))
            out[lo:hi] = _box_muller4(*words).reshape(-1)
        else:
            out[lo:hi] = normals_torch(seed, run_indices(start, index_run, lo, hi, device), step, stream)
    return out


def _step_counter(q: torch.Tensor, step) -> torch.Tensor:
    """The step counter broadcast like ``q``; a Python int is added as a scalar, never copied
    host-to-device (that copy would break CUDA-graph capture)."""
    if isinstance(step, torch.Tensor):
        return torch.zeros_like(q) + (step.to(device=q.device, dtype=torch.int64) & _M32)
    return torch.zeros_like(q).add_(int(step) & _M32)


def global_indices(shape, index_offset: int, device) -> torch.Tensor:
    n = math.prod(shape)
    return (torch.arange(n, device=device, dtype=torch.int64) + index_offset).view(shape)


def check_index_run(index_run, n: int):
    """``index_run`` = (length, stride) validated for a tensor of n elements; None where its n
    elements are consecutive indices anyway (one run, or stride == length), so that the
    contiguous path, which gives the same indices, runs."""
    if index_run is None:
        return None
    if not (isinstance(index_run, (tuple, list)) and len(index_run) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in index_run)
            and 1 <= index_run[0] <= index_run[1]):
        raise ValueError(f"index_run must be (length, stride), two ints with 1 <= length <= stride (runs of "
                         f"length consecutive global indices, stride apart), got {index_run!r}")
    length, stride = index_run
    return None if n <= length or stride == length else (length, stride)


def index_end(index_offset: int, n: int, index_run) -> int:
    """One past the largest global index of n elements from ``index_offset`` laid out as ``index_run``."""
    if n == 0:
        return index_offset
    if index_run is None:
        return index_offset + n
    length, stride = index_run
    return index_offset + ((n - 1) // length) * stride + (n - 1) % length + 1


def randn(shape, seed, *, step: int = 0, stream: int = STREAM_INIT, index_offset: int = 0, index_run=None,
          device=None, dtype=torch.float32, out: Optional[torch.Tensor] = None,
          backend: Optional[str] = None) -> torch.Tensor:
    """Standard normal tensor whose element ``i`` (row-major) is keyed by ``index_offset + i``.

    ``seed`` is an int in [0, 2**63) or a one-element integer tensor on the device (the graphed
    samplers keep it there so a new seed needs no re-capture). ``step`` and ``stream`` lie in
    [0, 2**31) and ``index_offset`` in [0, 2**62), on every backend. Two calls covering ``[0, a)``
    and ``[a, n)`` with ``index_offset`` 0 and ``a`` give exactly the halves of one call covering
    ``[0, n)``.

    ``index_run=(length, stride)``: element i is keyed by index_offset + (i // length) * stride
    + i % length instead, the indices of a slice along one dimension of a larger row-major tensor
    (``fastdiff.engine.shard.Shard`` computes them), so a shard draws exactly its part of the
    full tensor's noise.
    """
    if out is not None:
        shape, device, dtype = tuple(out.shape), out.device, out.dtype
        if not out.is_contiguous():
            raise ValueError("randn: out must be contiguous")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if isinstance(shape, (int, torch.Tensor)) or not hasattr(shape, "__iter__"):
        raise ValueError(f"randn: shape must be a sequence of ints such as (2, 3), got {shape!r}")
    shape = tuple(check_int("randn: shape entries", s, 0) for s in shape)
    step = check_int("randn: step", step, 0, COUNTER_MAX, hi_open=True)
    stream = check_int("randn: stream", stream, 0, COUNTER_MAX, hi_open=True)
    index_offset = check_int("index_offset", index_offset, 0, 2**62, hi_open=True)
    if index_offset + math.prod(shape) > 2**62:
        raise ValueError(f"randn: index_offset + elements must stay below 2**62 (the global element index keys "
                         f"the noise), got {index_offset} + {math.prod(shape)}")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"randn: dtype must be a floating type, got {dtype}")
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype.is_floating_point or seed.dtype.is_complex or seed.dtype == torch.bool:
            raise ValueError(f"randn: a seed tensor must hold one integer, got shape {tuple(seed.shape)} of "
                             f"{seed.dtype}")
        seed_t = seed
    else:
        seed_t = torch.tensor([check_int("seed", seed, 0, 2**63, hi_open=True)], dtype=torch.int64)
    seed_t = seed_t.to(device=device, dtype=torch.int64).reshape(1)
    out = torch.empty(shape, device=device, dtype=dtype) if out is None else out
    n = out.numel()
    index_run = check_index_run(index_run, n)
    if n == 0:
        return out
    chosen = resolve(backend, device)
    if chosen == "cpp" and dtype != torch.float64:
        return cpu_randn(shape, seed_t, step=step, stream=stream, index_offset=index_offset, out=out,
                         index_run=index_run)
    if chosen != "triton" or dtype == torch.float64:
        if index_run is not None:
            z = normals_run(seed_t.reshape(()), index_offset, n, index_run, step, stream, device)
        else:
            z = normals_range(seed_t.reshape(()), index_offset, n, step, stream, device)
        out.copy_(z.view(shape))
        return out
    if index_run is not None:
        block = _block_for(n)
        _randn_run_kernel[(-(-n // block),)](out, seed_t, n, index_offset, index_run[0], index_run[1], step, stream,
                                             BLOCK=block)
        return out
    block = _block_for(n)
    shift = index_offset % 4
    grid = (-(-(n + shift) // block),)  # plain ints: triton.cdiv is a jit function, ~4 us a call
    _randn_kernel[grid](out, seed_t, n, index_offset - shift, step, stream, BLOCK=block, SHIFT=shift)
    return out


def _block_for(n: int) -> int:
    from ..backend import interpreting
    if interpreting():
        # Each interpreted program costs ~10 ms whatever its size: use few, large ones.
        return max(64, min(1 << 16, 1 << (n - 1).bit_length()))
    return 2048


# -- the C++ generator (fastdiff._C, csrc/philox.h): the same words, one pass, threads --------------

DTYPE_CODES = {getattr(torch, name): code for name, code in _ext.C.CPU_DTYPES.items()} \
    if hasattr(_ext.C, "CPU_DTYPES") else {}


def tensor_arg(t: Optional[torch.Tensor]):
    """(data pointer, dtype code, strides) as the C++ side takes a tensor; None stays None."""
    return None if t is None else (t.data_ptr(), DTYPE_CODES[t.dtype], t.stride())


def cpu_randn(shape, seed: int, *, step: int = 0, stream: int = 1, index_offset: int = 0,
              dtype: torch.dtype = torch.float32, out: Optional[torch.Tensor] = None,
              index_run=None) -> torch.Tensor:
    """``philox.randn`` on the CPU in C++: element i (row-major) is the normal of global index
    ``index_offset + i``, or with ``index_run=(length, stride)`` of index_offset + (i // length) *
    stride + i % length (same 32-bit words as the Triton kernel and the torch implementation)."""
    if out is None:
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"cpu_randn: dtype must be float32, float16 or bfloat16, got {dtype}")
        out = torch.empty(tuple(int(s) for s in shape), dtype=dtype)
    elif out.device.type != "cpu" or out.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"cpu_randn: out must be a float32/float16/bfloat16 CPU tensor, got {out.dtype} on {out.device}")
    if index_offset < 0:
        raise ValueError(f"index_offset must be >= 0, got {index_offset}")
    seed = int(seed.reshape(()).item()) if isinstance(seed, torch.Tensor) else int(seed)
    seed = (seed + 2**63) % 2**64 - 2**63  # the key is the seed's low 64 bits, as an int64 tensor holds it
    run_len, run_stride = index_run if index_run is not None else (0, 0)
    _ext.C.cpu_randn(tuple(out.shape), tensor_arg(out), seed, index_offset, int(step), int(stream),
                     torch.get_num_threads(), int(run_len), int(run_stride))
    return out
