"""Ahead-of-time compilation for the H100 (sm_90) of the decoder-layer kernels (RMSNorm, RoPE, SwiGLU).

Two sets, each case one test:
- every launcher configuration with generic integer arguments: RMSNorm forward / backward for each (BLOCK_H, num_warps)
  of ``rmsnorm.WARPS``; SwiGLU forward / backward at the largest tile and at 1024 columns; RoPE forward / backward at the
  head shapes below.
- as a launch at the benchmark shape specialises them (``AOTCase.as_launched``: aligned pointers, ints divisible by 16):
  qwen2-0.5b, hidden 896, intermediate 4864, 14 query / 2 key-value heads of 64, for fp32 (master weights) and bf16;
  q and k are read from the fused QKV projection (token stride (14 + 2·2)·64). These must also show 16-byte global
  loads (``ld.global.v4``) per thread: the rows are contiguous and 16-byte aligned.
No case may spill registers (``aot.check_case``); shared memory ≤ 227 KiB (``compile_for_h100``).
"""
import importlib

import pytest

from tests.helpers.aot import AOTCase, compile_cases_in_child

pytestmark = pytest.mark.slow

HIDDEN, INTER, HQ, HKV, D = 896, 4864, 14, 2, 64  # qwen2-0.5b
DTYPES = ("fp32", "bf16")


def _mod(name):
    return importlib.import_module(f"fastrlhf.kernels.{name}")


def _rms(cid, dt, block, warps, **kw):
    fwd = AOTCase(f"rms_fwd-{cid}", "rmsnorm", "_rms_fwd_kernel",
                  {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "y_ptr": f"*{dt}", "rstd_ptr": "*fp32", "H": "i32",
                   "stride_x": "i32", "stride_y": "i32", "eps": "fp32", "BLOCK_H": "constexpr"}, {"BLOCK_H": block},
                  warps, **({**kw, "div16": ("H", "stride_x", "stride_y")} if kw else {}))
    bwd = AOTCase(f"rms_bwd-{cid}", "rmsnorm", "_rms_bwd_kernel",
                  {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "rstd_ptr": "*fp32", "g_ptr": f"*{dt}", "dx_ptr": f"*{dt}",
                   "dw_part_ptr": "*fp32", "N": "i32", "H": "i32", "ROWS": "i32", "stride_x": "i32",
                   "stride_g": "i32", "stride_dx": "i32", "BLOCK_H": "constexpr"}, {"BLOCK_H": block}, warps,
                  **({**kw, "div16": ("N", "H", "stride_x", "stride_g", "stride_dx")} if kw else {}))
    return [fwd, bwd]


def _swiglu(cid, dt, block, warps, **kw):
    fwd = AOTCase(f"swiglu_fwd-{cid}", "swiglu", "_swiglu_fwd_kernel",
                  {"a_ptr": f"*{dt}", "b_ptr": f"*{dt}", "y_ptr": f"*{dt}", "F": "i32", "stride_a": "i32",
                   "stride_b": "i32", "stride_y": "i32", "BLOCK": "constexpr"}, {"BLOCK": block}, warps,
                  **({**kw, "div16": ("F", "stride_a", "stride_b", "stride_y")} if kw else {}))
    bwd = AOTCase(f"swiglu_bwd-{cid}", "swiglu", "_swiglu_bwd_kernel",
                  {"a_ptr": f"*{dt}", "b_ptr": f"*{dt}", "g_ptr": f"*{dt}", "da_ptr": f"*{dt}", "db_ptr": f"*{dt}",
                   "F": "i32", "stride_a": "i32", "stride_b": "i32", "stride_g": "i32", "stride_da": "i32",
                   "stride_db": "i32", "BLOCK": "constexpr"}, {"BLOCK": block}, warps,
                  **({**kw, "div16": ("F", "stride_a", "stride_b", "stride_g", "stride_da", "stride_db")}
                     if kw else {}))
    return [fwd, bwd]


def _rope(cid, dt, hq, hkv, d, **kw):
    bh, bd, warps = _mod("rope").launch_config(max(hq, hkv), d)
    nxt = _mod("rope").next_power_of_2
    strides = ("stride_qn", "stride_qh", "stride_kn", "stride_kh", "stride_cn", "stride_sn")
    out = []
    for backward in (False, True):
        out.append(AOTCase(f"rope_{'bwd' if backward else 'fwd'}-{cid}", "rope", "_rope_kernel",
                           {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
                            "qo_ptr": f"*{dt}", "ko_ptr": f"*{dt}", **{s: "i32" for s in strides},
                            **{c: "constexpr" for c in ("HQ", "HKV", "HALF", "BLOCK_HQ", "BLOCK_HKV", "BLOCK_D2",
                                                        "BACKWARD")}},
                           {"HQ": hq, "HKV": hkv, "HALF": d // 2, "BLOCK_HQ": bh, "BLOCK_HKV": nxt(hkv),
                            "BLOCK_D2": bd, "BACKWARD": backward}, warps,
                           **({**kw, "div16": strides} if kw else {})))
    return out


def configs():
    """[AOTCase]: every launcher configuration (generic ints) and each kernel as launched at the benchmark shape."""
    rn, sw = _mod("rmsnorm"), _mod("swiglu")
    out = []
    for block, warps in rn.WARPS:
        out += _rms(f"{block}-fp32", "fp32", block, warps)
    for block in (sw.BLOCK_MAX, 1024):
        out += _swiglu(f"{block}-bf16", "bf16", block, *sw.launch_config(block)[1:])
    for hq, hkv, d in ((32, 8, 128), (8, 8, 128)):  # Llama-3-8B-like and MHA heads of 128
        out += _rope(f"{hq}x{hkv}x{d}-bf16", "bf16", hq, hkv, d)
    launched = dict(as_launched=True, load_bytes=16)
    for dt in DTYPES:
        out += _rms(f"qwen05b-{dt}", dt, *rn.launch_config(HIDDEN), **launched)
        out += _swiglu(f"qwen05b-{dt}", dt, *sw.launch_config(INTER), **launched)
        out += _rope(f"qwen05b-{dt}", dt, HQ, HKV, D, **launched)
    return out


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return compile_cases_in_child("tests.kernels.test_aot_decoder:configs", tmp_path_factory.mktemp("aot_decoder"))


def test_launch_configs_at_the_benchmark_shape():
    """The tiles compiled above are the launchers' picks at qwen2-0.5b's shapes."""
    assert _mod("rmsnorm").launch_config(HIDDEN) == (1024, 4)
    assert _mod("swiglu").launch_config(INTER) == (2048, 8)
    assert _mod("rope").launch_config(HQ, D) == (16, 32, 2)
    rn = _mod("rmsnorm")
    warps = dict(rn.WARPS)
    for h in range(1, rn.MAX_H + 1, 37):  # every pick has the warps of its WARPS entry, compiled above
        block, w = rn.launch_config(h)
        assert w == warps[min(b for b in warps if b >= block)]
    with pytest.raises(ValueError, match="not supported"):
        rn.launch_config(rn.MAX_H + 1)


@pytest.mark.parametrize("cid", [c.id for c in configs()])
def test_compiles_for_h100(compiled, cid):
    assert compiled[cid] == "ok", compiled[cid]
