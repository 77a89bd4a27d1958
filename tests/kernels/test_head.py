"""kernels.head: one head numerics for sampling and training (compute-dtype operands, fp32 accumulation)."""
import pytest
import torch

from fastrlhf.kernels.head import compute_dtype, head_kl, head_logits, head_logprobs


@pytest.mark.parametrize("autocast", (False, True))
def test_logits_and_logprobs_share_operands(autocast):
    """The sampler's fp32 logits and the fused log-probs see the same (rounded) operands: log_softmax of head_logits
    at the label equals head_logprobs to fp32 summation-order rounding; under bf16 autocast both differ from the fp32
    operands' result by far more than that (so the test sees which operands were used)."""
    h = torch.randn(7, 48)
    w = torch.randn(301, 48) * 0.3
    y = torch.randint(0, 301, (7,))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        assert compute_dtype(w) == (torch.bfloat16 if autocast else torch.float32)
        z = head_logits(h, w)
        lp = head_logprobs(h, w, y, temperature=0.8)
    assert z.dtype == torch.float32 and lp.dtype == torch.float32
    want = torch.log_softmax(z.double() / 0.8, -1).gather(-1, y[:, None]).squeeze(-1)
    torch.testing.assert_close(lp.double(), want, rtol=0, atol=2e-5)
    if autocast:
        exact = torch.log_softmax((h.bfloat16().double() @ w.bfloat16().double().t()) / 0.8, -1)
        torch.testing.assert_close(lp.double(), exact.gather(-1, y[:, None]).squeeze(-1), rtol=0, atol=2e-5)
        fp32_ops = torch.log_softmax((h.double() @ w.double().t()) / 0.8, -1).gather(-1, y[:, None]).squeeze(-1)
        assert (lp.double() - fp32_ops).abs().max() > 1e-3


def test_head_kl_zero_for_the_same_head_and_gradient_to_fp32_masters():
    h = torch.randn(2, 5, 24, requires_grad=True)
    w = (torch.randn(77, 24) * 0.3).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kl = head_kl(h, w, h.detach(), w.detach(), mask=torch.ones(2, 5))
        (kl.sum() + head_logprobs(h, w, torch.zeros(2, 5, dtype=torch.long)).sum()).backward()
    assert torch.equal(kl, torch.zeros_like(kl))
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32 and w.grad.abs().sum() > 0
