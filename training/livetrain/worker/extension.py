"""vLLM worker: the `worker_extension_cls` name livetrain gives vLLM, composed with a
user's own extension.

vLLM takes one qualified class name (`--worker-extension-cls`) and mixes that class
into its worker class. A user's own extension must keep working beside livetrain's, so
the name livetrain sets carries both: `livetrain.worker.extension.With_<the user's
qualified name, base64url>`, which this module builds on demand (module `__getattr__`)
into a class deriving from both. The name is all vLLM passes to its worker processes,
so nothing else has to travel with it.
"""

from __future__ import annotations

import base64
from functools import cache

from livetrain.vllm_internals import resolve
from livetrain.worker.rpc import LivetrainWorkerExtension

ALONE = f"{__name__}.LivetrainWorkerExtension"
_COMPOSED = "With_"

__all__ = ["ALONE", "LivetrainWorkerExtension", "qualname_with"]


def qualname_with(user: str | None) -> str:
    """The extension name to give vLLM when the user gave `user` (None: none). A name
    livetrain already composed is returned as it is."""
    if not user or user == ALONE or user.startswith(f"{__name__}.{_COMPOSED}"):
        return user or ALONE
    encoded = base64.urlsafe_b64encode(user.encode()).decode().rstrip("=")
    return f"{__name__}.{_COMPOSED}{encoded}"


@cache
def _composed(name: str) -> type:
    encoded = name.removeprefix(_COMPOSED)
    user_name = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
    module, _, name = user_name.rpartition(".")
    user = resolve(module, name)
    clash = sorted(
        a for a in vars(LivetrainWorkerExtension) if not a.startswith("__") and hasattr(user, a)
    )
    if clash:
        raise TypeError(f"worker extension {user_name} defines livetrain's methods {clash}")
    return type(name, (LivetrainWorkerExtension, user), {"__module__": __name__})


def __getattr__(name: str) -> type:
    if name.startswith(_COMPOSED):
        return _composed(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
