"""The one registry mechanism (priorvae.registry.Registry) that every plug-in kind uses."""

import textwrap

import pytest

from priorvae.errors import PluginError
from priorvae.registry import REQUIRED, Registry


class Widget:
    """A toy contract."""

    def __init__(self, size: int, colour: str = "red", *, width: int = 1):
        self.size, self.colour, self.width = size, colour, width


@pytest.fixture
def widgets():
    reg = Registry("widget", Widget, "priorvae.test_widgets", builtins="")
    reg.register("plain")(Widget)
    return reg


def test_register_list_get_build(widgets):
    class Big(Widget):
        pass

    widgets.register("big")(Big)
    assert widgets.list() == ["big", "plain"] and widgets.list("p*") == ["plain"]
    assert widgets.get("big") is Big and Big.widget_name == "big" and "big" in widgets
    built = widgets.build("big", size=3, colour="blue")
    assert (built.size, built.colour, built.width) == (3, "blue", 1)
    assert widgets.arguments(Big) == {"size": REQUIRED, "colour": "red", "width": 1}


def test_duplicates_bad_names_and_non_subclasses_are_errors(widgets):
    class Other(Widget):
        pass

    with pytest.raises(PluginError, match="a widget named 'plain' is already registered"):
        widgets.register("plain")(Other)
    for bad in ("", "a:b", 3):
        with pytest.raises(PluginError, match="non-empty string without ':'"):
            widgets.register(bad)
    with pytest.raises(PluginError, match="is not a subclass of test_plugins.Widget"):
        widgets.register("dict")(dict)


def test_unknown_names_and_arguments_are_one_line_with_what_is_accepted(widgets):
    with pytest.raises(PluginError, match=r"unknown widget 'plian'\. Known widgets: plain\. "
                                          r"Did you mean: plain\?"):
        widgets.get("plian")
    with pytest.raises(PluginError, match=r"got unknown argument\(s\) 'colour_'; it accepts: "
                                          r"size='<required>', colour='red', width=1"):
        widgets.build("plain", size=1, colour_="x")
    with pytest.raises(PluginError, match=r"needs argument\(s\): size"):
        widgets.build("plain")


def test_errors_inside_init_are_one_line(widgets):
    class Broken(Widget):
        def __init__(self, size: int):
            raise ZeroDivisionError("boom")

    widgets.register("broken")(Broken)
    with pytest.raises(PluginError, match="could not build widget 'broken': "
                                          "ZeroDivisionError: boom"):
        widgets.build("broken", size=1)


def test_file_spec_is_resolved_through_the_gate_and_checked(widgets, tmp_path):
    path = tmp_path / "user_widgets.py"
    path.write_text(textwrap.dedent("""
        from test_plugins import Widget

        class Mine(Widget):
            pass

        class NotOne:
            pass
    """))
    assert widgets.get(f"{path}:Mine").__name__ == "Mine"
    with pytest.raises(PluginError, match="NotOne is not a subclass of test_plugins.Widget"):
        widgets.get(f"{path}:NotOne")
    with pytest.raises(PluginError, match="widget file not found"):
        widgets.get(f"{tmp_path / 'nope.py'}:Mine")
    with pytest.raises(PluginError, match="changed since it was chosen"):
        widgets.get(f"{path}:Mine", sha256="0" * 64)


def test_list_shows_every_kind_and_one_plugins_arguments(capsys):
    from priorvae.cli import main
    from priorvae.priors import list_priors
    from priorvae.registry import KINDS

    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("]")[0] + "]" for line in lines] == [f"[{k}]" for k in KINDS]
    assert lines[-1] == f"[prior] name = {' | '.join(list_priors())}"
    assert main(["priors", "mog"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("mog: ") and "  n_components = 10" in out
    assert main(["list", "priors", "vampprior"]) == 0
    assert "given by priorvae: latent_dim, encoder, input_shape, data" in capsys.readouterr().out
    assert main(["list", "prior", "nope"]) == 2
    assert "no prior 'nope' is registered" in capsys.readouterr().err
