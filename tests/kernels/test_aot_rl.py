"""Ahead-of-time compilation for the H100 (sm_90) of the RL-side kernels (KL, reward shaping, GAE, whitening).

The interpreter never compiles, so every configuration the launchers can pick is compiled here down to a cubin with
``tests.helpers.aot.compile_for_h100`` (which also asserts the shared memory fits). Configurations:
- kl: BLOCK=1024, num_warps=4; fwd and bwd for the 4 estimators × clamp on/off (fp32 inputs), and bf16 / fp16 inputs.
- shape_rewards, gae: every BLOCK_T ∈ {16, ..., 1024} (with its num_warps) for bool (u8) masks and fp32 inputs; the
  largest tile also with (fp32 mask, bf16 inputs) and (int64 mask, fp16 inputs): other masks load as they are.
- whiten: the one-program kernel (SMALL_BLOCK, SMALL_WARPS) and the two-phase kernels (BLOCK, P_BLOCK=MAX_PARTIALS,
  WARPS), for (u8 mask, fp32) and (fp32 mask, bf16).
The input dtype only changes the load's element type, so a few dtype variants on the largest tile cover them (compiling
is ~0.6 s per configuration on this machine's 2 cores; the full cross product would take minutes).

Compilation runs in one child Python without TRITON_INTERPRET (``compile_cases_in_child``: the combine functions behind
``tl.sum`` / ``tl.max`` / ``tl.associative_scan`` cannot be inlined from interpreter objects); each case is a test here.
"""
import importlib

import pytest

from tests.helpers.aot import AOTCase, compile_cases_in_child

pytestmark = pytest.mark.slow

BLOCK_TS = [1 << k for k in range(4, 11)]  # 16 ... 1024
ROW_MASKS = [("u8", "fp32"), ("fp32", "bf16"), ("i64", "fp16")]  # (mask type, input type) pairs
KL_CASES = [("fp32", est, clamp) for est in ("k1", "k2", "k3", "abs") for clamp in (False, True)]
KL_CASES += [("bf16", "k3", True), ("fp16", "k3", True)]
ROW_CASES = [(bt, "u8", "fp32") for bt in BLOCK_TS] + [(BLOCK_TS[-1], mt, dt) for mt, dt in ROW_MASKS[1:]]


def _mod(name):
    # import the modules by name (their files are named apart from the functions the package exports)
    return importlib.import_module(f"fastrlhf.kernels.{name}")


def configs():
    """[AOTCase] for every configuration a launcher can pick."""
    kl, gm, wm = _mod("kl"), _mod("gae_scan"), _mod("whitening")
    out = []
    assert {est for _, est, _ in KL_CASES} == set(kl.ESTIMATORS)
    for dt, est, clamp in KL_CASES:
        const = {"EST": kl.KL_CODE[est], "HAS_CLAMP": clamp, "BLOCK": kl.BLOCK}
        cx = {k: "constexpr" for k in const}
        out.append(AOTCase(f"kl_fwd-{dt}-{est}-clamp{int(clamp)}", "kl", "_kl_fwd_kernel",
                           {"logp_ptr": f"*{dt}", "ref_ptr": f"*{dt}", "out_ptr": "*fp32", "n": "i32", "lo": "fp32",
                            "hi": "fp32", **cx}, const, kl.NUM_WARPS))
        out.append(AOTCase(f"kl_bwd-{dt}-{est}-clamp{int(clamp)}", "kl", "_kl_bwd_kernel",
                           {"logp_ptr": f"*{dt}", "ref_ptr": f"*{dt}", "grad_out_ptr": "*fp32",
                            "grad_logp_ptr": f"*{dt}", "grad_ref_ptr": f"*{dt}", "n": "i32", "lo": "fp32",
                            "hi": "fp32", **cx}, const, kl.NUM_WARPS))
    for bt, mt, dt in ROW_CASES:
        out.append(AOTCase(f"rewards-{bt}-{mt}-{dt}", "rewards", "_shape_rewards_kernel",
                           {"scores_ptr": "*fp32", "kl_ptr": f"*{dt}", "mask_ptr": f"*{mt}", "out_ptr": "*fp32",
                            "last_ptr": "*i32", "T": "i32", "stride_kl_b": "i32", "stride_mask_b": "i32",
                            "kl_coef": "fp32", "BLOCK_T": "constexpr"}, {"BLOCK_T": bt}, 4))
        out.append(AOTCase(f"gae-{bt}-{mt}-{dt}", "gae_scan", "_gae_kernel",
                           {"r_ptr": f"*{dt}", "v_ptr": f"*{dt}", "m_ptr": f"*{mt}", "adv_ptr": "*fp32",
                            "ret_ptr": "*fp32", "T": "i32", "stride_r": "i32", "stride_v": "i32", "stride_m": "i32",
                            "gamma": "fp32", "gamma_lam": "fp32", "BLOCK_T": "constexpr"}, {"BLOCK_T": bt},
                           gm.pick_num_warps(bt)))
    for mt, dt in ROW_MASKS[:2]:
        out.append(AOTCase(f"whiten_small-{mt}-{dt}", "whitening", "_whiten_small_kernel",
                           {"x_ptr": f"*{dt}", "m_ptr": f"*{mt}", "out_ptr": "*fp32", "N": "i32", "eps": "fp32",
                            "add_mean": "fp32", "BLOCK": "constexpr"}, {"BLOCK": wm.SMALL_BLOCK}, wm.SMALL_WARPS))
        out.append(AOTCase(f"whiten_partials-{mt}-{dt}", "whitening", "_whiten_partials_kernel",
                           {"x_ptr": f"*{dt}", "m_ptr": f"*{mt}", "part_n_ptr": "*fp32", "part_mean_ptr": "*fp32",
                            "part_m2_ptr": "*fp32", "N": "i32", "CHUNK": "i32", "BLOCK": "constexpr"},
                           {"BLOCK": wm.BLOCK}, wm.WARPS))
        out.append(AOTCase(f"whiten_apply-{mt}-{dt}", "whitening", "_whiten_apply_kernel",
                           {"x_ptr": f"*{dt}", "m_ptr": f"*{mt}", "out_ptr": "*fp32", "part_n_ptr": "*fp32",
                            "part_mean_ptr": "*fp32", "part_m2_ptr": "*fp32", "N": "i32", "CHUNK": "i32", "P": "i32",
                            "eps": "fp32", "add_mean": "fp32", "BLOCK": "constexpr", "P_BLOCK": "constexpr"},
                           {"BLOCK": wm.BLOCK, "P_BLOCK": wm.MAX_PARTIALS}, wm.WARPS))
    return out


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return compile_cases_in_child("tests.kernels.test_aot_rl:configs", tmp_path_factory.mktemp("aot_rl"))


def test_block_t_choices_are_covered():
    picked = {_mod("gae_scan").pick_block_t(t) for t in range(1, 5000, 7)}
    picked |= {_mod("rewards").pick_block_t(t) for t in range(1, 5000, 7)}
    assert picked == set(BLOCK_TS)


@pytest.mark.parametrize("cid", [c.id for c in configs()])
def test_compiles_for_h100(compiled, cid):
    assert compiled[cid] == "ok", compiled[cid]
