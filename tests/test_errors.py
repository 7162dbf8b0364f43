"""One exception root: every error class relaybeat defines is a `RelaybeatError`, and the tree in
relaybeat/errors.py names each of them."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

import pytest

import relaybeat
import relaybeat.errors
from relaybeat.errors import RelaybeatError


def project_exceptions() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(relaybeat.__path__, "relaybeat."):
        if info.name.endswith("__main__") or info.name.startswith("relaybeat.migrations"):
            continue  # running those would start the CLI or Alembic
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == info.name:
                found[value.__name__] = value
    return found


EXCEPTIONS = project_exceptions()


def test_the_tree_names_every_error_class_and_nothing_else() -> None:
    doc = relaybeat.errors.__doc__ or ""
    named = set(re.findall(r"[├└]── (\w+)", doc)) | {"RelaybeatError"}
    assert named == set(EXCEPTIONS) | {"RelaybeatError", "SettingsError", "Unavailable"}


@pytest.mark.parametrize("name", sorted(EXCEPTIONS))
def test_each_error_class_is_a_relaybeat_error(name: str) -> None:
    assert issubclass(EXCEPTIONS[name], RelaybeatError), f"{name} must derive from relaybeat.errors.RelaybeatError"


def drawn_tree() -> list[tuple[str, str]]:
    """(class, the class it is drawn under) for each line of the tree in relaybeat/errors.py."""
    pairs: list[tuple[str, str]] = []
    stack: list[tuple[int, str]] = [(-1, "RelaybeatError")]
    for line in (relaybeat.errors.__doc__ or "").splitlines():
        if "── " not in line:
            continue
        depth = line.index("── ")
        name = line[depth + 3 :].split()[0]
        while stack[-1][0] >= depth:
            stack.pop()
        pairs.append((name, stack[-1][1]))
        stack.append((depth, name))
    return pairs


@pytest.mark.parametrize(("child", "parent"), drawn_tree())
def test_the_tree_shows_each_class_under_its_real_parent(child: str, parent: str) -> None:
    cls = EXCEPTIONS.get(child) or getattr(relaybeat.errors, child)
    base = EXCEPTIONS.get(parent) or getattr(relaybeat.errors, parent)
    assert issubclass(cls, base), f"{child} is drawn under {parent} but does not derive from it"
