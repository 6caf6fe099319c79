"""A plug-in that fails to import is skipped, not fatal: the other objectives stay usable,
`kdtool objectives` lists them and names the broken one with its reason, and asking for the
broken one by name is one line saying why."""

from __future__ import annotations

from importlib.metadata import EntryPoint

import pytest

from kdtool import registry
from kdtool.config import resolve
from kdtool.errors import UserError

GROUP = registry.GROUP


@pytest.fixture
def plugins(monkeypatch, tmp_path):
    """Register extra entry points beside the real ones (module files may be written to tmp_path)."""
    real = registry.entry_points
    monkeypatch.syspath_prepend(str(tmp_path))

    def install(**modules: str) -> None:
        extra = []
        for name, source in modules.items():
            (tmp_path / f"plugin_{name}.py").write_text(source)
            extra.append(EntryPoint(name=name, value=f"plugin_{name}:Loss", group=GROUP))
        monkeypatch.setattr(registry, "entry_points", lambda group: [*real(group=group), *extra])
        registry.reload()

    yield install
    registry.reload()  # the next caller scans the real entry points again


WORKING = (
    "from kdtool.objectives.reverse_kl import ReverseKL\n"
    "class Loss(ReverseKL):\n    name = 'good'\n    description = 'a working plug-in'\n"
)
BROKEN = "import kdtool_no_such_dependency  # e.g. an optional package that is not installed\n"
RAISES = "raise RuntimeError('needs CUDA 13\\n  (second line of the message)')\n"


def test_a_broken_plug_in_is_skipped_and_remembered(plugins):
    plugins(good=WORKING, missing=BROKEN, raises=RAISES)
    objectives = registry.available()
    assert "good" in objectives and "fkl" in objectives and "rkl" in objectives
    assert "missing" not in objectives and "raises" not in objectives
    reasons = registry.broken()
    assert set(reasons) == {"missing", "raises"}
    assert reasons["missing"] == (
        "plugin_missing:Loss failed to import: ModuleNotFoundError: No module named 'kdtool_no_such_dependency'"
    )
    assert reasons["raises"] == "plugin_raises:Loss failed to import: RuntimeError: needs CUDA 13"


def test_asking_for_a_broken_plug_in_says_why(plugins):
    plugins(missing=BROKEN)
    with pytest.raises(UserError) as err:
        registry.get_class("missing")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("objective plug-in 'missing' is broken: plugin_missing:Loss failed to import")
    with pytest.raises(UserError, match="objective plug-in 'missing' is broken"):
        resolve(None, dict(objective="missing", student="S", data="d", output="o"))
    assert registry.get_objective("fkl").name == "fkl"  # the others still work
    with pytest.raises(UserError, match=r"unknown objective 'nope'; known objectives: atkd, fkl"):
        registry.get_class("nope")


def test_objectives_command_lists_the_working_and_names_the_broken(plugins, cli):
    plugins(good=WORKING, raises=RAISES)
    code, output = cli("objectives")
    assert code == 0, output
    assert "│ good " in output and "│ fkl " in output and "│ raises " not in output
    assert "skipped: objective plug-in 'raises': plugin_raises:Loss failed to import: RuntimeError" in output


def test_no_broken_plug_ins_among_the_built_ins():
    assert registry.broken() == {}
