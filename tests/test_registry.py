"""advlens.registry.Registry, and the four families that use it (models, attacks, engines, data)."""

from __future__ import annotations

import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from advlens._optional import MissingDependency
from advlens.errors import ConfigError, DataError
from advlens.registry import Registry, load

NAME = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=2, max_size=12)


def test_register_get_and_decorator():
    reg: Registry[object] = Registry("widget", setting="widget.name")
    one = object()
    assert reg.register("one", one) is one

    @reg.register("two")
    def two():
        return 2

    assert two() == 2  # the decorator hands back what it decorates
    assert reg.get("one") is one and reg.get("two") is two
    assert reg.names() == ["one", "two"] == list(reg)
    assert "one" in reg and "three" not in reg and 3 not in reg
    reg.register("one", two)  # a name registered again is replaced (users override built-ins)
    assert reg.get("one") is two and reg.names() == ["one", "two"]
    with pytest.raises(TypeError):
        reg.register("", one)


@given(st.lists(NAME, min_size=1, max_size=5, unique=True), st.data())
def test_unknown_name_says_setting_value_and_closest(names, data):
    reg: Registry[int] = Registry("widget", setting="widget.name")
    for i, n in enumerate(names):
        reg.register(n, i)
    target = data.draw(st.sampled_from(names))
    cut = data.draw(st.integers(0, len(target) - 1))
    typo = target[:cut] + target[cut + 1 :]
    if typo in names:
        assert reg.get(typo) == names.index(typo)
        return
    with pytest.raises(ConfigError) as exc:
        reg.get(typo)
    text = str(exc.value)
    assert text.startswith(f"widget.name = {typo!r} is not a known widget; closest valid names")
    shown = text.split(": ", 1)[1].split(", ")
    assert target in shown  # one deleted letter keeps a name within difflib's reach


@given(st.lists(NAME, min_size=1, max_size=8, unique=True))
def test_names_keep_registration_order(names):
    reg: Registry[tuple[str]] = Registry("widget", setting="w")
    for n in names:
        reg.register(n, (n.upper(),))  # a string entry would be an import target
    assert reg.names() == names
    assert [reg.get(n) for n in names] == [(n.upper(),) for n in names]


def test_lazy_entries_import_only_when_asked(tmp_path, monkeypatch):
    (tmp_path / "lazy_impl_mod.py").write_text("VALUE = {'built': True}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "lazy_impl_mod", raising=False)
    reg: Registry[dict] = Registry("widget", setting="w")
    reg.register("lazy", "lazy_impl_mod:VALUE")
    assert "lazy_impl_mod" not in sys.modules  # registering imports nothing
    assert reg.get("lazy") == {"built": True}
    assert "lazy_impl_mod" in sys.modules
    assert load("os.path:join") is __import__("os").path.join
    assert load("os.path") is __import__("os").path


def test_missing_optional_dependency_names_what_to_install():
    reg: Registry[object] = Registry("t-SNE engine", setting="embed.engine")
    reg.register("gpu", "cuml_not_installed_here.manifold:TSNE")
    assert "gpu" in reg  # known, only its library is missing
    with pytest.raises(MissingDependency, match="Install it with: pip install cuml_not_installed"):
        reg.get("gpu")


def test_patterns_exact_names_first_and_listed():
    exact, pattern, family = object(), object(), object()
    reg: Registry[object] = Registry("model", setting="model.name")
    reg.register("wrn-28-10", exact)
    reg.register_pattern(r"wrn-(\d+)-(\d+)", pattern, shown="wrn-<depth>-<width>")
    reg.register_pattern(r"fam:\w+", family, shown="fam:<Name>", names=lambda: ["fam:A", "fam:B"])
    assert reg.get("wrn-28-10") is exact and reg.get("wrn-16-4") is pattern
    assert reg.get("fam:Z") is family and "fam:Z" in reg and "wrn-16-x" not in reg
    assert reg.names() == ["wrn-28-10"] and reg.patterns() == ["wrn-<depth>-<width>", "fam:<Name>"]
    assert reg.all_names() == ["wrn-28-10", "fam:A", "fam:B"]
    with pytest.raises(ConfigError, match=r"closest valid names.*fam:A.*or one of the forms wrn-"):
        reg.get("fam-A")


def test_error_class_is_the_registrys():
    reg: Registry[int] = Registry("dataset", setting="data.source", error=DataError)
    reg.register("cifar10", 1)
    with pytest.raises(DataError, match="data.source = 'cifar1O'.*cifar10"):
        reg.get("cifar1O")


def test_every_family_uses_the_registry_and_every_entry_resolves():
    from advlens.attacks import ATTACKS, get_attack
    from advlens.data import SOURCES, load_dataset
    from advlens.embed import ENGINES, Engine
    from advlens.models import MODELS

    for reg in (ATTACKS, SOURCES, ENGINES, MODELS):
        assert isinstance(reg, Registry)
        for name in reg.names():
            assert callable(reg.get(name)) or isinstance(reg.get(name), Engine)
    assert ENGINES.names() == ["sklearn", "opentsne", "cuml", "torch"]
    for name in ENGINES.names():  # engine modules meet the Engine protocol as they are
        assert isinstance(ENGINES.get(name), Engine)
    assert MODELS.get("wrn-16-4") is MODELS.get("wrn-28-10")
    assert MODELS.get("pkg.mod:factory").__module__ == "advlens.models.user"
    assert get_attack("apgd-dlr", "linf", 0.1).loss == "dlr"
    assert len(load_dataset("synthetic", "test")) == 200
    with pytest.raises(ConfigError, match="model.name = 'smal-cnn' is not a known model"):
        MODELS.get("smal-cnn")
