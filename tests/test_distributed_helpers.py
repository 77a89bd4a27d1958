"""fastrlhf.runtime.distributed in one process (the helpers are the identity there) and the checkpoint format's edges.
The multi-process behaviour is tested with real torchrun jobs in tests/test_distributed.py."""
import pytest
import torch

from fastrlhf.runtime import checkpoint as ck
from fastrlhf.runtime import distributed
from fastrlhf import kernels
from fastrlhf.stages.ppo_core import whiten_across_ranks
from tests.helpers.tolerances import EXACT

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.mark.parametrize("n,world", [(8, 2), (7, 3), (2, 4), (1, 1), (12, 5)])
def test_local_slice_partitions_the_global_batch_in_order(n, world):
    items = list(range(100, 100 + n))
    parts = [distributed.local_slice(items, r, world) for r in range(world)]
    assert sum(parts, []) == items                                     # every item once, rank-major order
    assert max(map(len, parts)) - min(map(len, parts)) <= 1            # balanced


@pytest.mark.parametrize("n,world", [(7, 2), (3, 4), (8, 4), (1, 3)])
def test_padded_shard_gives_every_rank_the_same_number_of_entries(n, world):
    items = [f"x{i}" for i in range(n)]
    shards = [distributed.padded_shard(items, distributed.DistEnv(rank=r, world_size=world)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == -(-n // world)
    real = sorted(x for s in shards for x, w in s if w == 1.0)
    assert real == sorted(items)                                       # each item counted once
    assert all(w in (0.0, 1.0) for s in shards for _, w in s)


def test_init_without_torchrun_is_one_plain_process(monkeypatch):
    for k in TORCHRUN_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RANK", "0")                                   # a stray variable alone is not a launch
    env = distributed.init("cpu")
    assert (env.rank, env.world_size, env.launched, env.device.type) == (0, 1, False, "cpu")
    assert not distributed.is_initialized()
    assert distributed.reduce_metrics({"a": 1.5, "step": 3}) == {"a": 1.5, "step": 3}
    assert distributed.global_count(torch.tensor(7.0)) == 7.0 and distributed.all_reduce_sum(2.5) == 2.5 and distributed.any_rank(True)


def test_init_under_torchrun_rejects_a_fixed_cuda_index(monkeypatch):
    for k, v in zip(TORCHRUN_ENV, ("1", "2", "1", "127.0.0.1", "29500")):
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match="cuda:LOCAL_RANK"):
        distributed.init("cuda:1")


def test_generation_gather_is_local_for_an_unsharded_model():
    from fastrlhf.models.decoder import CausalLM, ModelConfig
    m = CausalLM(ModelConfig(vocab_size=11, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16))
    g = distributed.GenerationGather(m, "auto")
    assert g.mode == "local" and g.all_done(torch.tensor([True, True])) and not g.all_done(torch.tensor([True, False]))
    with g():
        pass
    with pytest.raises(ValueError, match="per_block"):
        distributed.GenerationGather(m, "sometimes")
    assert distributed.unsharded_bytes(m) == sum(p.numel() * 4 for p in m.parameters())


def test_whiten_across_ranks_is_the_kernel_in_one_process():
    x, mask = torch.randn(5, 9), (torch.rand(5, 9) > 0.3).float()
    torch.testing.assert_close(whiten_across_ranks(x, mask), kernels.whiten(x, mask, shift_mean=True))


def _tiny(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


def _step(model, opt):
    model(torch.randn(6, 4)).square().sum().backward()
    opt.step()
    opt.zero_grad()


def test_training_state_round_trips_through_dcp(tmp_path):
    """Weights and AdamW state written with DCP (one process) come back bit-exact into a fresh model + optimizer."""
    m = _tiny(0)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    _step(m, opt)
    ck.save_training_state(tmp_path / ck.STATE_DIR, {"model": (m, opt)})
    m2 = _tiny(1)                                                      # other weights: they must be overwritten
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    ck.load_training_state(tmp_path, {"model": (m2, opt2)})
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    for (a, b) in zip(opt.state.values(), opt2.state.values()):
        for k in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(a[k], b[k], **EXACT)


def test_legacy_checkpoint_optimizer_in_trainer_state_still_loads(tmp_path):
    """Checkpoints of the previous format kept optimizer.state_dict() in trainer_state.pt: nothing saved is lost."""
    m = _tiny(1)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    _step(m, opt)
    legacy = opt.state_dict()
    opt2 = torch.optim.AdamW(_tiny(1).parameters(), lr=1e-2)
    ck.load_training_state(tmp_path, {"model": (None, opt2)}, legacy={"model": legacy})
    assert opt2.state_dict()["state"][0]["exp_avg"].equal(legacy["state"][0]["exp_avg"])
    with pytest.raises(ck.CheckpointError, match="training state"):
        ck.load_training_state(tmp_path, {"model": (None, opt2)})


def test_non_stage_commands_refuse_torchrun(monkeypatch, capsys):
    from fastrlhf.tools.cli import main
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["selfcheck"]) == 2
    assert "runs in one process" in capsys.readouterr().err

