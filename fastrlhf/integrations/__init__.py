"""fastrlhf's kernels inside other trainers.

- ``fastrlhf.integrations.trl``: ``apply()`` / ``patched()`` swap TRL's log-prob and entropy helpers for ``fastrlhf.kernels``.
- ``fastrlhf.integrations.verl`` / ``.openrlhf``: ``apply()`` / ``patched()`` swap veRL 0.9's / OpenRLHF 0.11's own
  log-prob, KL, GAE, whitening, policy / value loss and KL-controller functions for ones on our kernels (same signatures).
- ``fastrlhf.integrations.functional``: those functions as ``verl`` / ``openrlhf`` namespaces, and TRL's GRPO loss.
- ``fastrlhf.integrations.hf``: ``linear_logprobs_forward`` runs a Hugging Face causal LM's body and the fused linear
  log-probs on its LM head, without materializing logits.

Layering: these modules import ``fastrlhf.kernels`` (and transformers / trl lazily, inside functions); nothing in fastrlhf
imports them. Submodules are not imported here, so ``import fastrlhf.integrations`` pulls in neither TRL nor transformers
(nor veRL / OpenRLHF, which ``apply()`` imports).
"""
