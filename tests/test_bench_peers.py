"""benchmarks/run_peers.py plumbing at the 'smoke' shape: both arms run, agree, and the fastrlhf arm calls our kernels.
(Timings are the benchmark's job, not checked here.)"""
from __future__ import annotations

import pytest

pytest.importorskip("verl", reason="veRL is part of the test install (README: pip install --no-deps verl==0.9.1)")
pytest.importorskip("openrlhf", reason="OpenRLHF is part of the test install (README: pip install --no-deps ...)")

from fastrlhf.benchmarks import run_peers as peers  # noqa: E402

from tests.helpers.peers import import_openrlhf  # noqa: E402


def test_peers_runner_smoke(tmp_path, capsys):
    import_openrlhf()  # OpenRLHF's GPU-only imports get placeholders on this CPU machine (see tests/helpers/peers.py)
    csv = tmp_path / "r.csv"
    assert peers.main(["--shape", "smoke", "--warmup-ms", "0", "--rep-ms", "0", "--csv", str(csv)]) == 0
    out = capsys.readouterr().out
    for arm in ("verl+fastrlhf", "openrlhf+fastrlhf"):
        assert arm in out
    assert out.count("fastrlhf calls: {'") == 4  # every (peer, algo) ran our kernels
    rows = csv.read_text().splitlines()
    assert len(rows) == 1 + 2 * 2 * 2 * 2  # header + peers × algos × arms × metrics
    res = peers.run_peer("verl", ["ppo"], peers.SHAPES["smoke"], "cpu", 0.0, 0.0)["ppo"]
    assert res["dloss"] < 1e-5 and res["dgrad"] < 1e-5
    assert res["calls"]["compute_policy_loss_vanilla"] == 1 and res["calls"]["compute_gae_advantage_return"] == 1


def test_peers_runner_rejects_bad_arguments(capsys):
    for argv in (["--peer", "deepspeed-chat"], ["--algo", "dpo"], ["--shape", "huge"]):
        with pytest.raises(SystemExit) as e:
            peers.main(argv + ["--no-csv"])
        assert e.value.code == 2
