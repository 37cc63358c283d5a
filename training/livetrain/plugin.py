"""General plugin (`vllm.general_plugins`): runs in every vLLM process it is loaded in
(API server, engine core, workers) and installs what each of them needs.

- CPU workers keep plain, writable linear and fused-expert weights (vLLM would free
  them once packed), with vLLM's packed kernels rebuilt after each write (or, for
  linear layers, F.linear on the plain ones).
- Workers gain the `livetrain_*` methods of worker/rpc.py (collective_rpc), through
  vLLM's `worker_extension_cls`, composed with the user's own (worker/extension.py).
- The API server puts what the workers need of its settings (`WorkerSettings`: CPU
  kernels, readout blocks) into vLLM's config; workers read them from there, never
  from their own environment.
- vLLM's loader reads a model directory holding its folder lock for reading, once a
  sync in progress there has finished and an interrupted one has been finished or
  discarded (checkpoint/sync.settled): vLLM never loads a torn or half-patched file.
- The API server, when it builds vLLM's config, validates the launch readout and fixes
  the blocks to capture (api/readout_launch.py); the model runner then scores those
  blocks for requests that ask (worker/readout_tap.py).

Every patch itself is in vllm_internals.py; this module only decides which to install.
vLLM may load general plugins more than once per process, so registering is idempotent.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from livetrain.formats.messages import WorkerSettings

_registered = False


def _settled(model: str) -> contextlib.AbstractContextManager[None]:
    from livetrain.checkpoint.sync import settled

    return settled(Path(model)) if Path(model).is_dir() else contextlib.nullcontext()


def _worker_settings() -> WorkerSettings:
    """What the workers need from this launch's settings (the API server's, read from
    its environment), put into vLLM's config when the API server builds it."""
    from livetrain.api import readout_launch
    from livetrain.config import plugin_config

    config = plugin_config()
    return WorkerSettings(config.cpu_kernels, readout_launch.launch_blocks(config))


def register() -> None:
    """Entry point of the `vllm.general_plugins` group."""
    global _registered
    if _registered:
        return
    _registered = True

    from livetrain import vllm_internals
    from livetrain.worker import extension, readout_tap

    vllm_internals.check_version()
    if vllm_internals.is_cpu():
        vllm_internals.install_cpu_linear()
        vllm_internals.install_cpu_moe_plain_copies()
    vllm_internals.install_around_model_load(_settled)
    vllm_internals.install_engine_config_hook(_worker_settings, extension.qualname_with)
    vllm_internals.install_prefix_cache_skip(readout_tap.reads_prompt)
    vllm_internals.install_runner_tap(readout_tap.make_tap)
