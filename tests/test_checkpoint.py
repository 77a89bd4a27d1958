"""fastrlhf.runtime.checkpoint: atomic saves, keep-N, resume round trip (weights, optimizer, data position, RNG), Ctrl-C."""
import os
import random
import signal

import numpy as np
import pytest
import torch

from fastrlhf.runtime import checkpoint as ck
from fastrlhf.runtime import data
from fastrlhf.models.decoder import CausalLM, ModelConfig
from fastrlhf.models.hf_io import load_model


def tiny():
    return CausalLM(ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))


def test_failed_save_keeps_previous_checkpoint(tmp_path):
    m = tiny()
    p1 = ck.save_checkpoint(tmp_path, 1, model=m, trainer_state=ck.trainer_state_dict(step=1))
    before = {f: (p1 / f).read_bytes() for f in os.listdir(p1)}
    with torch.no_grad():
        m.lm_head.weight.add_(1.0)

    def boom(path):
        path.write_text("half")
        raise OSError("disk full")

    for step in (1, 2):  # a failing save of a new step, and a failing re-save of the same step
        with pytest.raises(OSError, match="disk full"):
            ck.save_checkpoint(tmp_path, step, model=m, trainer_state=ck.trainer_state_dict(step=step),
                               extra_files={"value": boom})
        assert ck.list_checkpoints(tmp_path) == [p1]
        assert {f: (p1 / f).read_bytes() for f in os.listdir(p1)} == before
    assert [p.name for p in tmp_path.iterdir()] == [p1.name]      # no temporary folder left behind


def test_keep_latest_and_incomplete_ignored(tmp_path):
    m = tiny()
    for s in (5, 10, 15):
        ck.save_checkpoint(tmp_path, s, model=m, trainer_state=ck.trainer_state_dict(step=s), keep=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["checkpoint-0000010", "checkpoint-0000015"]
    (tmp_path / "checkpoint-0000099").mkdir()                     # no trainer state: not a complete checkpoint
    (tmp_path / ".checkpoint-0000100.tmp-abcd").mkdir()
    assert ck.latest_checkpoint(tmp_path).name == "checkpoint-0000015"
    assert ck.resolve_resume("auto", tmp_path).name == "checkpoint-0000015"
    assert ck.resolve_resume("", tmp_path) is None
    with pytest.raises(ck.CheckpointError, match="nowhere"):
        ck.resolve_resume(str(tmp_path / "nowhere"), tmp_path)


def _train_step(model, opt, it):
    b = next(it)
    logits = model(b.input_ids, cu_seqlens=b.cu_seqlens).float()          # [1, T, V]
    noise = torch.rand(()) * 1e-3                                         # consumes the torch RNG like dropout would
    loss = (logits.logsumexp(-1) - logits.gather(-1, b.targets[..., None]).squeeze(-1)).mul(b.loss_mask).sum() + noise
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_resume_round_trip_exact(tmp_path):
    torch.manual_seed(0)
    m = tiny()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    samples = [data.TokenizedSFT(list(range(1, k)), [1] * (k - 1), f"f:{k}") for k in range(3, 20)]
    loader = data.PackedLoader(samples, 24, pad_id=0, seed=7)
    it = iter(loader)
    for _ in range(3):
        _train_step(m, opt, it)
    random.random(), np.random.rand(), torch.rand(3)
    p = ck.save_checkpoint(tmp_path, 3, model=m, trainer_state=ck.trainer_state_dict(
        step=3, optimizer=opt, data_state=loader.state_dict()))
    want_rng = (random.random(), float(np.random.rand()), torch.rand(3))
    ck.set_rng_state(ck.load_trainer_state(p)["rng"])                    # rewind so the original run continues unchanged
    for _ in range(4):                                                   # crosses an epoch boundary
        _train_step(m, opt, it)

    # a fresh start: new objects, scrambled RNGs, then restore from the checkpoint
    random.seed(123), np.random.seed(123), torch.manual_seed(123)
    m2 = load_model(p)
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    loader2 = data.PackedLoader(samples, 24, pad_id=0, seed=7)
    state = ck.load_trainer_state(p)
    assert ck.restore_trainer_state(state, optimizer=opt2, data=loader2) == 3
    got_rng = (random.random(), float(np.random.rand()), torch.rand(3))
    assert got_rng[:2] == want_rng[:2] and torch.equal(got_rng[2], want_rng[2])
    ck.set_rng_state(state["rng"])
    it2 = iter(loader2)
    for _ in range(4):
        _train_step(m2, opt2, it2)
    assert loader2.state_dict() == loader.state_dict()
    for (name, a), b in zip(m.named_parameters(), m2.parameters()):
        assert torch.equal(a, b), name                                   # bit-identical continuation


def test_optimizer_state_round_trip(tmp_path):
    m = tiny()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    m(torch.randint(0, 32, (2, 5))).sum().backward()
    opt.step()
    p = ck.save_checkpoint(tmp_path, 1, model=m, trainer_state=ck.trainer_state_dict(step=1, optimizer=opt))
    m2 = load_model(p)
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-3)
    ck.restore_trainer_state(ck.load_trainer_state(p), optimizer=opt2)
    for (k, a), b in zip(opt.state_dict()["state"].items(), opt2.state_dict()["state"].values()):
        for key in a:
            assert torch.equal(a[key], b[key]), (k, key)
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)


class Evil:
    def __reduce__(self):  # unpickling would call os.makedirs(<marker>)
        return (os.makedirs, (self.marker,))


def test_trainer_state_refuses_pickled_code(tmp_path):
    e = Evil()
    e.marker = str(tmp_path / "pwned")
    torch.save({"step": 1, "evil": e}, tmp_path / ck.STATE_FILE)
    with pytest.raises(ck.CheckpointError, match=r"trainer_state.pt: cannot load the trainer state: it refers to "
                                                 r"os.makedirs, .*refused"):
        ck.load_trainer_state(tmp_path)
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(ck.CheckpointError, match="no trainer state"):
        ck.load_trainer_state(tmp_path / "missing")


def test_graceful_interrupt_sets_flag_then_restores_handler():
    before = signal.getsignal(signal.SIGINT)
    with ck.graceful_interrupt() as stop:
        assert not stop
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_resume_state_written_with_separate_projections(tmp_path):
    """A training state saved before q/k/v and gate/up were fused (HF's separate projections) resumes into the fused
    model: the weights are the parts' rows, and the next AdamW step (moments and step count carried over) moves the
    fused weights exactly as it moves the old model's parts."""
    from fastrlhf.models.decoder import GATE_UP_PARTS, QKV_PARTS, _merge_hf_keys, split_fused_state, unfuse_projections
    from fastrlhf.runtime.optim import make_adamw
    torch.manual_seed(0)
    ids = torch.randint(0, 32, (2, 6))

    def step(m, opt):
        opt.zero_grad()
        m(ids).float().pow(2).mean().backward()
        opt.step()

    old = tiny()
    unfuse_projections(old, ["q_proj", "gate_proj"])
    old_opt = make_adamw(old, lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        step(old, old_opt)
    (tmp_path / ck.STATE_DIR).mkdir()
    ck.save_training_state(tmp_path / ck.STATE_DIR, {"policy": (old, old_opt)})

    new = tiny()
    new_opt = make_adamw(new, lr=1e-2, weight_decay=0.1)
    ck.load_training_state(tmp_path, {"policy": (new, new_opt)})
    assert new.model.layers[0].self_attn.fused and new.model.layers[0].mlp.fused
    sd_old, sd_new = old.state_dict(), split_fused_state(new.state_dict(), new.config)
    assert sd_old.keys() == sd_new.keys()
    for k in sd_old:
        assert torch.equal(sd_old[k], sd_new[k]), k
    # the same gradient for both (the old model's parts, concatenated for the fused weights): one more AdamW step
    grads = {n: torch.randn_like(p) for n, p in old.named_parameters()}
    for n, p in old.named_parameters():
        p.grad = grads[n].clone()
    g_new = dict(grads)
    for name in [n for n in g_new if n.endswith("q_proj.weight") or n.endswith("gate_proj.weight")]:
        prefix = name.rsplit(".", 2)[0] + "."
        attn = "q_proj" in name
        _merge_hf_keys(g_new, prefix, *(("qkv_proj", QKV_PARTS) if attn else ("gate_up_proj", GATE_UP_PARTS)))
    for n, p in new.named_parameters():
        p.grad = g_new[n].clone()
    old_opt.step()
    new_opt.step()
    sd_new = split_fused_state(new.state_dict(), new.config)
    for k, v in old.state_dict().items():
        assert torch.equal(sd_new[k], v), k
