"""fastrlhf.runtime.safe_state: a checkpoint's state/ folder is read without running pickled code."""
import os
import pickle
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

from fastrlhf.runtime.safe_state import SafeLoadPlanner, SafeStateReader, StateRefused, read_metadata


class Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def _state(dtype):
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4)).to(dtype)
    # eps representable in fp16 (1e-8 rounds to 0 there: a zero second moment would divide by 0 and leave NaNs)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.8, 0.9), eps=1e-3)
    m(torch.randn(2, 3, dtype=dtype)).sum().backward()
    opt.step()
    return m, opt, {"policy": {"model": get_model_state_dict(m), "optim": get_optimizer_state_dict(m, opt)}}


@pytest.fixture
def saved(tmp_path):
    m, opt, st = _state(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(st, checkpoint_id=str(tmp_path / "state"))
    return tmp_path / "state", st


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_through_the_safe_reader(tmp_path, dtype):
    _, _, st = _state(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(st, checkpoint_id=str(tmp_path / "s"))
        _, _, fresh = _state(dtype)
        dcp.load(fresh, storage_reader=SafeStateReader(str(tmp_path / "s")), planner=SafeLoadPlanner())
    for k, v in st["policy"]["model"].items():
        assert torch.isfinite(v).all() and torch.equal(fresh["policy"]["model"][k], v), k
    assert fresh["policy"]["optim"]["param_groups"][0]["betas"] == (0.8, 0.9)
    assert {"policy.model.0.weight", "policy.optim.param_groups.0.lr"} <= set(read_metadata(tmp_path / "s").state_dict_metadata)


def test_metadata_holding_code_is_refused_before_anything_is_built(saved, tmp_path):
    path, _ = saved
    meta = pickle.loads((path / ".metadata").read_bytes())
    marker = tmp_path / "pwned"
    meta.planner_data = {"x": Evil(marker)}  # inside an otherwise genuine metadata object
    (path / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(StateRefused, match=r"\.metadata: it refers to os\.makedirs, which .* never holds"):
        read_metadata(path)
    assert not marker.exists()


@pytest.mark.parametrize("payload", [
    b"cbuiltins\neval\n(S'1+1'\ntR.",                # GLOBAL + REDUCE
    b"(S'1+1'\nibuiltins\neval\n.",                  # INST (protocol 0)
    b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94.",  # STACK_GLOBAL
])
def test_other_opcodes_that_import_are_refused(saved, payload):
    path, _ = saved
    (path / ".metadata").write_bytes(payload)
    with pytest.raises(StateRefused, match="refers to (builtins.eval|os.system)"):
        read_metadata(path)


def test_metadata_must_be_checkpoint_metadata_with_shards_inside_the_folder(saved):
    path, _ = saved
    good = pickle.loads((path / ".metadata").read_bytes())
    (path / ".metadata").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(StateRefused, match="not a checkpoint's metadata .*list"):
        read_metadata(path)
    info = next(iter(good.storage_data.values()))
    info.relative_path = "../../etc/passwd"
    (path / ".metadata").write_bytes(pickle.dumps(good))
    with pytest.raises(StateRefused, match="not a file of this folder"):
        read_metadata(path)
    (path / ".metadata").write_bytes(b"\x80\x04\x95")  # truncated
    with pytest.raises(StateRefused, match="not a readable checkpoint metadata file"):
        read_metadata(path)
