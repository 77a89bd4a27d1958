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
