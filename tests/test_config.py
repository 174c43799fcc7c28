"""Configuration: TOML loading, --set overrides and clear errors for bad keys and values."""

import pytest

from advlens import config
from advlens.errors import ConfigError


def test_default_config_loads_with_paper_defaults():
    cfg = config.load()
    assert cfg.data.source == "fashion-mnist" and cfg.data.n == 1000
    assert cfg.attack.name == "apgd-ce" and set(cfg.attack.norms) == {"l2", "linf"}
    assert cfg.attack.eps_for("linf", "fashion-mnist") == pytest.approx(0.1)
    assert cfg.attack.eps_for("l2", "fashion-mnist") == pytest.approx(1.5)
    assert cfg.embed.perplexity == 30 and cfg.embed.n_iter == 1000 and cfg.overlap.k == "auto"


def test_dataset_default_eps_when_unset():
    cfg = config.RunConfig()
    assert cfg.attack.eps_for("linf", "cifar10") == pytest.approx(8 / 255)
    assert cfg.attack.eps_for("l2", "cifar10") == pytest.approx(0.5)


def test_overrides_parse_toml_values():
    cfg = config.load(
        overrides=[
            "data.n=20",
            "attack.norms=['linf']",
            "embed.engine=sklearn",
            "attack.eps.linf=0.05",
            "embed.seeds=[0, 1, 2]",
        ]
    )
    assert cfg.data.n == 20 and cfg.attack.norms == ("linf",)
    assert cfg.embed.engine_names == ("sklearn",) and cfg.embed.seed_list == (0, 1, 2)
    assert cfg.attack.eps["linf"] == pytest.approx(0.05)


def test_round_trip_through_dict():
    cfg = config.load(overrides=["embed.seeds=[3,4]"])
    assert config.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("attack.n_ite=5", "unknown config key 'attack.n_ite'.*n_iter"),
        ("nope.x=1", "unknown config key 'nope.x'"),
        ("attack.eps.linf=-0.1", "eps must be a finite number >= 0"),
        ("attack.eps.linf=nan", "eps must be a finite number >= 0"),
        ("attack.norms=['l3']", "valid norms are"),
        ("data.n=abc", "expected an integer"),
        ("overlap.variant=foo", "valid variants are"),
        ("data.n", "expected section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle):
        config.load(overrides=[override])


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[embed]\nperplexty = 30\n")
    with pytest.raises(ConfigError) as err:
        config.load(bad)
    msg = str(err.value)
    assert str(bad) in msg and "embed.perplexty" in msg and "perplexity" in msg


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "missing.toml")


def test_configs_are_frozen():
    cfg = config.RunConfig()
    with pytest.raises(AttributeError):
        cfg.data.n = 3  # type: ignore[misc]


def test_installed_without_configs_falls_back_to_the_same_defaults(monkeypatch, tmp_path):
    monkeypatch.setattr(config, "DEFAULT_CONFIG", tmp_path / "absent.toml")
    fallback = config.load(overrides=["data.n=7"])
    shipped = config.load(
        config.DEFAULT_CONFIG.__class__(__file__).parent.parent / "configs" / "default.toml"
    )
    assert fallback.data.n == 7
    for norm in ("l2", "linf"):
        assert fallback.attack.eps_for(norm, "fashion-mnist") == shipped.attack.eps_for(
            norm, "fashion-mnist"
        )
    assert fallback.embed == shipped.embed and fallback.overlap == shipped.overlap
    assert fallback.model == shipped.model and fallback.layers == shipped.layers
