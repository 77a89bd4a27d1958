"""The layers of the package (docs/LAYOUT.md): imports point down only, and the kernels lift out alone.

Layers, lowest first: kernels < models, engine < runtime < stages < tools. integrations sits beside them and may import
kernels and models only. Every ``import`` statement of every module (top level or inside a function) is read with ``ast``.
"""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "fastrlhf"
RANK = {"kernels": 0, "models": 1, "engine": 1, "runtime": 2, "stages": 3, "tools": 4, "__main__": 5}
ALLOWED_BESIDE = {"integrations": {"kernels", "models"}}


def _layer(module: str) -> str | None:
    """fastrlhf.<layer>.x -> <layer>; None for the package root itself."""
    parts = module.split(".")
    if parts[0] != "fastrlhf" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in RANK or parts[1] in ALLOWED_BESIDE else "other:" + parts[1]


def _imports(path: Path, module: str) -> list[str]:
    """Absolute names of the fastrlhf modules imported by one source file (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    pkg = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append(name)
            out += [f"{name}.{a.name}" for a in node.names]  # `from fastrlhf import stages` names a module too
    return [n for n in out if n.split(".")[0] == "fastrlhf"]


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield path, ".".join(parts)
    for path in sorted((ROOT / "kernels").glob("*.py")):
        name = "fastrlhf.kernels" + ("" if path.stem == "__init__" else f".{path.stem}")
        yield path, name


def test_imports_point_down_only():
    bad = []
    for path, module in _modules():
        src = _layer(module)
        if src is None:
            continue
        for target in _imports(path, module):
            dst = _layer(target)
            if dst is None or dst == src or target == "fastrlhf.__version__":
                continue
            if src in ALLOWED_BESIDE:
                ok = dst in ALLOWED_BESIDE[src]
            elif dst in ALLOWED_BESIDE or dst.startswith("other:"):
                ok = False
            else:
                ok = RANK[dst] < RANK[src] or (RANK[dst] == RANK[src] and dst == src)
            if not ok:
                bad.append(f"{path.relative_to(ROOT)}: {module} ({src}) imports {target} ({dst})")
    assert not bad, "imports that point up or sideways:\n" + "\n".join(bad)


def test_models_and_engine_are_independent():
    """models and engine share a floor: neither imports the other (the engine takes any model with the CausalLM API)."""
    for path, module in _modules():
        src = _layer(module)
        if src in ("models", "engine"):
            other = "engine" if src == "models" else "models"
            assert not [t for t in _imports(path, module) if _layer(t) == other], path


def test_no_module_imports_benchmarks():
    for path, module in _modules():
        assert not [t for t in _imports(path, module) if t.startswith("fastrlhf.benchmarks")], path


def _run(code: str, env=None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def test_kernels_import_with_torch_triton_numpy_only():
    code = (
        "import sys, torch, triton, numpy\n"
        "top = lambda: {m.split('.')[0] for m in sys.modules}\n"
        "before = top()\n"
        "import fastrlhf.kernels\n"
        "new = sorted(top() - before - set(sys.stdlib_module_names) - {'fastrlhf'})\n"
        "ours = sorted(m for m in sys.modules if m.startswith('fastrlhf') and m != 'fastrlhf'"
        " and not m.startswith('fastrlhf.kernels'))\n"
        "print(new, ours)\n"
    )
    p = _run(code)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[] []", p.stdout


def test_kernels_lift_out_without_the_cpp_build(tmp_path):
    """kernels/ copied alone (no fastrlhf, no compiled _C) is a working package: GAE and whitening fall back to their
    PyTorch references and agree with them."""
    dst = tmp_path / "liftedkernels"
    shutil.copytree(ROOT / "kernels", dst, ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    code = (
        "import sys, torch\n"
        "import liftedkernels as K\n"
        "from liftedkernels._native import native\n"
        "assert native() is None\n"
        "assert not [m for m in sys.modules if m.startswith('fastrlhf')], 'imported fastrlhf'\n"
        "g = torch.Generator().manual_seed(0)\n"
        "r, v = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)\n"
        "m = torch.rand(3, 7, generator=g) > 0.3\n"
        "from liftedkernels.gae_scan import gae_ref\n"
        "from liftedkernels.whitening import whiten_ref\n"
        "a, ret = K.gae(r, v, m, gamma=0.99, lam=0.95)\n"
        "a0, ret0 = gae_ref(r, v, m, gamma=0.99, lam=0.95)\n"
        "torch.testing.assert_close(a, a0); torch.testing.assert_close(ret, ret0)\n"
        "torch.testing.assert_close(K.whiten(r, m), whiten_ref(r, m))\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(tmp_path)
    env["FASTRLHF_KERNEL_BACKEND"] = "auto"
    p = _run(code, env=env, cwd=tmp_path)
    if "No module named 'fastrlhf'" in p.stderr:
        pytest.fail("the lifted kernels import fastrlhf:\n" + p.stderr)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


def _tracked_text_files():
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:  # not a git checkout (e.g. an sdist): every file below the root
        return [p.relative_to(ROOT) for p in ROOT.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return [Path(line) for line in out.stdout.splitlines()]


def test_docs_stay_inside_the_repository():
    """Every markdown document a docstring, comment or doc names is a file of this repository (the docs live in
    docs/): a name that resolves nowhere here points at something users do not have. Outside the tests (where a
    path-traversal string is an attack under test), a relative folder ``../name/`` must be a folder of the repository."""
    import re

    files = [f for f in _tracked_text_files()
             if f.suffix in (".py", ".md", ".sh", ".toml", ".cpp", ".h", ".txt", ".yaml", ".yml", ".sbatch")]
    docs = {str(f) for f in _tracked_text_files() if f.suffix == ".md"}
    names = {Path(d).name for d in docs}
    written = {"summary.md"}  # a report benchmarks/run_gpu_check.py writes into its output folder
    bad = []
    for rel in files:
        text = (ROOT / rel).read_text(encoding="utf-8", errors="replace")
        for ref in re.findall(r"[A-Za-z0-9_./-]*[A-Za-z0-9_]\.md\b", text):
            ref = ref.lstrip("./")
            if ref not in docs and not ("/" not in ref and ref in names) and ref not in written:
                bad.append(f"{rel}: {ref}")
        for ref in re.findall(r"\.\./([A-Za-z_][\w-]*)/", text) if rel.parts[0] != "tests" else ():  # tests: attacks
            if not (ROOT / ref).is_dir():  # ../kernels from inside fastrlhf/ is fine; anything above the root is not
                bad.append(f"{rel}: ../{ref}/")
    assert not bad, "references to files this repository does not have:\n" + "\n".join(bad)
