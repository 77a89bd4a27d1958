"""Compile every Triton kernel of logprobs.py / linear_logprobs.py for sm_90 (H100) with every config the launchers pick.

The interpreter does not compile, so this is what catches a kernel that would fail to lower, or spill past shared memory
(``compile_for_h100`` asserts ≤ 227 KiB), on the real device. Configurations (taken from the launchers' own ``CONFIGS`` /
``launch_config``, and each checked to be what the pick function returns for the shape used):
- ``_logprobs_fwd_kernel`` / ``_logprobs_bwd_kernel``: each (BLOCK_R, BLOCK_V, num_warps) in ``logprobs.CONFIGS`` × logits
  dtype fp32 / bf16 / fp16 (V is a constexpr: 37, 1000, 151936 pick the three configs).
- ``_linear_fwd_kernel`` / ``_linear_dz_kernel``: each (BLOCK_N, BLOCK_V, BLOCK_K, warps, stages) in
  ``linear_logprobs.CONFIGS`` with the dtypes that pick it (fp32; bf16 and fp16 at N=16 and N=16384) × HAS_BIAS, H=896.
Why a subprocess: with TRITON_INTERPRET=1 (set by conftest on CPU) every ``@triton.jit`` function (the kernels and the
helpers they call) is an interpreter object, and compiling loops from it fails; so one child Python with TRITON_INTERPRET
unset compiles everything (as tests/kernels/test_aot_ppo.py does). The linear kernels are compiled a second time specialized
as a real launch is (unit inner strides, 16-divisible pointers/sizes), where the K loop is software-pipelined and uses
num_stages × (BLOCK_N + BLOCK_V) × BLOCK_K × bytes of shared memory (96 KiB for the bf16 128×128×64×3 config).
"""
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # ~60 compiles in a child process (~1 min on 2 cores)

ROOT = Path(__file__).resolve().parents[2]
TY = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
LOGPROB_VOCABS = (37, 1000, 151936)  # one vocabulary per logprobs config


def _mod(name):
    return importlib.import_module(f"fastrlhf.kernels.{name}")


def configs():
    """[(id, module, kernel name, signature, constexprs, num_warps, num_stages)] for every launcher config."""
    import torch

    lp, ll = _mod("logprobs"), _mod("linear_logprobs")
    out = []
    assert {lp.launch_config(v) for v in LOGPROB_VOCABS} == set(lp.CONFIGS)
    for V in LOGPROB_VOCABS:
        br, bv, nw = lp.launch_config(V)
        for dt in ("float32", "bfloat16", "float16"):
            x = "*" + TY[dt]
            tail = {"N": "i32", "D1": "i32", "stride_x0": "i64", "stride_x1": "i64", "inv_tau": "fp32",
                    "V": "constexpr", "BLOCK_R": "constexpr", "BLOCK_V": "constexpr"}
            const = {"V": V, "BLOCK_R": br, "BLOCK_V": bv}
            out.append((f"logprobs_fwd-V{V}-{dt}", "logprobs", "_logprobs_fwd_kernel",
                        {"x_ptr": x, "y_ptr": "*i64", "logp_ptr": "*fp32", "lse_ptr": "*fp32", "ent_ptr": "*fp32", **tail},
                        const, nw, 3))
            out.append((f"logprobs_bwd-V{V}-{dt}", "logprobs", "_logprobs_bwd_kernel",
                        {"x_ptr": x, "y_ptr": "*i64", "lse_ptr": "*fp32", "ent_ptr": "*fp32", "g_logp_ptr": "*fp32",
                         "g_ent_ptr": "*fp32", "dx_ptr": x, **tail}, const, nw, 3))
    cases = [("float32", 4096)] + [(dt, n) for dt in ("bfloat16", "float16") for n in (16, 16384)]
    assert {ll.launch_config(n, getattr(torch, dt)) for dt, n in cases} == set(ll.CONFIGS.values())
    for dt, n in cases:
        bn, bv, bk, nw, ns = ll.launch_config(n, getattr(torch, dt))
        x = "*" + TY[dt]
        strides = {"stride_xn": "i32", "stride_xk": "i32", "stride_wv": "i32", "stride_wk": "i32"}
        for has_bias in (False, True) if n > 64 else (False,):  # bias: one epilogue add; once per tile shape
            const = {"H": 896, "HAS_BIAS": has_bias, "BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_K": bk,
                     "DOT_PREC": ll.dot_precision(getattr(torch, dt))}
            cx = {k: "constexpr" for k in const}
            out.append((f"linear_fwd-{dt}-N{n}-bias{int(has_bias)}", "linear_logprobs", "_linear_fwd_kernel",
                        {"x_ptr": x, "w_ptr": x, "b_ptr": x, "y_ptr": "*i64", "m_ptr": "*fp32", "s_ptr": "*fp32",
                         "t_ptr": "*fp32", "zy_ptr": "*fp32", "N": "i32", "V": "i32", "S": "i32", **strides,
                         "inv_tau": "fp32", **cx}, const, nw, ns))
            out.append((f"linear_dz-{dt}-N{n}-bias{int(has_bias)}", "linear_logprobs", "_linear_dz_kernel",
                        {"x_ptr": x, "w_ptr": x, "b_ptr": x, "y_ptr": "*i64", "lse_ptr": "*fp32", "ent_ptr": "*fp32",
                         "g_logp_ptr": "*fp32", "g_ent_ptr": "*fp32", "dz_ptr": x, "NC": "i32", "VC": "i32",
                         "v_start": "i32", **strides, "stride_dzn": "i32", "inv_tau": "fp32", **cx}, const, nw, ns))
    return out


def _compile_as_launched(fn, sig: dict, const: dict, num_warps: int, num_stages: int):
    """Compile like the CUDA JIT specializes a real launch: contiguous inner strides (== 1) become constexprs and pointers /
    16-divisible ints (H=896, V=151936, N=16384, row strides) carry tt.divisibility=16. Only then does Triton pipeline the
    K loop with cp.async (num_stages buffers in shared memory), so this is the shared-memory figure that must fit."""
    import triton
    from triton.compiler import ASTSource

    from tests.kernels.aot import H100, H100_SMEM_BYTES

    sig, const = dict(sig), dict(const)
    for k in ("stride_xk", "stride_wk"):
        sig[k], const[k] = "constexpr", 1
    div16 = [i for i, (k, v) in enumerate(sig.items()) if v.startswith("*") or k in ("N", "V", "NC", "VC", "stride_xn",
                                                                                   "stride_wv", "stride_dzn")]
    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs={(i,): [["tt.divisibility", 16]] for i in div16})
    k = triton.compile(src, target=H100, options={"num_warps": num_warps, "num_stages": num_stages})
    assert k.metadata.shared <= H100_SMEM_BYTES, f"{k.metadata.shared} B shared memory > {H100_SMEM_BYTES}"
    return k


def _compile_one(case) -> tuple:
    """Compile one configuration → (id, "ok ..." | error text)."""
    from tests.kernels.aot import compile_for_h100

    cid, mod, name, sig, const, nw, ns = case
    try:
        k = compile_for_h100(getattr(_mod(mod), name), sig, const, num_warps=nw, num_stages=ns)
        msg = f"ok smem={k.metadata.shared}"
        if name.startswith("_linear"):
            k = _compile_as_launched(getattr(_mod(mod), name), sig, const, nw, ns)
            msg += f" as-launched smem={k.metadata.shared} cp.async={'cp.async' in k.asm['ptx']}"
        return cid, msg
    except Exception as e:  # reported per configuration by the tests below
        return cid, f"{type(e).__name__}: {e}"[-4000:]


def _compile_all(path: str) -> None:
    """Child process: compile every configuration (2 worker processes), write {id: "ok" | error text} to ``path``."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = dict(pool.map(_compile_one, configs()))
    Path(path).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    path = tmp_path_factory.mktemp("aot_logprobs") / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = f"import tests.kernels.test_aot_logprobs as t; t._compile_all({str(path)!r})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(path.read_text())


def test_interpreter_only_dot_branch_not_used_when_compiling(monkeypatch):
    """The "upcast" tl.dot branch is chosen only under the interpreter; compiled bf16 kernels use tensor cores."""
    import torch

    ll = _mod("linear_logprobs")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert ll.dot_precision(torch.bfloat16) == "tf32" and ll.dot_precision(torch.float32) == "ieee"


@pytest.mark.parametrize("cid", [c[0] for c in configs()])
def test_compiles_for_h100(compiled, cid):
    assert compiled[cid].startswith("ok"), compiled[cid]
    if cid.startswith("linear"):  # the tl.dot K loop must be software-pipelined (cp.async) when launched for real
        assert "cp.async=True" in compiled[cid], compiled[cid]
