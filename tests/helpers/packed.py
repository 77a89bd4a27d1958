"""What the packed-forward tests compare: every output of a ResponseBatch at the valid response tokens, and one pass
of grpo_update run two ways."""
import copy

import pytest
import torch

from tests.helpers.tolerances import FP32_MODEL, assert_close


@torch.no_grad()
def response_outputs(rb, pol, ref, val, rm, mask) -> dict:
    """Log-probs and entropies (τ = 0.7), values, RM scores, the full KL to ``ref`` and the hidden states of ``rb``'s
    rows; [B, G] (hidden [B, G, H]) zeroed at invalid tokens, scores [B]."""
    h, h_ref = rb.hidden(pol), rb.hidden(ref)
    lp, ent = rb.logprobs(pol, temperature=0.7, return_entropy=True, hidden=h)
    return dict(lp=lp * mask, ent=ent * mask, val=rb.values(val) * mask, score=rb.scores(rm),
                kl=rb.full_kl(h, pol.lm_head_weight, h_ref, ref.lm_head_weight, temperature=0.7) * mask,
                h=rb.to_grid(h) * mask[..., None])


def same_grpo_updates(pol0, batch, variants: list[dict], seed: int, **update_kw) -> None:
    """One pass of ``grpo_update`` (SGD lr 0.1, μ = 1) on copies of ``pol0``, once per keyword set in ``variants``
    (e.g. padding_free False / True): the same statistics, and weight updates equal up to fp32 rounding (compared like
    gradients, plus one fp32 ulp of the weights for storing them); the step must move the weights."""
    from fastrlhf.stages.grpo_core import grpo_update
    out = []
    for kw in variants:
        pol = copy.deepcopy(pol0)
        st = grpo_update(batch, policy=pol, optimizer=torch.optim.SGD(pol.parameters(), lr=0.1), mu=1,
                         clip_eps_low=0.2, clip_eps_high=0.28, kl_coef=0.1, kl_estimator="k3", temperature=0.8,
                         max_grad_norm=None, autocast=torch.enable_grad, generator=torch.Generator().manual_seed(seed),
                         **update_kw, **kw)
        out.append((st, pol))
    (sa, pa), (sb, pb) = out
    for k in ("policy_loss", "clipfrac", "approx_kl", "kl", "entropy"):
        assert sb[k] == pytest.approx(sa[k], rel=FP32_MODEL["rtol"], abs=FP32_MODEL["atol"]), k
    for (n, p0), p, q in zip(pol0.named_parameters(), pa.parameters(), pb.parameters()):
        start = p0.detach()
        assert_close(q - start, p - start, rtol=FP32_MODEL["rtol"], atol=2.0**-23 * float(start.abs().max()),
                     atol_rel=2e-5, what=f"{n} (seed {seed})")
    assert any(not torch.equal(p, q) for p, q in zip(pa.parameters(), pol0.parameters()))  # the step moved the weights
