"""fastrlhf's kernels inside other trainers.

- ``fastrlhf.integrations.trl``: ``apply()`` / ``patched()`` swap TRL's log-prob and entropy helpers for ``fastrlhf.kernels``.
- ``fastrlhf.integrations.functional``: veRL and OpenRLHF conventions (names, argument order, clamps) on our kernels.
- ``fastrlhf.integrations.hf``: ``linear_logprobs_forward`` runs a Hugging Face causal LM's body and the fused linear
  log-probs on its LM head, without materializing logits.

Layering: these modules import ``fastrlhf.kernels`` (and transformers / trl lazily, inside functions); nothing in fastrlhf
imports them. Submodules are not imported here, so ``import fastrlhf.integrations`` pulls in neither TRL nor transformers.
"""
