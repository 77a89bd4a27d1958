"""Ahead-of-time compilation of a Triton kernel for the H100 (sm_90) without a GPU.

The interpreter does not compile, so a kernel that runs under ``TRITON_INTERPRET=1`` can still fail to compile (or spill
past shared memory) on the real device. ``compile_for_h100`` runs Triton's full pipeline down to a cubin (ptxas ships
with triton) and returns the compiled kernel's metadata; tests call it for every configuration the launcher can pick.
"""
from __future__ import annotations

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

H100 = GPUTarget("cuda", 90, 32)
H100_SMEM_BYTES = 227 * 1024  # max dynamic shared memory per block on sm_90


def compile_for_h100(fn, signature: dict, constexprs: dict, *, num_warps: int = 4, num_stages: int = 3):
    """Compile ``fn`` (a ``@triton.jit`` function; under the interpreter its ``.fn`` is unwrapped) for sm_90.

    signature: {arg name: triton type string, e.g. "*bf16", "*fp32", "i32", "i64", "fp32", or "constexpr"}.
    constexprs: {arg name: value} for every constexpr argument.
    Returns the CompiledKernel; asserts its shared memory fits the H100.
    """
    jit_fn = fn
    # Under TRITON_INTERPRET=1, @triton.jit returns an InterpretedFunction: compile the underlying JITFunction instead.
    if not isinstance(jit_fn, triton.runtime.JITFunction):
        jit_fn = triton.runtime.JITFunction(getattr(fn, "fn", fn))
    src = ASTSource(fn=jit_fn, signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=H100, options={"num_warps": num_warps, "num_stages": num_stages})
    assert "cubin" in compiled.asm, "no cubin produced"
    smem = compiled.metadata.shared
    assert smem <= H100_SMEM_BYTES, f"{getattr(fn, '__name__', fn)}: {smem} B shared memory > H100's {H100_SMEM_BYTES} B"
    return compiled
