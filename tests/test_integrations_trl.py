"""fastrlhf.integrations.trl: the stand-ins against float64 references, the version / signature guards, and TRL's GRPO
trainer on CPU for a few steps with and without ``apply()`` (same losses, log-probs and entropies; our kernels called).

Tolerances (fp32 everywhere here): plain PyTorch's fp32 log-softmax is within ~1e-6 of float64 at these vocabularies;
we allow 1e-5 absolute on log-probs / entropies and 1e-4 relative on gradients (fp32 sums over V and H of O(1) terms),
which is still four orders of magnitude below the 0.2 PPO clip the log-probs feed. The GRPO run compares two fp32
trainings after up to 3 Adam steps at lr 1e-3: per-step differences stay at fp32 rounding (~1e-6), allowed 1e-4.
"""
from __future__ import annotations

import warnings

import pytest
import torch

trl = pytest.importorskip("trl")  # test dependency: installed by the README's test command (pip install -e ".[test]")

from fastrlhf.integrations import trl as ft  # noqa: E402
from tests.helpers.tolerances import FP32_MODEL

KEY = ft._plan_for(trl.__version__, allow_untested=False)[0]
KNOWN = KEY is not None


def _ref_logp_ent(z64: torch.Tensor, y: torch.Tensor):
    """float64 reference: logp = z[y] − LSE(z), H = LSE(z) − Σ softmax(z)·z (docs/kernels.md)."""
    lse = torch.logsumexp(z64, dim=-1)
    logp = z64.gather(-1, y.unsqueeze(-1)).squeeze(-1) - lse
    ent = lse - (torch.softmax(z64, dim=-1) * z64).sum(-1)
    return logp, ent


# --- the stand-ins themselves, on any TRL version ---------------------------------------------------------------------


@pytest.mark.parametrize("shape,V", [((3, 5), 37), ((2, 1, 7), 50257 // 97)])
def test_selective_log_softmax_029_matches_float64(shape, V):
    patch = ft.TRLPatch("test")
    original = lambda *a: pytest.fail("original called")  # noqa: E731
    sls = ft._make_selective_log_softmax(original, patch)
    ent_fn = ft._make_entropy_from_logits(original, patch)
    tau = 0.7
    logits = (torch.randn(*shape, V) * 3).requires_grad_(True)
    index = torch.randint(0, V, shape)
    z = logits / tau  # TRL 0.29 divides by its temperature before calling the helpers
    logp, ent = sls(z, index), ent_fn(z)
    assert logp.dtype == torch.float32 and logp.shape == index.shape and ent.shape == index.shape

    z64 = (logits.detach().double() / tau).requires_grad_(True)
    ref_logp, ref_ent = _ref_logp_ent(z64, index)
    torch.testing.assert_close(logp.double(), ref_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent.double(), ref_ent, atol=1e-5, rtol=0)

    g1, g2 = torch.randn(shape), torch.randn(shape)  # non-unit upstream gradients
    (logp * g1 + ent * g2).sum().backward()
    ((ref_logp * g1 + ref_ent * g2).sum() / tau).backward()  # ∂/∂logits = ∂/∂z / τ
    torch.testing.assert_close(logits.grad.double(), z64.grad, **FP32_MODEL)
    assert patch.calls == {"selective_log_softmax": 1, "entropy_from_logits": 1}


def test_selective_log_softmax_029_leaves_topk_gathers_to_trl():
    patch = ft.TRLPatch("test")
    seen = []
    sls = ft._make_selective_log_softmax(lambda lg, ix: seen.append(ix.shape) or "trl", patch)
    assert sls(torch.randn(2, 3, 11), torch.randint(0, 11, (2, 3, 4))) == "trl"
    assert seen == [(2, 3, 4)] and patch.fallbacks["selective_log_softmax"] == 1 and not patch.calls


class _RefHead:
    """TRL 1.16's _ChunkedLogProbFunction contract, written from its docstring: z = logit_scale·(h Wᵀ + b)/τ,
    optional softcap s·tanh(z/s) before /τ (float64)."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, softcap=None, logit_scale=1.0, outputs=()):
        z = hidden.double() @ weight.double().T
        if bias is not None:
            z = z + bias.double()
        z = z * logit_scale
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        logp, ent = _ref_logp_ent(z / temperature, targets)
        return logp, (ent if "entropy" in outputs else None), None, None, None


@pytest.mark.parametrize("with_bias,logit_scale", [(False, 1.0), (True, 0.5)])
def test_linear_head_116_matches_float64(with_bias, logit_scale):
    patch = ft.TRLPatch("test")
    head = ft._make_linear_head(_RefHead, patch)
    N, H, V, tau = 13, 16, 67, 0.7
    hidden = torch.randn(N, H, requires_grad=True)
    weight = (torch.randn(V, H) / H**0.5).requires_grad_(True)
    bias = torch.randn(V, requires_grad=True) if with_bias else None
    targets = torch.randint(0, V, (N,))
    logp, ent, *rest = head.apply(hidden, weight, bias, targets, tau, 4096, None, logit_scale, ("log_probs", "entropy"))
    assert rest == [None, None, None] and logp.dtype == torch.float32 and logp.shape == (N,) and ent.shape == (N,)

    leaves = [hidden, weight] + ([bias] if with_bias else [])
    leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
    b64 = leaves64[2] if with_bias else None
    ref_logp, ref_ent, *_ = _RefHead.apply(leaves64[0], leaves64[1], b64, targets, tau, 0, None, logit_scale,
                                           ("log_probs", "entropy"))
    torch.testing.assert_close(logp.double(), ref_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent.double(), ref_ent, atol=1e-5, rtol=0)
    g1, g2 = torch.randn(N), torch.randn(N)
    (logp * g1 + ent * g2).sum().backward()
    (ref_logp * g1 + ref_ent * g2).sum().backward()
    for t, r in zip(leaves, leaves64):
        torch.testing.assert_close(t.grad.double(), r.grad, **FP32_MODEL)

    only_logp = head.apply(hidden.detach(), weight.detach(), None, targets, tau, 4096, None, 1.0, ("log_probs",))
    assert only_logp[1] is None
    assert patch.calls["linear_logprobs"] == 2 and not patch.fallbacks


def test_linear_head_116_hands_unserved_calls_to_trl():
    patch = ft.TRLPatch("test")
    head = ft._make_linear_head(_RefHead, patch)
    h, w, y = torch.randn(4, 8), torch.randn(9, 8), torch.randint(0, 9, (4,))
    for softcap, scale, outs in [(30.0, 1.0, ("log_probs",)), (None, 1.0, ("log_probs", "is_top1")), (None, 0.0, ())]:
        got = head.apply(h, w, None, y, 1.0, 64, softcap, scale, outs)
        want = _RefHead.apply(h, w, None, y, 1.0, 64, softcap, scale, outs)
        torch.testing.assert_close(got[0], want[0])
    assert patch.fallbacks["linear_logprobs"] == 3 and not patch.calls


# --- version and signature guards ---------------------------------------------------------------------------------------


def _current_objects():
    import importlib

    plan = ft._PLANS[max(ft._PLANS)] if KEY is None else KEY
    out = {}
    for t in plan:
        try:
            module = importlib.import_module(t.module)
        except Exception:
            continue
        out[(t.module, t.name)] = getattr(module, t.name, None)
    return out


def test_unknown_version_warns_and_patches_nothing(monkeypatch):
    before = _current_objects()
    monkeypatch.setattr(trl, "__version__", "0.7.0")
    with pytest.warns(RuntimeWarning, match="not a version we have read"):
        patch = ft.apply()
    assert not patch.applied and patch.patched == [] and "0.7.0" in patch.reason
    assert _current_objects() == before
    monkeypatch.setattr(trl, "__version__", "1.16.1.dev0")  # pre-releases are unknown too
    with pytest.warns(RuntimeWarning, match="not a version we have read"):
        assert not ft.apply().applied


@pytest.mark.skipif(not KNOWN, reason=f"TRL {trl.__version__} is not a version fastrlhf supports")
def test_signature_mismatch_warns_and_patches_nothing(monkeypatch):
    import importlib

    t = KEY[0]
    module = importlib.import_module(t.module)
    monkeypatch.setattr(module, t.name, lambda logits, index, extra: None)
    before = _current_objects()
    with pytest.warns(RuntimeWarning, match="expected"):
        patch = ft.apply()
    assert not patch.applied and _current_objects() == before


@pytest.mark.skipif(not KNOWN, reason=f"TRL {trl.__version__} is not a version fastrlhf supports")
def test_apply_undo_restores_and_nests():
    before = _current_objects()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a supported version patches silently
        with ft.patched() as p:
            assert p.applied and _current_objects() != before
            names = {f"{m.__name__}.{n}" for m, n, _, _ in p.patched}
            if KEY is ft._PLANS[(0, 29)]:  # GRPO, RLOO and the experimental PPO all look the helpers up by name
                assert {"trl.trainer.grpo_trainer.selective_log_softmax", "trl.trainer.grpo_trainer.entropy_from_logits",
                        "trl.experimental.ppo.ppo_trainer.selective_log_softmax"} <= names, (names, p.skipped)
            else:
                assert names == {"trl.trainer.utils._ChunkedLogProbFunction"}
            with ft.patched() as inner:  # nested: same patch, still active after the inner block
                assert inner is p
            assert p.applied and ft.apply() is p
        assert not p.applied and _current_objects() == before
    p2 = ft.apply()
    ft.undo()
    ft.undo()  # twice is fine
    assert not p2.applied and _current_objects() == before


# --- TRL's GRPO trainer on CPU, with and without apply() ---------------------------------------------------------------


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A random 2-layer Qwen2 (V=63, H=32) and a word-level tokenizer, saved offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    words = [f"w{i}" for i in range(60)]
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    cfg = Qwen2Config(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                      eos_token_id=1, bos_token_id=1, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg)  # random weights from the (fresh, reported) test seed
    path = tmp_path / "tiny_qwen2"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path), words, tok


def _run_grpo(path, words, tok, out_dir, seed):
    """3 GRPO steps (2 generations per prompt, 6 new tokens, τ = 0.7, β = 0.1, 2 iterations per batch) on CPU in fp32.
    Returns the logged losses and every (logps, entropies) the trainer computed."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    seen = []

    class Recording(GRPOTrainer):
        def _get_per_token_logps_and_entropies(self, *a, **k):
            out = super()._get_per_token_logps_and_entropies(*a, **k)
            seen.append(tuple(None if x is None else x.detach().clone() for x in out[:2]))
            return out

    def reward(completions, **kw):  # longer completions score higher
        return [len(c) / 10.0 for c in completions]

    ds = Dataset.from_dict({"prompt": [" ".join(words[i:i + 4]) for i in range(8)]})
    args = GRPOConfig(output_dir=out_dir, per_device_train_batch_size=4, num_generations=2, max_completion_length=6,
                      max_steps=3, num_iterations=2, use_cpu=True, bf16=False, fp16=False, report_to=[], logging_steps=1,
                      seed=seed, beta=0.1, temperature=0.7, save_strategy="no", learning_rate=1e-3,
                      model_init_kwargs={"dtype": torch.float32}, disable_tqdm=True)
    trainer = Recording(model=path, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok)
    assert trainer.model.dtype == torch.float32 and trainer.accelerator.device.type == "cpu"  # use_cpu / no bf16 honored
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, seen


@pytest.mark.slow
@pytest.mark.skipif(not KNOWN, reason=f"TRL {trl.__version__} is not a version fastrlhf supports")
def test_grpo_trainer_same_losses_and_logprobs_with_apply(tiny_checkpoint, tmp_path):
    path, words, tok = tiny_checkpoint
    before = _current_objects()
    seed = int(torch.randint(0, 2**31, (1,)))  # the same trainer seed for both runs
    base_losses, base_seen = _run_grpo(path, words, tok, str(tmp_path / "base"), seed)
    with ft.patched() as patch:
        fast_losses, fast_seen = _run_grpo(path, words, tok, str(tmp_path / "fast"), seed)
    assert _current_objects() == before  # undone

    assert patch.calls, "fastrlhf kernels were never called"
    assert sum(patch.calls.values()) >= len(fast_seen) and not patch.fallbacks
    if KEY is ft._PLANS[(0, 29)]:
        assert patch.calls["selective_log_softmax"] >= 1 and patch.calls["entropy_from_logits"] >= 1
    else:
        assert patch.calls["linear_logprobs"] == len(fast_seen)  # one fused-head call per batch scored

    assert len(base_losses) == len(fast_losses) == 3
    torch.testing.assert_close(torch.tensor(fast_losses), torch.tensor(base_losses), atol=1e-4, rtol=1e-4)
    assert len(base_seen) == len(fast_seen) > 0
    n_entropy = 0
    for (lp0, en0), (lp1, en1) in zip(base_seen, fast_seen):
        assert lp0.shape == lp1.shape and lp1.dtype == torch.float32
        torch.testing.assert_close(lp1, lp0.float(), atol=1e-4, rtol=0)
        if en0 is not None:
            n_entropy += 1
            torch.testing.assert_close(en1.float(), en0.float(), atol=1e-4, rtol=0)
    assert n_entropy > 0


@pytest.mark.slow
@pytest.mark.skipif(not KNOWN, reason=f"TRL {trl.__version__} is not a version fastrlhf supports")
def test_bench_trl_runs_at_smoke_shape(tmp_path, capsys):
    from benchmarks.run_trl import CSV_COLUMNS, main

    out_csv = tmp_path / "results.csv"
    assert main(["--shape", "smoke", "--steps", "1", "--warmup", "0", "--csv", str(out_csv)]) == 0
    text = capsys.readouterr().out
    assert "trl+fastrlhf" in text and "step_ms" in text and "fastrlhf kernel calls: {'" in text
    rows = out_csv.read_text().splitlines()
    assert rows[0].split(",") == CSV_COLUMNS and len(rows) == 1 + 2 * (4 if torch.cuda.is_available() else 3)  # 2 arms x metrics (train peak: CUDA)
