"""The row kernels compiled for sm_90 exactly as a launch at the benchmark shapes specialises them, and what ptxas made.

``test_aot_logprobs`` / ``test_aot_ppo`` / ``test_aot_rl`` compile every launcher config with generic integer arguments;
a real launch also tells Triton which pointers are 16-byte aligned, which ints are divisible by 16 and which strides are
1 (``AOTCase.as_launched``), and only then are the loads vectorised. Here each kernel the benchmarks run is compiled with
the specialisation of its launch at the benchmark shape (log-probs [32, 512, 151936] bf16 and fp32 logits; GAE, reward
shaping, whitening, PPO / value loss at [64, 1024] fp32 with an fp32 mask, as the PPO trainer passes them), and the
compile output must show: no register spills (every case, ``aot.check_case``), shared memory ≤ 227 KiB, and
``load_bytes`` = 16: the widest global load is a 16-byte ``ld.global.v4`` per thread (4 fp32 or 8 bf16 of a row).
The KL kernels are left to their own AOT tests.
"""
import importlib

import pytest

from tests.helpers.aot import AOTCase, compile_cases_in_child

pytestmark = pytest.mark.slow

B, T = 64, 1024  # GAE / PPO benchmark shape: every int below (T, B·T, row strides) is a multiple of 16
LOGITS = (32, 512, 151936)  # log-prob benchmark shape: N = 16384 rows of V = 151936


def _mod(name):
    return importlib.import_module(f"fastrlhf.kernels.{name}")


def _launched(cid, module, kernel, sig, const, num_warps, *, ones=(), div16=(), load_bytes=16):
    return AOTCase(cid, module, kernel, sig, const, num_warps, as_launched=True, ones=tuple(ones),
                   div16=tuple(div16), load_bytes=load_bytes)


def configs():
    """[AOTCase]: each benchmarked row kernel as launched at its benchmark shape."""
    lp, gm, rw, wm, ppo, agg = (_mod(n) for n in ("logprobs", "gae_scan", "rewards", "whitening", "ppo_loss", "_aggregate"))
    out = []
    V = LOGITS[2]
    br, bv, nw = lp.launch_config(V)
    tail = {"N": "i32", "D1": "i32", "stride_x0": "i32", "stride_x1": "i32", "inv_tau": "fp32",
            "V": "constexpr", "BLOCK_R": "constexpr", "BLOCK_V": "constexpr"}
    const = {"V": V, "BLOCK_R": br, "BLOCK_V": bv}
    div = ("N", "D1", "stride_x0", "stride_x1")  # [N, V] contiguous: D1 = N, strides (0, V), all % 16 == 0
    for dt in ("bf16", "fp32"):
        x = "*" + dt
        out.append(_launched(f"logprobs_fwd-{dt}", "logprobs", "_logprobs_fwd_kernel",
                             {"x_ptr": x, "y_ptr": "*i64", "logp_ptr": "*fp32", "lse_ptr": "*fp32", "ent_ptr": "*fp32",
                              **tail}, const, nw, div16=div))
        out.append(_launched(f"logprobs_bwd-{dt}", "logprobs", "_logprobs_bwd_kernel",
                             {"x_ptr": x, "y_ptr": "*i64", "lse_ptr": "*fp32", "ent_ptr": "*fp32",
                              "g_logp_ptr": "*fp32", "g_ent_ptr": "*fp32", "dx_ptr": x, **tail}, const, nw,
                             div16=div))
    bt = gm.pick_block_t(T)
    out.append(_launched("gae", "gae_scan", "_gae_kernel",
                         {"r_ptr": "*fp32", "v_ptr": "*fp32", "m_ptr": "*fp32", "adv_ptr": "*fp32", "ret_ptr": "*fp32",
                          "T": "i32", "stride_r": "i32", "stride_v": "i32", "stride_m": "i32", "gamma": "fp32",
                          "gamma_lam": "fp32", "BLOCK_T": "constexpr"}, {"BLOCK_T": bt}, gm.pick_num_warps(bt),
                         div16=("T", "stride_r", "stride_v", "stride_m")))
    out.append(_launched("rewards", "rewards", "_shape_rewards_kernel",
                         {"scores_ptr": "*fp32", "kl_ptr": "*fp32", "mask_ptr": "*fp32", "out_ptr": "*fp32",
                          "last_ptr": "*i32", "T": "i32", "stride_kl_b": "i32", "stride_mask_b": "i32",
                          "kl_coef": "fp32", "BLOCK_T": "constexpr"}, {"BLOCK_T": rw.pick_block_t(T)}, 4,
                         div16=("T", "stride_kl_b", "stride_mask_b")))
    wsig = {"x_ptr": "*fp32", "m_ptr": "*fp32"}
    if B * T <= wm.SMALL_N:  # one program
        out.append(_launched("whiten_small", "whitening", "_whiten_small_kernel",
                             {**wsig, "out_ptr": "*fp32", "N": "i32", "eps": "fp32", "add_mean": "fp32",
                              "BLOCK": "constexpr"}, {"BLOCK": wm.SMALL_BLOCK}, wm.SMALL_WARPS, div16=("N",)))
    else:
        parts = {"part_n_ptr": "*fp32", "part_mean_ptr": "*fp32", "part_m2_ptr": "*fp32"}
        out.append(_launched("whiten_partials", "whitening", "_whiten_partials_kernel",
                             {**wsig, **parts, "N": "i32", "CHUNK": "i32", "BLOCK": "constexpr"},
                             {"BLOCK": wm.BLOCK}, wm.WARPS, div16=("N", "CHUNK")))
        out.append(_launched("whiten_apply", "whitening", "_whiten_apply_kernel",
                             {**wsig, "out_ptr": "*fp32", **parts, "N": "i32", "CHUNK": "i32", "P": "i32",
                              "eps": "fp32", "add_mean": "fp32", "BLOCK": "constexpr", "P_BLOCK": "constexpr"},
                             {"BLOCK": wm.BLOCK, "P_BLOCK": wm.MAX_PARTIALS}, wm.WARPS, div16=("N", "CHUNK")))
    bt = ppo.fwd_block_t(T)
    strides = [f"s_{a}_{d}" for a in ("lp", "old", "adv", "m", "ref") for d in ("b", "t")]
    sig = {"logp_ptr": "*fp32", "old_ptr": "*fp32", "adv_ptr": "*fp32", "mask_ptr": "*fp32", "ref_ptr": "*fp32",
           "dl_ptr": "*fp32", "part_ptr": "*fp32", "T": "i32", "n_cols": "i32", **{s: "i32" for s in strides},
           "lo": "fp32", "hi": "fp32", "dual_c": "fp32", "kl_coef": "fp32",
           "KL_EST": "constexpr", "STORE_GRAD": "constexpr", "BLOCK_T": "constexpr"}
    out.append(_launched("ppo_fwd-k3", "ppo_loss", "_ppo_fwd_kernel", sig,
                         {"KL_EST": ppo.KL_CODE["k3"], "STORE_GRAD": True, "BLOCK_T": bt}, 4,
                         ones=[s for s in strides if s.endswith("_t")],
                         div16=["T", "n_cols", *(s for s in strides if s.endswith("_b"))]))
    strides = [f"s_{a}_{d}" for a in ("v", "old", "ret", "m") for d in ("b", "t")]
    for dt in ("fp32", "fp16"):  # fp16: its generic-stride compile spills 8 B (test_aot_ppo); as launched it must not
        sig = {"v_ptr": f"*{dt}", "old_ptr": f"*{dt}", "ret_ptr": f"*{dt}", "mask_ptr": "*fp32", "dl_ptr": "*fp32",
               "part_ptr": "*fp32", "T": "i32", **{s: "i32" for s in strides}, "eps": "fp32",
               "STORE_GRAD": "constexpr", "BLOCK_T": "constexpr"}
        out.append(_launched("value_fwd" + ("" if dt == "fp32" else f"-{dt}"), "value_loss", "_value_fwd_kernel", sig,
                             {"STORE_GRAD": True, "BLOCK_T": bt}, 4, ones=[s for s in strides if s.endswith("_t")],
                             div16=["T", *(s for s in strides if s.endswith("_b"))]))
    out.append(_launched("scale_grad", "_aggregate", "_scale_grad_kernel",
                         {"dl_ptr": "*fp32", "w_ptr": "*fp32", "g_ptr": "*fp32", "out_ptr": "*fp32", "T": "i32",
                          "BLOCK_T": "constexpr"}, {"BLOCK_T": agg.grad_block_t(T)}, 4, div16=("T",)))
    return out


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return compile_cases_in_child("tests.kernels.test_aot_launched:configs", tmp_path_factory.mktemp("aot_launched"))


def test_cases_use_the_cuda_launch_choices(monkeypatch):
    """The tiles compiled above are the launchers' CUDA picks (the interpreter picks smaller ones)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ids = {c.id: c for c in configs()}
    assert ids["ppo_fwd-k3"].constexprs["BLOCK_T"] == _mod("ppo_loss").fwd_block_t(T) == 1024
    assert ids["scale_grad"].constexprs["BLOCK_T"] == _mod("_aggregate").grad_block_t(T) == 1024


@pytest.mark.parametrize("cid", [c.id for c in configs()])
def test_launched_kernel_compiles_vectorized_without_spills(compiled, cid):
    assert compiled[cid] == "ok", compiled[cid]
