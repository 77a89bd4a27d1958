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


def test_docs_stay_inside_the_repository():
    """No docstring, comment or doc points at files outside this repository (the docs live in docs/)."""
    outside = ("KERNELS.md", "ANCHORS.md", "ARCHITECTURE.md", "STYLE.md", "../shared", "shared/")
    bad = []
    for path in sorted(ROOT.rglob("*")):
        rel = path.relative_to(ROOT)
        if not path.is_file() or rel.parts[0] in (".git", "build") or "__pycache__" in rel.parts or ".egg-info" in str(rel):
            continue
        if path.suffix not in (".py", ".md", ".sh", ".toml", ".cpp", ".h", ".txt", ".yaml", ".yml"):
            continue
        if rel == Path("tests/test_layout.py"):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        bad += [f"{rel}: {word}" for word in outside if word in text]
    assert not bad, "references to files outside the repository:\n" + "\n".join(bad)
