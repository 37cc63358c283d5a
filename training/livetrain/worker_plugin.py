"""General plugin: runs in every vLLM process (API server, engine core, workers).

Four changes, all idempotent because vLLM may load general plugins more than once:
- On CPU, vLLM prepacks each linear weight into a kernel-specific layout and frees
  the original, so writes to `layer.weight` would never reach inference. We keep
  the plain weight and run `F.linear` on it (the cost is measured in bench/).
- Every worker gains `livetrain_export_weights`, reachable through
  `engine_client.collective_rpc`, which hands out zero-copy views of its weights.
- Before vLLM reads a model directory, an interrupted checkpoint sync in it is
  finished or discarded (checkpoint_sync.recover), so vLLM never loads a torn file.
- With a readout at launch (LIVETRAIN_READOUT), the model runner reports per-token
  concept scores for requests that ask (worker_readout.py).
"""

from __future__ import annotations

import torch

_registered = False


def register() -> None:
    """Entry point of the `vllm.general_plugins` group."""
    global _registered
    if _registered:
        return
    _registered = True

    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        _keep_cpu_weights_live()
    _add_worker_rpc()
    _recover_before_loading()
    _enable_live_readout()


def _use_plain_weight(self, layer: torch.nn.Module) -> None:
    # vLLM's CPU `apply` calls `layer.cpu_linear(x, layer.weight, bias)`; pointing
    # it at F.linear makes inference read the very tensor the trainer updates.
    layer.cpu_linear = torch.nn.functional.linear


def _keep_cpu_weights_live() -> None:
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    UnquantizedLinearMethod.process_weights_after_loading = _use_plain_weight
    UnquantizedEmbeddingMethod.process_weights_after_loading = _use_plain_weight


def _add_worker_rpc() -> None:
    from vllm.v1.worker.worker_base import WorkerBase

    from livetrain import worker_readout
    from livetrain.worker_export import export_weights

    def livetrain_export_weights(self, hf_names: list[str]) -> dict:
        return export_weights(
            self.model_runner.get_model(), hf_names, self.parallel_config.world_size
        )

    def livetrain_readout_load(self, folder: str, version: int) -> dict:
        return worker_readout.load_rpc(folder, version)

    WorkerBase.livetrain_export_weights = livetrain_export_weights

    def livetrain_readout_stats(self) -> dict:
        return worker_readout.stats_rpc()

    WorkerBase.livetrain_readout_load = livetrain_readout_load
    WorkerBase.livetrain_readout_stats = livetrain_readout_stats


def _enable_live_readout() -> None:
    # The first process (the API server) validates the launch readout and creates the
    # score ring; the engine processes inherit both through the environment.
    from livetrain import readout_launch, worker_readout
    from livetrain.config import PluginConfig

    readout_launch.prepare_launch(PluginConfig.from_env())
    readout_launch.add_layers_to_compile_hash()
    worker_readout.install()


def _recover_before_loading() -> None:
    from pathlib import Path

    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    from livetrain.checkpoint_sync import recover

    load_model = BaseModelLoader.load_model

    def load_model_after_recovery(self, vllm_config, model_config, *args, **kwargs):
        if Path(model_config.model).is_dir():
            recover(Path(model_config.model))
        return load_model(self, vllm_config, model_config, *args, **kwargs)

    BaseModelLoader.load_model = load_model_after_recovery
