"""The public surface: every name xenlike exports resolves, and nothing else leaks."""

import ast
import inspect
import subprocess
import sys

import xenlike


def test_every_exported_name_resolves() -> None:
    for name in xenlike.__all__:
        assert getattr(xenlike, name) is not None, name


def test_importing_xenlike_loads_no_subsystem() -> None:
    """A domain process importing one corner of xenlike pays for no other."""
    code = "import sys, xenlike; print(sorted(m for m in sys.modules if m.startswith('xenlike.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_unknown_names_are_attribute_errors() -> None:
    try:
        xenlike.no_such_thing  # noqa: B018
    except AttributeError as exc:
        assert "no_such_thing" in str(exc)
    else:
        raise AssertionError("expected AttributeError")


def test_type_checkers_see_the_lazy_names_where_they_load_from() -> None:
    """The TYPE_CHECKING imports are exactly the lazy `_EXPORTS`, each from its module."""
    tree = ast.parse(inspect.getsource(xenlike))
    (block,) = [
        node
        for node in tree.body
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
    ]
    seen = {
        alias.asname or alias.name: node.module
        for node in block.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert seen == xenlike._EXPORTS
