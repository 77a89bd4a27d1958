"""``fastrlhf selfcheck``: run every kernel on this machine against its float64 reference and print a table.

For each op: random inputs (odd sizes, masks with holes), the op in fp32 on the active backend vs ``*_ref`` in float64,
forward outputs and gradients (with a random upstream gradient). The tolerance is relative to plain PyTorch's own error:
an op passes when its error is at most 2x the error of ``*_ref`` run in fp32, where that baseline error is floored at
4 fp32 ulps of the largest output (one sample of rounding noise can be luckily small; a reduction over V terms summed in
another order legitimately differs by a few ulps of its magnitude).
``--backend triton`` on a machine without CUDA runs the Triton interpreter (slow; the sizes are small).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable

import torch


def _cases(K) -> list[tuple[str, Callable, Callable, list[str]]]:
    """(name, make_inputs(gen) -> dict of float64/int tensors, call(fn, inputs) -> list of outputs, grad args)."""
    B, T, V, H = 3, 11, 97, 24

    def mask(g):
        m = (torch.rand(B, T, generator=g) > 0.25).double()
        m[0, :2] = 0          # left padding
        m[1, -3:] = 0         # right padding
        m[2] = 0              # an entirely masked row
        m[2, 4] = 1
        return m

    def logits(g):
        return {"logits": torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3,
                "labels": torch.randint(0, V, (B, T), generator=g)}

    def linear(g):
        return {"hidden": torch.randn(B, T, H, generator=g, dtype=torch.float64),
                "weight": torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5,
                "labels": torch.randint(0, V, (B, T), generator=g)}

    def pair(g):
        return {"a": torch.randn(B, T, generator=g, dtype=torch.float64),
                "b": torch.randn(B, T, generator=g, dtype=torch.float64)}

    def rewards(g):
        return {"scores": torch.randn(B, generator=g, dtype=torch.float64),
                "kl": torch.randn(B, T, generator=g, dtype=torch.float64).abs(), "mask": mask(g)}

    def gae_in(g):
        return {"rewards": torch.randn(B, T, generator=g, dtype=torch.float64),
                "values": torch.randn(B, T, generator=g, dtype=torch.float64), "mask": mask(g)}

    def whiten_in(g):
        return {"x": torch.randn(B, T, generator=g, dtype=torch.float64) * 2 + 1, "mask": mask(g)}

    def policy(g):
        lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
        return {"logp": lp, "old": lp + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64),
                "adv": torch.randn(B, T, generator=g, dtype=torch.float64), "mask": mask(g)}

    def value(g):
        v = torch.randn(B, T, generator=g, dtype=torch.float64)
        return {"v": v, "old": v + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64),
                "ret": torch.randn(B, T, generator=g, dtype=torch.float64), "mask": mask(g)}

    def loss_and_metrics(out):
        loss, stats = out
        return [loss] + [torch.as_tensor(stats[k], dtype=loss.dtype) for k in sorted(stats)]

    return [
        ("logprobs_from_logits", logits, lambda f, x: list(f(x["logits"], x["labels"], temperature=0.7,
                                                              return_entropy=True)), ["logits"]),
        ("linear_logprobs", linear, lambda f, x: list(f(x["hidden"], x["weight"], x["labels"], temperature=0.7,
                                                         return_entropy=True)), ["hidden", "weight"]),
        ("kl_penalty k3", pair, lambda f, x: [f(x["a"], x["b"], estimator="k3")], ["a", "b"]),
        ("kl_penalty k2", pair, lambda f, x: [f(x["a"], x["b"], estimator="k2")], ["a", "b"]),
        ("shape_rewards", rewards, lambda f, x: [f(x["scores"], x["kl"], x["mask"], kl_coef=0.05)], ["scores", "kl"]),
        ("gae", gae_in, lambda f, x: list(f(x["rewards"], x["values"], x["mask"], gamma=0.99, lam=0.95)), []),
        ("whiten", whiten_in, lambda f, x: [f(x["x"], x["mask"])], []),
        ("ppo_policy_loss", policy, lambda f, x: loss_and_metrics(f(x["logp"], x["old"], x["adv"], x["mask"],
                                                                    clip_eps=0.2)), ["logp"]),
        ("ppo_value_loss", value, lambda f, x: loss_and_metrics(f(x["v"], x["old"], x["ret"], x["mask"],
                                                                  clip_eps=0.2)), ["v"]),
    ]


def _run(call, fn, inputs, dtype, grad_args, upstream):
    x = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()}
    for k in grad_args:
        x[k] = x[k].detach().clone().requires_grad_(True)
    outs = call(fn, x)
    grads = []
    if grad_args:
        diff = [o for o in outs if o.requires_grad]
        total = sum((o.double() * u[: o.numel()].view_as(o)).sum() for o, u in zip(diff, upstream))
        grads = list(torch.autograd.grad(total, [x[k] for k in grad_args]))
    return [o.detach().double() for o in outs], [g.double() for g in grads]


def _err(a: list, b: list) -> float:
    return max([float((x - y).abs().max()) if x.numel() else 0.0 for x, y in zip(a, b)] or [0.0])


def _tol(base: list, want: list) -> float:
    """2 x max(fp32 baseline error, 4 ulp of the largest |output|)."""
    scale = max([float(w.abs().max()) if w.numel() else 0.0 for w in want] or [0.0])
    return 2 * max(_err(base, want), 4 * torch.finfo(torch.float32).eps * scale)


def run(backend: str = "auto", seed: int = 0, out=None) -> bool:
    """Print the table (to ``out``, default stdout); True when every op passes."""
    out = out or sys.stdout
    import fastrlhf.kernels as K
    g = torch.Generator().manual_seed(seed)
    rows, ok = [], True
    with K.backend(backend):
        active = K.get_backend()
        for name, make, call, grad_args in _cases(K):
            base = name.split(" ")[0]
            fn, ref = getattr(K, base), getattr(K, base + "_ref")
            inputs = make(g)
            upstream = [torch.randn(4096, generator=g, dtype=torch.float64) for _ in range(4)]
            t0 = time.perf_counter()
            try:
                got_o, got_g = _run(call, fn, inputs, torch.float32, grad_args, upstream)
                status = None
            except Exception as e:  # report, keep going
                status, got_o, got_g = f"ERROR {type(e).__name__}: {e}"[:70], None, None
            dt = time.perf_counter() - t0
            want_o, want_g = _run(call, ref, inputs, torch.float64, grad_args, upstream)
            base_o, base_g = _run(call, ref, inputs, torch.float32, grad_args, upstream)
            tol_o, tol_g = _tol(base_o, want_o), _tol(base_g, want_g)
            if status is None:
                e_o, e_g = _err(got_o, want_o), _err(got_g, want_g)
                passed = e_o <= tol_o and e_g <= tol_g
                status = "ok" if passed else "FAIL"
            else:
                e_o = e_g = float("nan")
                passed = False
            ok &= passed
            rows.append((name, f"{e_o:.2e}", f"{tol_o:.2e}", f"{e_g:.2e}" if grad_args else "-",
                         f"{tol_g:.2e}" if grad_args else "-", f"{dt * 1e3:.1f}", status))
    head = ("op", "fwd err", "fwd tol", "grad err", "grad tol", "ms", "status")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"fastrlhf selfcheck: backend {active} on {dev}; fp32 op vs float64 *_ref; tol = 2 x max(fp32 *_ref error, 4 ulp)",
          file=out)
    print(line(head), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for r in rows:
        print(line(r), file=out)
    print(f"{sum(r[-1] == 'ok' for r in rows)}/{len(rows)} ops pass", file=out)
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastrlhf selfcheck", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"),
                   help="kernel backend (auto: Triton on CUDA, PyTorch/C++ on CPU; triton on CPU = interpreter)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    a = p.parse_args(argv)
    if a.backend == "triton" and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before the kernels module defines its jit functions
    return 0 if run(a.backend, a.seed) else 1
