"""The pipeline's plots and curve bookkeeping without training (fast): PNG files from a synthetic summary."""
import pytest

from fastrlhf.tools import pipeline


def _summary(with_ptx: bool) -> dict:
    curve = lambda d: [{"iteration": i + 1, "kl": 0.1 * i, "rm_score": 0.2 * i, "judge_score": 0.7 + d * i}  # noqa: E731
                       for i in range(12)]
    s = {"judge_score_sft": 0.7, "judge_score_ppo": 0.8, "lm_loss_sft": 0.70, "lm_loss_ppo": 0.90,
         "curves": {"ppo": curve(0.01)}}
    if with_ptx:
        s.update(judge_score_ppo_ptx=0.78, lm_loss_ppo_ptx=0.72)
        s["curves"]["ppo_ptx"] = curve(0.008)
    return s


@pytest.mark.parametrize("with_ptx", [True, False])
def test_write_plots_writes_two_pngs(tmp_path, with_ptx):
    paths = pipeline.write_plots(_summary(with_ptx), tmp_path / "plots")
    assert set(paths) == {"over_optimisation", "alignment_tax"}
    for p in paths.values():
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert (tmp_path / "plots").joinpath(p.rsplit("/", 1)[-1]).stat().st_size > 5000


def test_kl_bins_partition_the_iterations_in_kl_order():
    kl = [0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8]
    bins = pipeline._kl_bins(kl, n=3)
    assert bins == [[1, 5], [3, 0], [4, 6, 2]]
    assert pipeline._kl_bins([0.2, 0.1], n=8) == [[1], [0]] and pipeline._kl_bins([]) == []


def test_summary_table_names_every_finding():
    s = _summary(True)
    s.update(win_rate_ppo_over_sft=0.6, win_rate_ci95=0.03, wins=300, ties=500, losses=224, rm_score_sft=0.0,
             rm_score_ppo=0.9, rm_heldout_accuracy=0.86, sft_heldout_loss=0.7, final_kl=1.0, ptx_coef=1.0,
             win_rate_ppo_ptx_over_sft=0.58, win_rate_ppo_ptx_ci95=0.03, device="cpu", examples=[],
             times_s={"data": 1.0, "sft": 2.0, "rm": 3.0, "ppo": 4.0, "eval": 5.0, "total": 15.0},
             plots={"over_optimisation": "p/over_optimisation.png", "alignment_tax": "p/alignment_tax.png"})
    text = pipeline.format_summary(s)
    assert "0.600 ± 0.030 (300W/500T/224L)" in text
    assert "alignment tax: held-out LM loss SFT / PPO / PPO-ptx  0.700 / 0.900 / 0.720" in text
    assert "PPO-ptx (γ = 1)" in text and "p/over_optimisation.png" in text and "p/alignment_tax.png" in text
