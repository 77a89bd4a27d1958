"""fastrlhf.runtime.config: defaults <- YAML/TOML file <- --field flags; unknown fields and bad values name the field and file."""
from dataclasses import dataclass
from typing import Optional

import pytest

from fastrlhf.runtime.config import ConfigError, build_parser, param, parse_config, save_config, section


@dataclass
class Inner:
    """An inner section."""
    beta: float = param(0.1, "KL coefficient")
    names: list[str] = param(["a"], "some names")


@dataclass
class Cfg:
    """A test config."""
    lr: float = param(1e-4, "peak learning rate")
    steps: int = param(10, "optimizer steps")
    use_x: bool = param(False, "turn x on")
    out: str = param("runs/x", "output folder")
    maybe: Optional[int] = param(None, "an optional int")
    betas: tuple[float, ...] = param((0.9, 0.95), "Adam betas")
    mode: str = param("a", "the mode", choices=("a", "b"))
    inner: Inner = section(Inner, "inner section")


def test_defaults_and_cli_overrides():
    c = parse_config(Cfg, [])
    assert c == Cfg()
    c = parse_config(Cfg, ["--lr", "3e-4", "--steps", "7", "--use-x", "--maybe", "5", "--betas", "0.8,0.9",
                           "--inner.beta", "0.5", "--inner.names", "x,y", "--mode", "b"])
    assert (c.lr, c.steps, c.use_x, c.maybe, c.betas, c.inner.beta, c.inner.names, c.mode) == \
        (3e-4, 7, True, 5, (0.8, 0.9), 0.5, ["x", "y"], "b")
    assert parse_config(Cfg, ["--use_x", "false"]).use_x is False
    assert parse_config(Cfg, ["--maybe", "none"]).maybe is None


def test_yaml_then_cli(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("lr: 0.01\nsteps: 3\ninner:\n  beta: 0.2\n")
    c = parse_config(Cfg, ["--config", str(f), "--steps", "4"])
    assert (c.lr, c.steps, c.inner.beta) == (0.01, 4, 0.2)


def test_toml(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('lr = 0.5\nout = "o"\n[inner]\nnames = ["p", "q"]\n')
    c = parse_config(Cfg, ["--config", str(f)])
    assert (c.lr, c.out, c.inner.names) == (0.5, "o", ["p", "q"])


def test_round_trip_save(tmp_path):
    c = parse_config(Cfg, ["--lr", "0.25", "--inner.names", "k"])
    save_config(c, tmp_path / "c.yaml")
    assert parse_config(Cfg, ["--config", str(tmp_path / "c.yaml")]) == c


@pytest.mark.parametrize("text,needle", [
    ("lr: 0.1\nlearning_rate: 3\n", "'learning_rate'"),
    ("inner:\n  gamma: 1\n", "'inner.gamma'"),
    ("steps: many\n", "'steps'"),
    ("mode: c\n", "'mode'"),
    ("use_x: maybe\n", "'use_x'"),
    ("inner: 3\n", "inner"),
])
def test_bad_file_fields_name_field_and_file(tmp_path, text, needle):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        parse_config(Cfg, ["--config", str(f)])
    assert needle in str(e.value) and "bad.yaml" in str(e.value)


def test_unparsable_and_missing_file(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("lr: [1,\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        parse_config(Cfg, ["--config", str(f)])
    with pytest.raises(ConfigError, match="nope.yaml"):
        parse_config(Cfg, ["--config", str(tmp_path / "nope.yaml")])


def test_unknown_cli_flag_and_bad_value():
    with pytest.raises(ConfigError, match="--learning-rate"):
        parse_config(Cfg, ["--learning-rate", "1"])
    with pytest.raises(ConfigError, match="command line: --steps: expected an integer"):
        parse_config(Cfg, ["--steps", "1.5"])


def test_help_lists_every_field_with_default_and_meaning():
    text = build_parser(Cfg, prog="x").format_help()
    for flag, meaning, default in [("--lr", "peak learning rate", "0.0001"), ("--steps", "optimizer steps", "10"),
                                   ("--inner.beta", "KL coefficient", "0.1"), ("--betas", "Adam betas", "0.9,0.95"),
                                   ("--out", "output folder", "runs/x")]:
        assert flag in text and meaning in text and f"default: {default}" in text


# ------------------------------------------------------------------------------------------ the stages' sectioned configs

def _stage_configs():
    from fastrlhf.stages.grpo import GRPOConfig
    from fastrlhf.stages.ppo import PPOConfig
    from fastrlhf.stages.reward import RewardConfig
    from fastrlhf.stages.sft import SFTConfig
    return SFTConfig, RewardConfig, PPOConfig, GRPOConfig


def test_stage_configs_share_one_run_section_and_stay_small():
    import dataclasses
    import typing

    from fastrlhf.stages.sections import RunSection
    for cls in _stage_configs():
        hints = typing.get_type_hints(cls)
        assert hints["run"] is RunSection, cls
        assert len(dataclasses.fields(cls)) <= 40
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                assert len(dataclasses.fields(hints[f.name])) <= 40, (cls, f.name)


def test_flat_and_sectioned_spellings_are_the_same_config(tmp_path):
    from fastrlhf.stages.ppo import PPOConfig
    flat = tmp_path / "flat.yaml"
    flat.write_text("policy: p\nlr: 0.001\nlora_rank: 4\nptx_coef: 0.5\nkl_coef: 0.3\noutput_dir: out\n")
    nested = tmp_path / "nested.yaml"
    nested.write_text("policy: p\noptim: {lr: 0.001}\nlora: {rank: 4}\nptx: {coef: 0.5}\nkl: {kl_coef: 0.3}\n"
                      "run: {output_dir: out}\n")
    a = parse_config(PPOConfig, ["--config", str(flat)])
    b = parse_config(PPOConfig, ["--config", str(nested)])
    c = parse_config(PPOConfig, ["--policy", "p", "--lr", "0.001", "--lora_rank", "4", "--ptx.coef", "0.5",
                                 "--kl.kl_coef", "0.3", "--run.output_dir", "out"])
    d = PPOConfig(policy="p", lr=0.001, lora_rank=4, ptx_coef=0.5, kl_coef=0.3, output_dir="out")
    assert a == b == c == d
    assert (d.optim.lr, d.lora.rank, d.ptx.coef, d.kl.kl_coef, d.run.output_dir) == (0.001, 4, 0.5, 0.3, "out")
    assert d.run.seed == 0 and PPOConfig().run.output_dir == "runs/ppo"  # the stage's own default for a shared field


def test_flat_spelling_errors_name_what_the_user_wrote(tmp_path):
    from fastrlhf.stages.ppo import PPOConfig
    with pytest.raises(ConfigError, match="command line: --lora_rank: expected an integer"):
        parse_config(PPOConfig, ["--lora_rank", "x"])
    with pytest.raises(ConfigError, match="command line: --lora.rank: expected an integer"):
        parse_config(PPOConfig, ["--lora.rank", "x"])
    f = tmp_path / "bad.yaml"
    f.write_text("ptx_coef: lots\n")
    with pytest.raises(ConfigError, match="bad.yaml: field 'ptx_coef'"):
        parse_config(PPOConfig, ["--config", str(f)])


def test_saved_run_config_reads_back(tmp_path):
    for cls in _stage_configs():
        c = parse_config(cls, ["--seed", "7", "--run.device", "cpu"])
        save_config(c, tmp_path / "c.yaml")
        assert parse_config(cls, ["--config", str(tmp_path / "c.yaml")]) == c
        assert "run:" in (tmp_path / "c.yaml").read_text()  # written in sections


@dataclass
class Ranged:
    """Fields with declared ranges."""
    frac: float = param(0.1, "a fraction", ge=0, lt=1)
    n: int = param(1, "a count", ge=1)
    betas: tuple[float, ...] = param((0.9, 0.95), "betas", ge=0, lt=1)
    free: float = param(-3.0, "no range")
    inner: Inner = section(Inner, "inner section")


@pytest.mark.parametrize("flag,value,rule", [("--frac", "1", ">= 0 and < 1"), ("--frac", "-0.5", ">= 0 and < 1"),
                                             ("--n", "0", ">= 1"), ("--betas", "0.9,1.0", ">= 0 and < 1")])
def test_ranges_are_checked_where_the_value_comes_from(tmp_path, flag, value, rule):
    with pytest.raises(ConfigError, match=rf"^command line: {flag}: .* is out of range; must be {rule}$"):
        parse_config(Ranged, [flag, value])
    f = tmp_path / "r.yaml"
    f.write_text(f"{flag[2:]}: [{value}]\n" if flag == "--betas" else f"{flag[2:]}: {value}\n")
    with pytest.raises(ConfigError, match=rf"^{f}: field '{flag[2:]}': .* is out of range; must be {rule}$"):
        parse_config(Ranged, ["--config", str(f)])


def test_ranges_edges_and_configs_built_in_code():
    from fastrlhf.runtime.config import check_ranges
    cfg = parse_config(Ranged, ["--frac", "0", "--n", "1", "--free", "-100"])  # the bounds themselves are allowed
    assert (cfg.frac, cfg.n, cfg.free) == (0.0, 1, -100.0)
    check_ranges(Ranged())
    with pytest.raises(ConfigError, match=r"^Ranged: field 'n': 0 is out of range; must be >= 1$"):
        check_ranges(Ranged(n=0))


def test_help_shows_the_range(capsys):
    with pytest.raises(SystemExit):
        parse_config(Ranged, ["--help"])
    assert "must be >= 0 and < 1" in capsys.readouterr().out
