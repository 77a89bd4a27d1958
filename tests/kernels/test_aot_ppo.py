"""Ahead-of-time compilation for the H100 (sm_90) of the PPO policy / value loss kernels and their shared aggregation.

The interpreter never compiles, so every configuration the launchers can pick is compiled here to a cubin
(``tests.helpers.aot.compile_for_h100`` also asserts shared memory ≤ 227 KiB). Configurations:
- ``_ppo_fwd_kernel``: KL_EST ∈ {none, k1, k2, k3, abs} × STORE_GRAD ∈ {False, True} × BLOCK_T ∈ {256, 1024} (every
  value ``fwd_block_t`` returns on CUDA) with fp32 inputs and a bool (u1) mask; on the largest tile also bf16 / fp16 /
  fp64 inputs and fp32 / int64 masks (other dtypes only change the loads' element type).
- ``_value_fwd_kernel``: STORE_GRAD × BLOCK_T (fp32, bool mask) + bf16 / fp16 / fp64 inputs and an int64 mask.
- ``_finalize_kernel``: AGG ∈ 3 modes × NORM_MODE ∈ {none, float, tensor} (BLOCK_B 1024, BLOCK_K 8).
- ``_scale_grad_kernel``: BLOCK_T ∈ {256, 1024} × gradient dtype (= the input's: fp32, bf16, fp16, fp64 on 1024).
All launchers pass num_warps=4. Compiling takes ~0.6 s per configuration on this machine's 2 cores. None may spill
registers (``aot.check_case``), except where a case says why.

Compilation runs in one child Python without TRITON_INTERPRET (``compile_cases_in_child``: while-loop carried values
of an unwrapped interpreter function reach the code generator as raw IR values); each case is a test here.
"""
import importlib

import pytest

from tests.helpers.aot import AOTCase, compile_cases_in_child

pytestmark = pytest.mark.slow

BLOCK_TS = (256, 1024)
NUM_WARPS = 4


def _mod(name):
    return importlib.import_module(f"fastrlhf.kernels.{name}")


def _ppo_sig(dt: str, mt: str) -> dict:
    sig = {"logp_ptr": f"*{dt}", "old_ptr": f"*{dt}", "adv_ptr": f"*{dt}", "mask_ptr": f"*{mt}", "ref_ptr": f"*{dt}",
           "dl_ptr": "*fp32", "part_ptr": "*fp32", "T": "i32", "n_cols": "i32"}
    sig |= {s: "i32" for s in ("s_lp_b", "s_lp_t", "s_old_b", "s_old_t", "s_adv_b", "s_adv_t", "s_m_b", "s_m_t",
                               "s_ref_b", "s_ref_t")}
    return sig | {"lo": "fp32", "hi": "fp32", "dual_c": "fp32", "kl_coef": "fp32",
                  "KL_EST": "constexpr", "STORE_GRAD": "constexpr", "BLOCK_T": "constexpr"}


def _value_sig(dt: str, mt: str) -> dict:
    sig = {"v_ptr": f"*{dt}", "old_ptr": f"*{dt}", "ret_ptr": f"*{dt}", "mask_ptr": f"*{mt}", "dl_ptr": "*fp32",
           "part_ptr": "*fp32", "T": "i32"}
    sig |= {s: "i32" for s in ("s_v_b", "s_v_t", "s_old_b", "s_old_t", "s_ret_b", "s_ret_t", "s_m_b", "s_m_t")}
    return sig | {"eps": "fp32", "STORE_GRAD": "constexpr", "BLOCK_T": "constexpr"}


def configs():
    """[AOTCase] for every configuration a launcher can pick (all with num_warps=NUM_WARPS)."""
    ppo, agg = _mod("ppo_loss"), _mod("_aggregate")
    out = []
    ppo_cases = [(est, grad, bt, "fp32", "u1") for est in [0, *sorted(ppo.KL_CODE.values())]
                 for grad in (False, True) for bt in BLOCK_TS]
    ppo_cases += [(3, True, 1024, dt, mt) for dt, mt in (("bf16", "u1"), ("fp16", "u1"), ("fp64", "u1"),
                                                         ("fp32", "fp32"), ("bf16", "i64"))]
    for est, grad, bt, dt, mt in ppo_cases:
        out.append(AOTCase(f"ppo_fwd-kl{est}-grad{int(grad)}-{bt}-{dt}-{mt}", "ppo_loss", "_ppo_fwd_kernel",
                           _ppo_sig(dt, mt), {"KL_EST": est, "STORE_GRAD": grad, "BLOCK_T": bt}, NUM_WARPS))
    value_cases = [(grad, bt, "fp32", "u1") for grad in (False, True) for bt in BLOCK_TS]
    value_cases += [(True, 1024, dt, mt) for dt, mt in (("bf16", "u1"), ("fp16", "u1"), ("fp64", "i64"))]
    for grad, bt, dt, mt in value_cases:
        # generic strides, fp16: ptxas keeps two loop-carried sums in 8 B of stack; the same kernel as launched
        # (aligned, unit strides) does not spill (test_aot_launched.py: value_fwd-fp16)
        ok = "generic-stride fp16 compile; launched twin checked" if (dt, grad, bt) == ("fp16", True, 1024) else ""
        out.append(AOTCase(f"value_fwd-grad{int(grad)}-{bt}-{dt}-{mt}", "value_loss", "_value_fwd_kernel",
                           _value_sig(dt, mt), {"STORE_GRAD": grad, "BLOCK_T": bt}, NUM_WARPS, spills_ok=ok))
    for a in sorted(agg.AGG_CODE.values()):
        for nm in (agg.NORM_NONE, agg.NORM_SCALAR, agg.NORM_TENSOR):
            const = {"AGG": a, "NORM_MODE": nm, "BLOCK_B": agg.FINALIZE_BLOCK_B, "BLOCK_K": agg.FINALIZE_BLOCK_K}
            out.append(AOTCase(f"finalize-agg{a}-norm{nm}", "_aggregate", "_finalize_kernel",
                               {"part_ptr": "*fp32", "loss_ptr": "*fp32", "metrics_ptr": "*fp32", "w_ptr": "*fp32",
                                "norm_ptr": "*fp32", "B": "i32", "n_cols": "i32", "norm_value": "fp32",
                                **{k: "constexpr" for k in const}}, const, NUM_WARPS))
    for bt, dt in [(256, "fp32"), (1024, "fp32"), (1024, "bf16"), (1024, "fp16"), (1024, "fp64")]:
        out.append(AOTCase(f"scale_grad-{bt}-{dt}", "_aggregate", "_scale_grad_kernel",
                           {"dl_ptr": "*fp32", "w_ptr": "*fp32", "g_ptr": "*fp32", "out_ptr": f"*{dt}", "T": "i32",
                            "BLOCK_T": "constexpr"}, {"BLOCK_T": bt}, NUM_WARPS))
    return out


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return compile_cases_in_child("tests.kernels.test_aot_ppo:configs", tmp_path_factory.mktemp("aot_ppo"))


def test_block_choices_are_covered(monkeypatch):
    """The CUDA launchers only pick the BLOCK_T values compiled here (the interpreter's 16 is never compiled)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    picked = {_mod("ppo_loss").fwd_block_t(t) for t in range(1, 9000, 7)}
    picked |= {_mod("_aggregate").grad_block_t(t) for t in range(1, 9000, 7)}
    assert picked == set(BLOCK_TS)


@pytest.mark.parametrize("cid", [c.id for c in configs()])
def test_compiles_for_h100(compiled, cid):
    assert compiled[cid] == "ok", compiled[cid]
