"""The public API is small, explicit, and every function in it documents Args, Returns and an Example."""

from __future__ import annotations

import inspect

import distac


def test_public_names_are_few_and_importable():
    assert 12 <= len(distac.__all__) <= 18, distac.__all__
    for name in distac.__all__:
        assert getattr(distac, name) is not None, name


def test_every_public_function_documents_args_returns_and_an_example():
    missing = []
    for name in distac.__all__:
        obj = getattr(distac, name)
        if not inspect.isfunction(obj):
            continue
        doc = inspect.getdoc(obj) or ""
        missing += [f"{name}: {part}" for part in ("Args:", "Returns:", "Example") if part not in doc]
    assert not missing, missing


def test_docstring_examples_run():
    import doctest
    import importlib
    import pkgutil

    failed = []
    for info in pkgutil.walk_packages(distac.__path__, "distac."):
        if info.name.endswith("__main__"):
            continue
        result = doctest.testmod(importlib.import_module(info.name), optionflags=doctest.ELLIPSIS, verbose=False)
        if result.failed:
            failed.append(info.name)
    assert not failed, f"docstring examples fail in {failed} (python -m doctest shows which)"
