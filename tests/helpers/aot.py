"""Ahead-of-time compilation of Triton kernels for the H100 (sm_90) without a GPU.

The interpreter does not compile, so a kernel that runs under ``TRITON_INTERPRET=1`` can still fail to compile (or spill
past shared memory) on the real device. ``compile_for_h100`` runs Triton's full pipeline down to a cubin (ptxas ships
with triton) and returns the compiled kernel; each ``tests/kernels/test_aot_*.py`` lists every configuration its
launchers can pick as ``AOTCase``s (its ``configs()``) and compiles them all with ``compile_cases_in_child``.

What the compile output shows without a GPU (``analyze``): ptxas' registers and stack frame, Triton's shared memory, the
SASS opcodes (``cuobjdump``, bundled with Triton: HGMMA = wgmma, LDL / STL = spills) and the width of the PTX's global
loads. ``check_case`` turns them into the regression checks each case asks for (no spills, wgmma, 16-byte loads, a
register bound). Not available here: anything the driver reports at load time (the occupancy it grants, the cubin
actually loading under the installed driver) and, of course, time.

Why a child process: with TRITON_INTERPRET=1 (set by conftest on CPU) every ``@triton.jit`` function — the kernels, the
jit helpers they call, the combine functions behind ``tl.sum`` / ``tl.associative_scan`` — is an interpreter object, and
compiling from it fails (nested jit calls cannot be inlined, while-loop carried values reach the code generator as raw
IR values). So one child Python per test module, with TRITON_INTERPRET removed from its environment, compiles every case
(in 2 worker processes) and writes ``{id: "ok" | error text}`` as JSON; each case is then one test in the parent.
"""
from __future__ import annotations

import collections
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

H100 = GPUTarget("cuda", 90, 32)
H100_SMEM_BYTES = 227 * 1024  # max dynamic shared memory per block on sm_90
ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class AOTCase:
    """One kernel configuration to compile for sm_90.

    id: test id. module / kernel: ``fastrlhf.kernels.<module>.<kernel>`` (the module, not the package's re-exported
    function of the same name). signature: {arg: "*bf16" | "*fp32" | "i32" | "i64" | "fp32" | "constexpr" ...};
    constexprs: {arg: value} for every constexpr arg.
    as_launched: specialize like the CUDA JIT specializes a real launch (triton 3.6: ints == 1 become constexpr 1,
    16-byte-aligned pointers and 16-divisible ints carry ``tt.divisibility=16``): every pointer is taken as aligned,
    ``ones`` names the int args that are 1 (contiguous inner strides) and ``div16`` the ints divisible by 16. Only
    then does Triton vectorize loads and software-pipeline ``tl.dot`` loops, so this is the shared memory that must fit.
    pipelined: also require the PTX to use cp.async (the pipelined K loop).
    Every case must compile without register spills or a stack frame (``analyze``: ptxas' STACK = 0, no LDL/STL in the
    SASS). wgmma: also require Hopper's warpgroup MMA (``wgmma.mma_async`` in the PTX, HGMMA in the SASS): every bf16 /
    fp16 ``tl.dot`` kernel. load_bytes: the widest global load must be this many bytes per thread (16: ``ld.global.v4``
    of 32-bit words), what a contiguous, 16-byte-aligned row gives when the kernel's layout vectorizes it.
    max_regs: registers per thread at most (the occupancy a kernel is designed for: 65536 / (regs · 32 · warps) CTAs/SM).
    spills_ok: why spills are tolerated for this case (empty: they are not), e.g. a generic-stride fallback compile whose
    real-launch twin is checked.
    """

    id: str
    module: str
    kernel: str
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    as_launched: bool = False
    ones: tuple = ()
    div16: tuple = ()
    pipelined: bool = False
    wgmma: bool = False
    load_bytes: int | None = None
    max_regs: int | None = None
    spills_ok: str = ""

    def __post_init__(self):
        missing = [k for k, v in self.signature.items() if v == "constexpr" and k not in self.constexprs]
        if missing:
            raise ValueError(f"AOTCase {self.id}: constexpr args {missing} have no value in constexprs")
        unknown = [k for k in (*self.ones, *self.div16) if k not in self.signature]
        if unknown:
            raise ValueError(f"AOTCase {self.id}: ones/div16 name args {unknown} not in the signature")
        if (self.ones or self.div16) and not self.as_launched:
            raise ValueError(f"AOTCase {self.id}: ones/div16 only apply with as_launched=True")
        if self.load_bytes is not None and not self.as_launched:
            raise ValueError(f"AOTCase {self.id}: load_bytes needs as_launched=True (unspecialized loads are scalar)")

    def compile_args(self) -> tuple[dict, dict, dict]:
        """(signature, constexprs, attrs) for ``compile_for_h100``."""
        if not self.as_launched:
            return dict(self.signature), dict(self.constexprs), {}
        sig, const = dict(self.signature), dict(self.constexprs)
        for k in self.ones:  # a stride of 1 is specialized away: constexpr 1
            sig[k], const[k] = "constexpr", 1
        div = [i for i, (k, v) in enumerate(sig.items()) if v.startswith("*") or k in self.div16]
        return sig, const, {(i,): [["tt.divisibility", 16]] for i in div}


def compile_for_h100(fn, signature: dict, constexprs: dict, *, num_warps: int = 4, num_stages: int = 3,
                     attrs: dict | None = None):
    """Compile ``fn`` (a ``@triton.jit`` function; under the interpreter its ``.fn`` is unwrapped) for sm_90.

    signature: {arg name: triton type string, e.g. "*bf16", "*fp32", "i32", "i64", "fp32", or "constexpr"}.
    constexprs: {arg name: value} for every constexpr argument.
    attrs: {(arg index,): [["tt.divisibility", 16]]} as a real launch specializes (see ``AOTCase.compile_args``).
    Returns the CompiledKernel; asserts its shared memory fits the H100. Kernels that call other jit functions or have
    while loops only compile with TRITON_INTERPRET unset: use ``compile_cases_in_child``.
    """
    jit_fn = fn
    # Under TRITON_INTERPRET=1, @triton.jit returns an InterpretedFunction: compile the underlying JITFunction instead.
    if not isinstance(jit_fn, triton.runtime.JITFunction):
        jit_fn = triton.runtime.JITFunction(getattr(fn, "fn", fn))
    src = ASTSource(fn=jit_fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=H100, options={"num_warps": num_warps, "num_stages": num_stages})
    assert "cubin" in compiled.asm, "no cubin produced"
    smem = compiled.metadata.shared
    name = getattr(fn, "__name__", fn)
    assert smem <= H100_SMEM_BYTES, f"{name}: {smem} B shared memory > H100's {H100_SMEM_BYTES} B"
    return compiled


_ELEM_BITS = re.compile(r"\.[bsuf](8|16|32|64)\b")


def ptx_global_loads(ptx: str) -> collections.Counter:
    """{bytes per thread: count} of the ``ld.global`` instructions in ``ptx`` (``ld.global.v4.b32`` → 16)."""
    out = collections.Counter()
    for op in re.findall(r"\bld\.global[\w.]*", ptx):
        vec = re.search(r"\.v(\d+)\b", op)
        bits = _ELEM_BITS.findall(op)
        out[(int(vec.group(1)) if vec else 1) * int(bits[-1]) // 8 if bits else 0] += 1
    return out


def _cuobjdump(args: list, cubin: bytes) -> str:
    from triton import knobs

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(cubin)
        return subprocess.run([knobs.nvidia.cuobjdump.path, *args, str(path)], check=True, capture_output=True,
                              text=True).stdout


def analyze(compiled) -> dict:
    """What the compile output says about a kernel, without a GPU.

    regs / stack / local: ptxas' resource usage of the cubin (``cuobjdump --dump-resource-usage``; STACK > 0 means a
    stack frame, where spills go); shared: Triton's shared memory (bytes); sass: {opcode: count} of the SASS
    (``cuobjdump --dump-sass``: HGMMA = wgmma, LDL / STL = local-memory loads / stores, i.e. spills); wgmma: number of
    ``wgmma.mma_async`` in the PTX; loads: {bytes per thread: count} of the PTX's global loads.
    """
    cubin, ptx = compiled.asm["cubin"], compiled.asm["ptx"]
    res = _cuobjdump(["--dump-resource-usage"], cubin)
    fields = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", res))
    sass = _cuobjdump(["--dump-sass"], cubin)
    ops = collections.Counter(re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass))
    return dict(regs=int(fields["REG"]), stack=int(fields["STACK"]), local=int(fields["LOCAL"]),
                shared=int(compiled.metadata.shared), sass=dict(ops), wgmma=ptx.count("wgmma.mma_async"),
                loads={str(k): v for k, v in sorted(ptx_global_loads(ptx).items())})


def check_case(case: AOTCase, a: dict, ptx: str) -> list:
    """The expectations of ``case`` that the analysis ``a`` (``analyze``) breaks, as readable lines (empty: all met)."""
    bad = []
    spill_ops = {op: a["sass"].get(op, 0) for op in ("LDL", "STL") if a["sass"].get(op, 0)}
    if (a["stack"] or a["local"] or spill_ops) and not case.spills_ok:
        bad.append(f"register spills: {a['regs']} registers, stack {a['stack']} B, local {a['local']} B, {spill_ops}")
    if case.pipelined and "cp.async" not in ptx:
        bad.append(f"not pipelined: no cp.async in the PTX (smem={a['shared']} B)")
    if case.wgmma and not (a["wgmma"] and a["sass"].get("HGMMA")):
        mma = {k: v for k, v in a["sass"].items() if "MMA" in k or k == "FFMA"}
        bad.append(f"no wgmma: {a['wgmma']} wgmma.mma_async in the PTX, SASS {mma}")
    widest = max((int(k) for k in a["loads"]), default=0)
    if case.load_bytes is not None and widest != case.load_bytes:
        bad.append(f"global loads {a['loads']} (bytes per thread: count): widest {widest} B, expected "
                   f"{case.load_bytes} B")
    if case.max_regs is not None and a["regs"] > case.max_regs:
        bad.append(f"{a['regs']} registers > {case.max_regs}")
    return bad


def compile_case(case: AOTCase) -> tuple[str, str, dict]:
    """Compile one case → (id, "ok" | what failed, the ``analyze`` dict or {})."""
    try:
        fn = getattr(importlib.import_module(f"fastrlhf.kernels.{case.module}"), case.kernel)
        sig, const, attrs = case.compile_args()
        k = compile_for_h100(fn, sig, const, num_warps=case.num_warps, num_stages=case.num_stages, attrs=attrs)
        a = analyze(k)
        bad = check_case(case, a, k.asm["ptx"])
        return case.id, ("ok" if not bad else "; ".join(bad)), a
    except Exception as e:  # reported per case by the test that owns it
        return case.id, f"{type(e).__name__}: {e}"[-4000:], {}


def _load_cases(provider: str) -> list:
    """"package.module:function" → that function's list of AOTCase."""
    mod, _, attr = provider.partition(":")
    cases = getattr(importlib.import_module(mod), attr)()
    ids = [c.id for c in cases]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{provider}: duplicate case ids {sorted({i for i in ids if ids.count(i) > 1})}")
    return cases


def _child_main(provider: str, path: str, workers: int) -> None:
    """Child side: compile every case of ``provider`` in ``workers`` processes; write {id: result} JSON to ``path``."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    cases = _load_cases(provider)
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        done = list(pool.map(compile_case, cases))
    Path(path).write_text(json.dumps({cid: res for cid, res, _ in done}))
    Path(path).with_suffix(".analysis.json").write_text(json.dumps({cid: a for cid, _, a in done}, indent=1))


def compile_cases_in_child(cases_provider: str, tmp_dir, *, workers: int = 2, timeout: float = 900) -> dict:
    """Compile every case returned by ``cases_provider`` ("tests.kernels.test_aot_rl:configs") in a child Python with
    TRITON_INTERPRET removed from its environment; returns {case id: "ok" | error text}. Each case's ``analyze`` dict
    (registers, stack, shared memory, SASS opcode counts, load widths) is written beside it, to
    ``aot_results.analysis.json``, and with ``FASTRLHF_AOT_REPORT=DIR`` also copied to ``DIR/<provider module>.json``."""
    path = Path(tmp_dir) / "aot_results.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = f"import tests.helpers.aot as a; a._child_main({cases_provider!r}, {str(path)!r}, {int(workers)})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"AOT child for {cases_provider} failed:\n{proc.stderr[-4000:]}"
    report_dir = os.environ.get("FASTRLHF_AOT_REPORT")
    if report_dir:
        Path(report_dir).mkdir(parents=True, exist_ok=True)
        name = cases_provider.partition(":")[0].rpartition(".")[2]
        (Path(report_dir) / f"{name}.json").write_text(path.with_suffix(".analysis.json").read_text())
    return json.loads(path.read_text())
