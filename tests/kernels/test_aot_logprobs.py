"""Compile every Triton kernel of logprobs.py / linear_logprobs.py for sm_90 (H100) with every config the launchers pick.

The interpreter does not compile, so this is what catches a kernel that would fail to lower, or spill past shared memory
(``compile_for_h100`` asserts ≤ 227 KiB), on the real device. Configurations (taken from the launchers' own ``CONFIGS`` /
``launch_config``, and each checked to be what the pick function returns for the shape used):
- ``_logprobs_fwd_kernel`` / ``_logprobs_bwd_kernel``: each (BLOCK_R, BLOCK_V, num_warps) in ``logprobs.CONFIGS`` × logits
  dtype fp32 / bf16 / fp16 (V is a constexpr: 37, 1000, 151936 pick the three configs).
- ``_linear_fwd_kernel`` / ``_linear_dz_kernel``: each (BLOCK_N, BLOCK_V, BLOCK_K, warps, stages) in
  ``linear_logprobs.CONFIGS`` with the dtypes that pick it (fp32; bf16 and fp16 at N=16 and N=16384) × HAS_BIAS, H=896.
- ``_linear_kl_fwd_kernel`` / ``_linear_kl_dz_kernel`` (linear_kl.py): the same tile configs and dtypes (two tl.dot K loops
  per vocab tile, policy and reference), also as launched.
Compilation runs in one child Python without TRITON_INTERPRET (``compile_cases_in_child``: loops calling jit helpers do
not compile from interpreter objects). Each linear kernel is also compiled as a real launch specializes it
(``AOTCase.as_launched``: unit inner strides, 16-divisible pointers/sizes), where the K loop must be software-pipelined
(cp.async) and uses num_stages × (BLOCK_N + BLOCK_V) × BLOCK_K × bytes of shared memory (96 KiB for the bf16
128×128×64×3 config): that is the figure ``compile_for_h100`` checks against 227 KiB. There the bf16 / fp16 kernels must
use wgmma (HGMMA in the SASS) and no kernel may spill (``aot.check_case``).
"""
import importlib

import pytest

from tests.helpers.aot import AOTCase, compile_cases_in_child

pytestmark = pytest.mark.slow  # ~70 compiles in a child process (~1 min on 2 cores)

TY = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
LOGPROB_VOCABS = (37, 1000, 151936)  # one vocabulary per logprobs config
# int args a real launch has % 16 == 0
LAUNCH_DIV16 = ("N", "V", "NC", "VC", "stride_xn", "stride_wv", "stride_dzn", "stride_rn", "stride_rv")
# Compiled with generic strides (nothing known about alignment: a view whose strides are not multiples of 16) the
# K loop is not pipelined through shared memory and the bf16 forward spills (255 registers, 168 B stack on sm_90):
# a slow fallback for such views, tolerated; the launches the trainers make are the "-launched" twins, checked for it.
GENERIC_SPILLS = "generic-stride fallback; its -launched twin must not spill"
# Registers per thread as launched (sm_90, ptxas 13.4): the dZ kernel ≤ 193 (bf16, 8 warps: 1 CTA per SM; a rise is a
# regression toward spills). The bf16 forward sits at 254 of 255 (1 CTA per SM at 8 warps): its spill check is the bound.
MAX_REGS = {"fwd": None, "dz": 200}


def _mod(name):
    return importlib.import_module(f"fastrlhf.kernels.{name}")


def _linear_sigs(x: str, const: dict) -> dict:
    """{"fwd" | "dz": signature} of the linear kernels with 16-/32-bit operands of type ``x`` ("*bf16", ...)."""
    strides = {"stride_xn": "i32", "stride_xk": "i32", "stride_wv": "i32", "stride_wk": "i32"}
    cx = {k: "constexpr" for k in const}
    return {"fwd": {"x_ptr": x, "w_ptr": x, "b_ptr": x, "y_ptr": "*i64", "m_ptr": "*fp32", "s_ptr": "*fp32",
                    "t_ptr": "*fp32", "zy_ptr": "*fp32", "N": "i32", "V": "i32", "S": "i32", **strides,
                    "inv_tau": "fp32", **cx},
            "dz": {"x_ptr": x, "w_ptr": x, "b_ptr": x, "y_ptr": "*i64", "lse_ptr": "*fp32", "ent_ptr": "*fp32",
                   "g_logp_ptr": "*fp32", "g_ent_ptr": "*fp32", "dz_ptr": x, "NC": "i32", "VC": "i32",
                   "v_start": "i32", **strides, "stride_dzn": "i32", "inv_tau": "fp32", **cx}}


def configs():
    """[AOTCase] for every launcher config; the linear kernels also ``-launched`` (specialized as a real launch)."""
    import torch

    lp, ll = _mod("logprobs"), _mod("fused_linear_logprobs")
    out = []
    assert {lp.launch_config(v) for v in LOGPROB_VOCABS} == set(lp.CONFIGS)
    for V in LOGPROB_VOCABS:
        br, bv, nw = lp.launch_config(V)
        for dt in ("float32", "bfloat16", "float16"):
            x = "*" + TY[dt]
            tail = {"N": "i32", "D1": "i32", "stride_x0": "i64", "stride_x1": "i64", "inv_tau": "fp32",
                    "V": "constexpr", "BLOCK_R": "constexpr", "BLOCK_V": "constexpr"}
            const = {"V": V, "BLOCK_R": br, "BLOCK_V": bv}
            out.append(AOTCase(f"logprobs_fwd-V{V}-{dt}", "logprobs", "_logprobs_fwd_kernel",
                               {"x_ptr": x, "y_ptr": "*i64", "logp_ptr": "*fp32", "lse_ptr": "*fp32",
                                "ent_ptr": "*fp32", **tail}, const, nw, 3))
            out.append(AOTCase(f"logprobs_bwd-V{V}-{dt}", "logprobs", "_logprobs_bwd_kernel",
                               {"x_ptr": x, "y_ptr": "*i64", "lse_ptr": "*fp32", "ent_ptr": "*fp32",
                                "g_logp_ptr": "*fp32", "g_ent_ptr": "*fp32", "dx_ptr": x, **tail}, const, nw, 3))
    cases = [("float32", 4096)] + [(dt, n) for dt in ("bfloat16", "float16") for n in (16, 16384)]
    assert {ll.launch_config(n, getattr(torch, dt)) for dt, n in cases} == set(ll.CONFIGS.values())
    for dt, n in cases:
        bn, bv, bk, nw, ns = ll.launch_config(n, getattr(torch, dt))
        x = "*" + TY[dt]
        for has_bias in (False, True) if n > 64 else (False,):  # bias: one epilogue add; once per tile shape
            const = {"H": 896, "HAS_BIAS": has_bias, "BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_K": bk,
                     "DOT_PREC": ll.dot_precision(getattr(torch, dt))}
            sigs = _linear_sigs(x, const)
            for kind, sig in sigs.items():
                cid, kernel = f"linear_{kind}-{dt}-N{n}-bias{int(has_bias)}", f"_linear_{kind}_kernel"
                out.append(AOTCase(cid, "fused_linear_logprobs", kernel, sig, const, nw, ns, spills_ok=GENERIC_SPILLS))
                # as a real launch: contiguous inner strides == 1; pointers and the sizes / row strides used here
                # (H=896, V=151936, N=16384, ...) 16-divisible. The tl.dot K loop must then be pipelined (cp.async).
                # No spills there, and bf16 / fp16 tl.dot on wgmma (HGMMA); registers ≤ MAX_REGS (occupancy).
                out.append(AOTCase(f"{cid}-launched", "fused_linear_logprobs", kernel, sig, const, nw, ns, as_launched=True,
                                   ones=("stride_xk", "stride_wk"), pipelined=True,
                                   div16=tuple(k for k in LAUNCH_DIV16 if k in sig), wgmma=dt != "float32",
                                   max_regs=MAX_REGS[kind]))
    # the tile configs benchmarks/run_linear_configs.py times on the GPU against the shipped one: as launched, no spills
    from fastrlhf.benchmarks.run_linear_configs import CANDIDATES
    for name, cfg in CANDIDATES.items():
        if cfg is None:
            continue
        bn, bv, bk, nw, ns = cfg
        const = {"H": 896, "HAS_BIAS": False, "BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_K": bk, "DOT_PREC": "tf32"}
        for kind, sig in _linear_sigs("*bf16", const).items():
            out.append(AOTCase(f"linear_{kind}-candidate-{name}-launched", "fused_linear_logprobs", f"_linear_{kind}_kernel",
                               sig, const, nw, ns, as_launched=True, ones=("stride_xk", "stride_wk"), pipelined=True,
                               div16=tuple(k for k in LAUNCH_DIV16 if k in sig), wgmma=True, max_regs=MAX_REGS[kind]))
    out += _linear_kl_cases(cases)
    return out


def _linear_kl_cases(cases):
    """``linear_kl``'s forward / dz kernels with the same tile configs (H = HR = 896), plain and as launched."""
    import torch

    ll, lk = _mod("fused_linear_logprobs"), _mod("fused_linear_kl")
    out = []
    for dt, n in cases:
        bn, bv, bk, nw, ns = lk.kl_launch_config(n, getattr(torch, dt))
        x = "*" + TY[dt]
        strides = {"stride_xn": "i32", "stride_xk": "i32", "stride_wv": "i32", "stride_wk": "i32",
                   "stride_rn": "i32", "stride_rk": "i32", "stride_rv": "i32", "stride_rwk": "i32"}
        const = {"H": 896, "HR": 896, "BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_K": bk,
                 "DOT_PREC": ll.dot_precision(getattr(torch, dt))}
        cx = {k: "constexpr" for k in const}
        sigs = {"fwd": {"x_ptr": x, "w_ptr": x, "xr_ptr": x, "wr_ptr": x, "part_ptr": "*fp32", "N": "i32", "V": "i32",
                        "S": "i32", **strides, "inv_tau": "fp32", **cx},
                "dz": {"x_ptr": x, "w_ptr": x, "xr_ptr": x, "wr_ptr": x, "lse_ptr": "*fp32", "mu_ptr": "*fp32",
                       "g_ptr": "*fp32", "dz_ptr": x, "NC": "i32", "VC": "i32", **strides, "stride_dzn": "i32",
                       "inv_tau": "fp32", **cx}}
        for kind, sig in sigs.items():
            cid, kernel = f"linear_kl_{kind}-{dt}-N{n}", f"_linear_kl_{kind}_kernel"
            out.append(AOTCase(cid, "fused_linear_kl", kernel, sig, const, nw, ns, spills_ok=GENERIC_SPILLS))
            out.append(AOTCase(f"{cid}-launched", "fused_linear_kl", kernel, sig, const, nw, ns, as_launched=True,
                               ones=("stride_xk", "stride_wk", "stride_rk", "stride_rwk"), pipelined=True,
                               div16=tuple(k for k in LAUNCH_DIV16 if k in sig), wgmma=dt != "float32"))
    return out


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return compile_cases_in_child("tests.kernels.test_aot_logprobs:configs", tmp_path_factory.mktemp("aot_logprobs"))


def test_interpreter_only_dot_branch_not_used_when_compiling(monkeypatch):
    """The "upcast" tl.dot branch is chosen only under the interpreter; compiled bf16 kernels use tensor cores."""
    import torch

    ll = _mod("fused_linear_logprobs")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert ll.dot_precision(torch.bfloat16) == "tf32" and ll.dot_precision(torch.float32) == "ieee"


@pytest.mark.parametrize("cid", [c.id for c in configs()])
def test_compiles_for_h100(compiled, cid):
    assert compiled[cid] == "ok", compiled[cid]
