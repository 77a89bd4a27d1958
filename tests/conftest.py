"""Shared test set-up.

Without a GPU the Triton kernels run in Triton's CPU interpreter: ``TRITON_INTERPRET=1`` must be in the environment
before any ``@triton.jit`` function is defined, so it is set here, before the tests import ``fastrlhf``.
On a CUDA machine the same tests run the compiled kernels at real shapes (``on_cuda`` / ``pick``).
"""
import os

import torch

ON_CUDA = torch.cuda.is_available()
if not ON_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

import pytest  # noqa: E402


@pytest.fixture
def device() -> str:
    return "cuda" if ON_CUDA else "cpu"


def pick(small, real):
    """A shape for this machine: ``small`` under the CPU interpreter, ``real`` on CUDA."""
    return real if ON_CUDA else small


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs every run; a failing test reports its seed (replay with FASTRLHF_TEST_SEED=<seed>)."""
    seed = int(os.environ.get("FASTRLHF_TEST_SEED", torch.seed() % (2**31)))
    torch.manual_seed(seed)
    request.node._fastrlhf_seed = seed
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seed = getattr(item, "_fastrlhf_seed", None)
    if report.failed and seed is not None:
        report.sections.append(("random seed", f"FASTRLHF_TEST_SEED={seed}"))
