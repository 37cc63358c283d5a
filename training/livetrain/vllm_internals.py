"""Every place livetrain reaches into vLLM beyond its public plugin interfaces.

vLLM gives plugins two documented hooks (general plugins and endpoint plugins); the
rest of what livetrain needs (plain CPU weights, worker methods, block outputs, the
engine's pause) is done here, against private names of the supported vLLM range. A
vLLM upgrade that moves one of them breaks this module and its test
(tests/test_vllm_internals.py checks that every name in `TOUCHED` exists), not code
spread over four processes. `check_version` refuses other versions when the plugin
registers, with the range in the message.

Callers are grouped by the process they run in: patches installed in every process
(`install_*`), the worker's view of a model-runner step, and the API server's handles on
the engine client.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import msgspec
import torch
from torch import nn

from livetrain.config import PluginConfig
from livetrain.formats.messages import WorkerSettings
from livetrain.weight_map import (
    MappingError,
    Placement,
    Provenance,
    assemble,
    assemble_part,
    meta_twin,
    parameters_on_meta,
    parameters_replaced,
    pieces_by_source,
)

SUPPORTED_VLLM = ">=0.32.0,<0.33"  # also the pin of the `gpu` and `cpu` extras
ADDITIONAL_CONFIG_KEY = "livetrain"  # our entry in VllmConfig.additional_config

# Every vLLM name used below, for tests/test_vllm_internals.py: (module, class or
# attribute path) resolved by import, and (module, class, attributes) that instances
# have (class attributes, dataclass or namedtuple fields, or `self.X =` in its source).
TOUCHED: tuple[tuple[str, str], ...] = (
    ("vllm.model_executor.layers.linear", "UnquantizedLinearMethod.process_weights_after_loading"),
    (
        "vllm.model_executor.layers.vocab_parallel_embedding",
        "UnquantizedEmbeddingMethod.process_weights_after_loading",
    ),
    ("vllm.model_executor.layers.vocab_parallel_embedding", "VocabParallelEmbedding"),
    ("vllm.model_executor.layers.utils", "dispatch_cpu_unquantized_gemm"),
    ("vllm._custom_ops", "CPUDNNLGEMMHandler"),
    ("vllm._custom_ops", "cpu_prepack_moe_weight"),
    ("vllm.model_executor.model_loader.base_loader", "BaseModelLoader.load_model"),
    ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner.load_model"),
    ("vllm.v1.request", "Request.get_skip_reading_prefix_cache"),
    ("vllm.engine.arg_utils", "EngineArgs.create_engine_config"),
    ("vllm.platforms", "current_platform"),
    ("vllm.envs", "VLLM_API_KEY"),
    ("vllm.entrypoints.serve.middleware.authenticate", "AuthenticationMiddleware.verify_token"),
    ("vllm.model_executor.models.llama", "LlamaForCausalLM.set_aux_hidden_state_layers"),
    (
        "vllm.model_executor.layers.fused_moe.experts.cpu_moe",
        "CPUUnquantizedExperts.process_weights_after_loading",
    ),
    ("vllm.model_executor.layers.fused_moe.experts.cpu_moe", "replace_parameter"),
    ("vllm.model_executor.model_loader.utils", "get_model_architecture"),
    ("vllm.distributed", "init_distributed_environment"),
    ("vllm.distributed", "initialize_model_parallel"),
    ("vllm.distributed", "destroy_model_parallel"),
    ("vllm.distributed.parallel_state", "model_parallel_is_initialized"),
    ("vllm.distributed.parallel_state", "get_tensor_model_parallel_rank"),
    ("vllm.config", "set_current_vllm_config"),
    ("vllm.engine.arg_utils", "EngineArgs"),
    ("vllm.v1.engine.core_client", "AsyncMPClient.pause_scheduler_async"),
    ("vllm.config", "get_current_vllm_config"),
    ("vllm.model_executor.layers.utils", "cpu_unquantized_gemm"),
)
ATTRIBUTES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("vllm._custom_ops", "CPUDNNLGEMMHandler", ("handler_tensor",)),
    (
        "vllm.v1.worker.gpu_model_runner",
        "GPUModelRunner",
        (
            "load_model",
            "execute_model",
            "sample_tokens",
            "get_model",
            "execute_model_state",
            "max_num_tokens",
            "use_aux_hidden_state_outputs",
            "use_async_scheduling",
            "input_batch",
            "discard_request_mask",
            "query_start_loc",
            "requests",
            "model_config",
            "vllm_config",
            "device",
        ),
    ),
    ("vllm.v1.worker.gpu_model_runner", "ExecuteModelState", ("aux_hidden_states",)),
    (
        "vllm.v1.worker.gpu_input_batch",
        "InputBatch",
        ("num_reqs", "req_ids", "num_computed_tokens_cpu"),
    ),
    (
        "vllm.v1.worker.gpu_input_batch",
        "CachedRequestState",
        ("sampling_params", "num_prompt_tokens", "prompt_token_ids", "output_token_ids"),
    ),
    ("vllm.v1.core.sched.output", "SchedulerOutput", ("scheduled_new_reqs", "finished_req_ids")),
    ("vllm.v1.core.sched.output", "NewRequestData", ("req_id", "sampling_params")),
    ("vllm.v1.outputs", "ModelRunnerOutput", ("req_id_to_index", "sampled_token_ids")),
    ("vllm.v1.worker.worker_base", "WorkerBase", ("model_runner", "parallel_config")),
    ("vllm.model_executor.layers.fused_moe.experts.cpu_moe", "CPUUnquantizedExperts", ("isa",)),
    (
        "vllm.config",
        "VllmConfig",
        ("additional_config", "compute_hash", "parallel_config", "model_config"),
    ),
    ("vllm.config", "ModelConfig", ("quantization", "model", "dtype", "served_model_name")),
    ("vllm.config", "ParallelConfig", ("worker_extension_cls",)),
    ("vllm.sampling_params", "SamplingParams", ("extra_args", "n")),
    ("vllm.v1.request", "Request", ("sampling_params",)),
    ("vllm.v1.engine", "EngineCoreRequest", ("request_id", "sampling_params")),
    ("vllm.v1.engine.parallel_sampling", "ParentRequest", ("n",)),
    ("vllm.v1.engine.output_processor", "OutputProcessor", ("add_request", "request_states")),
    (
        "vllm.v1.engine.async_llm",
        "AsyncLLM",
        (
            "engine_core",
            "output_processor",
            "vllm_config",
            "model_config",
            "collective_rpc",
            "get_tokenizer",
            "get_weight_version",
            "update_weight_version",
            "pause_generation",
            "resume_generation",
            "reset_prefix_cache",
        ),
    ),
)


# Keyword (and named positional) arguments livetrain passes to vLLM functions, or
# takes from them in a wrapper: (module, path, parameter names its signature has).
KEYWORDS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("vllm.model_executor.layers.utils", "dispatch_cpu_unquantized_gemm", ("remove_weight",)),
    ("vllm.v1.engine.async_llm", "AsyncLLM.reset_prefix_cache", ("reset_running_requests",)),
    ("vllm.v1.engine.async_llm", "AsyncLLM.pause_generation", ("mode", "clear_cache")),
    ("vllm.v1.engine.async_llm", "AsyncLLM.collective_rpc", ("method", "args")),
    ("vllm.v1.engine.core_client", "AsyncMPClient.pause_scheduler_async", ("mode", "clear_cache")),
    (
        "vllm.model_executor.model_loader.base_loader",
        "BaseModelLoader.load_model",
        ("vllm_config", "model_config"),
    ),
    (
        "vllm.v1.engine.output_processor",
        "OutputProcessor.add_request",
        ("request", "prompt", "parent_req"),
    ),
    (
        "vllm.model_executor.layers.fused_moe.experts.cpu_moe",
        "replace_parameter",
        ("layer", "param_name", "new_tensor"),
    ),
)
# What livetrain relies on inside vLLM functions it wraps or whose results it reads:
# (module, path, text its source must contain).
SOURCES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    # the CPU linear calls the layer's own `cpu_linear`, which _use_plain_weight replaces
    ("vllm.model_executor.layers.utils", "cpu_unquantized_gemm", ("layer.cpu_linear(",)),
    # the oneDNN kernel closes over its handler (`_onednn_handler` finds it there)
    (
        "vllm.model_executor.layers.utils",
        "dispatch_cpu_unquantized_gemm",
        ("ops.onednn_mm(handler",),
    ),
    (
        "vllm.model_executor.layers.linear",
        "UnquantizedLinearMethod.process_weights_after_loading",
        ("_cpu_skip_gemm_dispatch",),
    ),
    # the packing goes through the module-level replace_parameter we swap
    (
        "vllm.model_executor.layers.fused_moe.experts.cpu_moe",
        "CPUUnquantizedExperts.process_weights_after_loading",
        ("replace_parameter(",),
    ),
)
# vLLM's CPU ops called through torch.ops (registered when vllm._custom_ops loads).
CPU_OPS: tuple[tuple[str, str], ...] = (
    ("_C", "create_onednn_mm_handler"),
    ("_C", "release_dnnl_matmul_handler"),
)


class UnsupportedVllm(RuntimeError):
    """The installed vLLM is outside the range these patches were written against."""


def check_version() -> None:
    import vllm
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    installed = Version(vllm.__version__)
    if Version(installed.base_version) not in SpecifierSet(SUPPORTED_VLLM):
        raise UnsupportedVllm(
            f"livetrain supports vLLM {SUPPORTED_VLLM}; vLLM {vllm.__version__} is installed "
            "(install a supported version, or a livetrain release for yours)"
        )


def resolve(module: str, path: str) -> Any:
    """The object at `module`.`path` (dotted), raising AttributeError if vLLM moved it."""
    target: Any = importlib.import_module(module)
    for part in path.split("."):
        target = getattr(target, part)
    return target


def is_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def _patch(owner: Any, name: str, value: Any) -> None:
    """Replace `owner.name` (a class's method, or an object's attribute) with `value`."""
    setattr(owner, name, value)


def _once(owner: Any, flag: str) -> bool:
    """True the first time for (owner, flag): vLLM may load general plugins repeatedly."""
    if getattr(owner, flag, False):
        return False
    setattr(owner, flag, True)
    return True


# ---- patches (installed by plugin.register in every vLLM process) ------------------


def _use_plain_weight(self: Any, layer: nn.Module) -> None:
    # vLLM's CPU `apply` calls `layer.cpu_linear(x, layer.weight, bias)`; pointing
    # it at F.linear makes inference read the very tensor the trainer updates.
    _patch(layer, "cpu_linear", torch.nn.functional.linear)


ONEDNN_PRIMITIVE_CACHE = 32  # what vLLM's dispatch passes to create_onednn_mm


def _onednn_handler(cpu_linear: Any) -> Any:
    """The oneDNN handler vLLM's dispatch closed over, or None for any other kernel."""
    from vllm._custom_ops import CPUDNNLGEMMHandler

    for cell in getattr(cpu_linear, "__closure__", None) or ():
        if isinstance(cell.cell_contents, CPUDNNLGEMMHandler):
            return cell.cell_contents
    return None


def _keep_repackable(layer: nn.Module, bias: torch.Tensor | None, reads_plain: bool) -> None:
    """After vLLM's dispatch: keep its kernel where worker/repack.py can refresh it
    (oneDNN), else run F.linear on the plain weight. vLLM's SGL path casts the bias to
    fp32 by replacing its storage, which would detach it from the trainer's view: that
    layer goes back to its own bias and F.linear. `reads_plain`: inference also reads
    the plain weight itself (an embedding's lookup), so writing it is never unfenced."""
    _patch(layer, "_livetrain_reads_plain", reads_plain)
    handler = _onednn_handler(layer.cpu_linear)
    kept_bias: Any = getattr(layer, "bias", None)
    if bias is not None and kept_bias.data.data_ptr() != bias.data_ptr():
        kept_bias.data = bias
        handler = None
    if handler is not None:
        layer._livetrain_onednn = handler
    elif layer.cpu_linear is not torch.nn.functional.linear:
        _use_plain_weight(None, layer)


def _dispatch_keeping_weight(self: Any, layer: nn.Module) -> None:
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    weight = layer.weight
    if getattr(layer, "_cpu_skip_gemm_dispatch", False) or weight.ndim != 2 or weight.is_meta:
        return _use_plain_weight(self, layer)
    bias = getattr(layer, "bias", None)
    dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
    _keep_repackable(layer, bias.data if bias is not None else None, reads_plain=False)


def _plain_kernels() -> bool:
    """Does this launch run F.linear on the plain weights (WorkerSettings.cpu_kernels)?
    Read while vLLM loads the model, when its config is the current one."""
    from vllm.config import get_current_vllm_config

    return worker_settings(get_current_vllm_config()).cpu_kernels == "plain"


def install_cpu_linear() -> None:
    """On CPU, vLLM prepacks each linear weight into a kernel-specific layout and frees
    the original, so writes to `layer.weight` would never reach inference.

    "vllm" kernels: keep vLLM's kernel and also the plain weight (the trainer's view);
    the packed copy is packed afresh from the plain weight after every write and swapped
    in (worker/repack.py). Decode runs at vLLM's speed; memory holds a second copy of
    every packed weight (a third while fresh copies are packed). "plain": F.linear on
    the plain weight, no second copy, slower batched decode (bench/bench_decode.py
    measures both against vLLM's default)."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    if not _once(UnquantizedLinearMethod, "_livetrain_cpu_linear"):
        return
    embedding_dispatch = UnquantizedEmbeddingMethod.process_weights_after_loading

    def linear_keeping_weight(self: Any, layer: nn.Module) -> None:
        if _plain_kernels():
            return _use_plain_weight(self, layer)
        _dispatch_keeping_weight(self, layer)

    def embedding_keeping_weight(self: Any, layer: nn.Module) -> None:
        if _plain_kernels():
            return _use_plain_weight(self, layer)
        embedding_dispatch(self, layer)  # vLLM keeps the embedding's plain weight itself
        _keep_repackable(layer, None, reads_plain=True)

    _patch(UnquantizedLinearMethod, "process_weights_after_loading", linear_keeping_weight)
    _patch(UnquantizedEmbeddingMethod, "process_weights_after_loading", embedding_keeping_weight)


def install_cpu_moe_plain_copies() -> None:
    """On CPU, vLLM packs each fused-experts weight (`w13_weight`, `w2_weight`) into
    its grouped-GEMM layout and drops the loaded one. Keep the loaded (plain) tensor
    beside the packed one, as `_livetrain_plain` on the layer: it is what the trainer
    shares and writes, and `MoePackedCopy` packs it into the served tensor afresh.

    vLLM replaces the parameter once per transform (zero-padding, then packing); the
    tensor the last replacement drops is the plain one, in the layout packing reads."""
    from vllm.model_executor.layers.fused_moe.experts import cpu_moe

    experts = cpu_moe.CPUUnquantizedExperts
    if not _once(experts, "_livetrain_keeps_plain"):
        return
    process = experts.process_weights_after_loading
    replace = cpu_moe.replace_parameter

    def replace_keeping_plain(layer, name, new_tensor, *args, **kwargs):
        if name in ("w13_weight", "w2_weight"):
            layer.__dict__.setdefault("_livetrain_plain", {})[name] = getattr(layer, name)
        return replace(layer, name, new_tensor, *args, **kwargs)

    def process_keeping_plain(self, layer):
        cpu_moe.replace_parameter = replace_keeping_plain  # type: ignore[assignment]
        try:
            process(self, layer)
        finally:
            cpu_moe.replace_parameter = replace
        if "_livetrain_plain" in layer.__dict__:
            layer._livetrain_moe_isa = self.isa

    _patch(experts, "process_weights_after_loading", process_keeping_plain)


def _plain_copies(model: nn.Module) -> dict[str, torch.Tensor]:
    """vLLM parameter name -> the plain tensor kept beside its packed copy (CPU MoE)."""
    plain: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules():
        for attr, tensor in module.__dict__.get("_livetrain_plain", {}).items():
            plain[f"{module_name}.{attr}" if module_name else attr] = tensor
    return plain


def shared_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every vLLM parameter by name, as the tensor training shares: the parameter
    itself, or the plain tensor kept beside a packed one."""
    params = dict(model.named_parameters())
    return {name: t.data for name, t in {**params, **_plain_copies(model)}.items()}


def checkpoint_placements(
    model: nn.Module, tensors: dict[str, tuple[list[int], torch.dtype]], sharded: bool = False
) -> tuple[dict[str, tuple[tuple[int, ...], Placement]], list[str]]:
    """Where each checkpoint tensor (name -> shape, dtype) lives in the model's
    parameters, decided by the model class's own `load_weights` run on meta tensors
    (weight_map.Provenance), and the names it skips (a tied lm_head, say). Each is the
    origin of the box of the tensor this model holds and the box's placement: the whole
    tensor at the zero origin, or, on a tensor-parallel rank (`sharded`), the part
    vLLM's loader gave this rank.

    Every parameter is swapped for a meta twin while the loader runs (nothing is read or
    written; the parameters are back before this returns); a parameter whose plain
    tensor is kept beside a packed one is probed with the plain tensor's layout, since
    that is what the loader filled. Raises MappingError naming every tensor the loader
    does not simply move, and how it changes it."""
    plain = _plain_copies(model)
    names: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), name)
    mode = Provenance()

    def twin(param: torch.Tensor) -> torch.Tensor:
        return meta_twin(param, like=plain.get(names.get(id(param), "")))

    with parameters_replaced(model, twin) as twins:
        for original, replacement in twins.items():
            mode.destination(names[original], replacement)
        probes = [
            (n, torch.empty(shape, dtype=dtype, device="meta"))
            for n, (shape, dtype) in tensors.items()
        ]
        for name, probe in probes:
            mode.track(name, probe)
        with mode:
            model.load_weights(iter(probes))  # type: ignore[operator]
    grouped = pieces_by_source(mode.pieces)
    placements: dict[str, tuple[tuple[int, ...], Placement]] = {}
    problems: list[str] = []
    for name, (shape, _) in tensors.items():
        if name in mode.computed:
            problems.append(
                f"{name}: vLLM {mode.computed[name]} at load, so training it would change "
                "values inference never reads"
            )
        elif name in grouped:
            try:
                placements[name] = (
                    assemble_part(name, shape, grouped[name])
                    if sharded
                    else ((0,) * len(shape), assemble(name, shape, grouped[name]))
                )
            except MappingError as exc:
                problems.append(str(exc))
    if problems:
        raise MappingError("; ".join(problems))
    return placements, sorted(set(tensors) - set(placements))


class PackedCopy(Protocol):
    """One of vLLM's packed CPU kernels and the plain weight it is packed from."""

    @property
    def weight(self) -> torch.Tensor: ...

    def pack(self) -> Any: ...  # a fresh packed copy of the plain weight, not yet served
    def swap(self, fresh: Any) -> None: ...  # serve it (generation is paused)
    def release(self, fresh: Any) -> None: ...  # drop one that was never served


@dataclass(frozen=True)
class OneDnnCopy:
    """A linear layer's oneDNN kernel (vLLM's CPUDNNLGEMMHandler)."""

    weight: torch.Tensor
    handler: Any

    def pack(self) -> int:
        weight = self.weight.t()
        return int(torch.ops._C.create_onednn_mm_handler(weight, ONEDNN_PRIMITIVE_CACHE))

    def swap(self, fresh: int) -> None:
        """The pointer goes into the existing `handler_tensor` in place, which compiled
        graphs read at run time, so they pick it up without a retrace."""
        stale = int(self.handler.handler_tensor.item())
        self.handler.handler_tensor.fill_(fresh)
        self.release(stale)

    def release(self, fresh: int) -> None:
        torch.ops._C.release_dnnl_matmul_handler(fresh)


@dataclass(frozen=True)
class MoePackedCopy:
    """A fused-experts weight in vLLM's CPU grouped-GEMM layout, and its plain tensor."""

    weight: torch.Tensor  # the plain tensor (the trainer's view)
    served: torch.Tensor  # the packed parameter inference reads
    isa: str

    def pack(self) -> torch.Tensor:
        from vllm._custom_ops import cpu_prepack_moe_weight

        return cpu_prepack_moe_weight(self.weight, self.isa)

    def swap(self, fresh: torch.Tensor) -> None:
        # in place: compiled graphs hold the served tensor itself
        self.served.copy_(fresh)

    def release(self, fresh: torch.Tensor) -> None:
        pass  # freed with the last reference


def packed_copies(model: nn.Module, param_names: Sequence[str]) -> tuple[list[PackedCopy], bool]:
    """The packed kernels that read copies of the named parameters, and whether inference
    reads every one of them only through such a copy (then writing them does not touch
    what inference reads until the copies are swapped)."""
    modules = dict(model.named_modules())
    copies: dict[int, PackedCopy] = {}
    only_packed = True
    for name in param_names:
        module_name, _, attr = name.rpartition(".")
        module: Any = modules.get(module_name)
        handler = getattr(module, "_livetrain_onednn", None)
        plain = getattr(module, "__dict__", {}).get("_livetrain_plain", {}).get(attr)
        if plain is not None:
            served = getattr(module, attr)
            copies[id(served)] = MoePackedCopy(plain, served.data, module._livetrain_moe_isa)
        elif attr == "weight" and handler is not None:
            only_packed = only_packed and not getattr(module, "_livetrain_reads_plain", True)
            copies[id(handler)] = OneDnnCopy(module.weight, handler)
        else:
            only_packed = False
    return list(copies.values()), only_packed


def build_meta_model(model_dir: str, dtype: str) -> nn.Module:
    """vLLM's model class for `model_dir`, built on the meta device (no weights, no
    memory) in this process, as the worker would build it at tensor parallel size 1:
    what `livetrain check` probes without starting a server. The first call initialises
    a one-process torch.distributed group, which vLLM's layers ask for.

    vLLM serves some families through its Transformers backend, which decorates
    transformers' model classes in place: build any Hugging Face model this process
    needs before calling this."""
    from vllm.config import set_current_vllm_config
    from vllm.distributed import (
        destroy_model_parallel,
        init_distributed_environment,
        initialize_model_parallel,
    )
    from vllm.distributed.parallel_state import model_parallel_is_initialized
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader.utils import get_model_architecture

    args = EngineArgs(model=model_dir, dtype=dtype, enforce_eager=True)  # type: ignore[arg-type]
    config = args.create_engine_config()
    with set_current_vllm_config(config):
        if model_parallel_is_initialized():
            destroy_model_parallel()  # its groups depend on the model (MoE's expert group)
        else:
            rendezvous = Path(tempfile.mkdtemp(prefix="livetrain-check-")) / "rendezvous"
            init_distributed_environment(
                world_size=1,
                rank=0,
                local_rank=0,
                distributed_init_method=f"file://{rendezvous}",
                backend="gloo",
            )
        initialize_model_parallel(1, 1)
        model_class, _ = get_model_architecture(config.model_config)
        with parameters_on_meta():
            return model_class(vllm_config=config, prefix="")


def install_around_model_load(guard: Callable[[str], AbstractContextManager[None]]) -> None:
    """Run vLLM's loader inside `guard(model_path)`, which holds while it reads the files."""
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    if not _once(BaseModelLoader, "_livetrain_around_load"):
        return
    load_model = BaseModelLoader.load_model

    def load_model_guarded(self, vllm_config, model_config, *args, **kwargs):
        with guard(model_config.model):
            return load_model(self, vllm_config, model_config, *args, **kwargs)

    _patch(BaseModelLoader, "load_model", load_model_guarded)


def install_engine_config_hook(
    settings: Callable[[], WorkerSettings], worker_extension: Callable[[str | None], str]
) -> None:
    """When this process builds vLLM's config (the API server does, once): put
    `settings()` into `additional_config[ADDITIONAL_CONFIG_KEY]`, and make vLLM mix
    livetrain's worker methods into its workers (`parallel_config.worker_extension_cls`,
    `worker_extension(the name already there)`: composed with a user's own).

    additional_config is how settings reach the engine and worker processes vLLM starts:
    it travels with the config, and it is part of the compile cache key."""
    from vllm.engine.arg_utils import EngineArgs

    if not _once(EngineArgs, "_livetrain_config_hook"):
        return
    create = EngineArgs.create_engine_config

    def create_engine_config(self, *args, **kwargs):
        entry = msgspec.to_builtins(settings())
        config = create(self, *args, **kwargs)
        if not isinstance(config.additional_config, dict):
            raise ValueError("livetrain needs --additional-config to be a JSON object")
        config.additional_config[ADDITIONAL_CONFIG_KEY] = entry
        parallel = config.parallel_config
        parallel.worker_extension_cls = worker_extension(parallel.worker_extension_cls or None)
        return config

    _patch(EngineArgs, "create_engine_config", create_engine_config)


def pin_v1_model_runner() -> None:
    """Keep vLLM on the V1 model runner (the one install_runner_tap patches). A vLLM
    setting read by the engine processes from the environment they inherit; CUDA builds
    default to V2 when Triton is present. An explicit request for V2 is refused."""
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "").lower() in ("1", "true"):
        raise ValueError(
            "the live readout patches vLLM's V1 model runner; unset VLLM_USE_V2_MODEL_RUNNER"
        )
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"


def worker_settings(vllm_config: Any) -> WorkerSettings:
    """Our entry of a VllmConfig's additional_config; the defaults for a config that was
    not built through the hook above (nothing livetrain launched)."""
    extra = getattr(vllm_config, "additional_config", None)
    entry = extra.get(ADDITIONAL_CONFIG_KEY) if isinstance(extra, dict) else None
    if entry is None:
        return WorkerSettings(cpu_kernels=PluginConfig.cpu_kernels)
    return msgspec.convert(entry, WorkerSettings)


def install_prefix_cache_skip(skip: Callable[[dict[str, Any]], bool]) -> None:
    """Engine core: requests whose extra_args satisfy `skip` never read the prefix cache
    (they still write to it). The same rule vLLM applies to prompt-logprob requests."""
    from vllm.v1.request import Request

    if not _once(Request, "_livetrain_prefix_skip"):
        return
    original = Request.get_skip_reading_prefix_cache

    def get_skip_reading_prefix_cache(self) -> bool:
        return skip(extra_args(self.sampling_params)) or original(self)

    _patch(Request, "get_skip_reading_prefix_cache", get_skip_reading_prefix_cache)


class RunnerTap(Protocol):
    """What the live readout does around each model-runner step (worker/readout_tap.py)."""

    def before_step(self, scheduler_output: Any) -> None: ...
    def before_forward(self, runner: Any) -> None: ...  # the step's batch is laid out
    def after_forward(self, runner: Any) -> None: ...
    def after_sample(self, output: Any) -> None: ...


def install_runner_tap(make_tap: Callable[[Any], RunnerTap | None]) -> None:
    """Wrap the V1 model runner's load, step, forward and sampling: after the model
    loads, `make_tap(runner)` decides whether this runner has a tap (None: the step
    methods run untouched but for one attribute read). `_model_forward` is where the
    step's batch is laid out (rows per request) and the model not yet run. On CPU,
    CPUModelRunner's load_model replaces the base one, so that is the one wrapped."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if not _once(GPUModelRunner, "_livetrain_patched"):
        return
    loader: Any = GPUModelRunner
    if is_cpu():
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner as loader
    load_model = loader.load_model
    execute_model, sample_tokens = GPUModelRunner.execute_model, GPUModelRunner.sample_tokens
    model_forward = GPUModelRunner._model_forward

    def patched_load_model(self, *args, **kwargs):
        load_model(self, *args, **kwargs)
        self._livetrain_tap = make_tap(self)

    def patched_execute_model(self, scheduler_output, *args, **kwargs):
        tap = getattr(self, "_livetrain_tap", None)
        if tap is None:
            return execute_model(self, scheduler_output, *args, **kwargs)
        tap.before_step(scheduler_output)
        result = execute_model(self, scheduler_output, *args, **kwargs)
        tap.after_forward(self)
        return result

    def patched_model_forward(self, *args, **kwargs):
        if (tap := getattr(self, "_livetrain_tap", None)) is not None:
            tap.before_forward(self)
        return model_forward(self, *args, **kwargs)

    def patched_sample_tokens(self, *args, **kwargs):
        output = sample_tokens(self, *args, **kwargs)
        if (tap := getattr(self, "_livetrain_tap", None)) is not None:
            tap.after_sample(output)
        return output

    _patch(loader, "load_model", patched_load_model)
    _patch(GPUModelRunner, "execute_model", patched_execute_model)
    _patch(GPUModelRunner, "sample_tokens", patched_sample_tokens)
    _patch(GPUModelRunner, "_model_forward", patched_model_forward)


def worker_tap(worker: Any) -> Any:
    """The tap `install_runner_tap` gave this worker's model runner (None: none)."""
    return getattr(worker.model_runner, "_livetrain_tap", None)


# ---- worker: the model and one model-runner step -------------------------------------


def worker_model(worker: Any) -> nn.Module:
    return worker.model_runner.get_model()


def worker_parallel(worker: Any) -> tuple[int, int]:
    """(tensor-parallel size, pipeline-parallel size) of the worker's engine."""
    config = worker.parallel_config
    return int(config.tensor_parallel_size), int(config.pipeline_parallel_size)


def steer_block_outputs(runner: Any, blocks: Sequence[int]) -> dict[int, torch.Tensor]:
    """Make each of `blocks` (0-based) add the first rows of its own static buffer
    `[max_num_tokens, hidden]` to its output, every step; returns the zeroed buffers.

    The add is a custom op on a buffer whose address never changes, so compiled graphs
    keep it and CUDA graphs replay it reading whatever the buffer holds: which rows
    are steered is data, written before the forward (worker/steering.py), never a
    Python branch that a captured graph would freeze. Call before
    `capture_block_outputs`, so a captured output is the steered one."""
    layers, buffers = _block_buffers(runner, blocks)
    for block, buffer in zip(blocks, buffers, strict=True):
        _add_into_output(layers[block], buffer)
    return dict(zip(blocks, buffers, strict=True))


def capture_block_outputs(runner: Any, blocks: Sequence[int]) -> None:
    """Make the loaded model also give the outputs of `blocks` (0-based) every step.

    Where the model class has vLLM's EAGLE-3 aux-hidden-state path, that: the model
    returns `hidden + residual` after each block, as part of its own code. Families
    without it (Gemma 2 and 3, Mixtral, OLMoE in vLLM 0.32) get the same sum written by
    each captured decoder block into a static buffer through a custom op that mutates
    it, which compiled graphs keep (they drop a forward hook, or an op without an
    effect) and CUDA graphs replay; `step_block_outputs` reads the step's rows back."""
    model = runner.get_model()
    if runner.use_aux_hidden_state_outputs:
        raise RuntimeError("live readout: speculative decoding already uses the aux outputs")
    if runner.use_async_scheduling:  # tokens arrive later, off this path (CUDA only)
        raise RuntimeError("live readout: start vLLM with --no-async-scheduling")
    if hasattr(model, "set_aux_hidden_state_layers"):
        model.set_aux_hidden_state_layers(tuple(i + 1 for i in blocks))
        runner.use_aux_hidden_state_outputs = True
        return
    layers, buffers = _block_buffers(runner, blocks)
    for block, buffer in zip(blocks, buffers, strict=True):
        _write_output_into(layers[block], buffer)
    runner._livetrain_block_buffers = buffers


def _block_buffers(runner: Any, blocks: Sequence[int]) -> tuple[nn.ModuleList, list[torch.Tensor]]:
    """The model's decoder blocks, and one zeroed [max_num_tokens, hidden] buffer per block
    in `blocks`, in the model's dtype and on its device."""
    model = runner.get_model()
    layers = _decoder_blocks(model, runner.model_config.hf_text_config.num_hidden_layers)
    device = next(model.parameters()).device
    shape = (runner.max_num_tokens, runner.model_config.get_hidden_size())
    buffers = [torch.zeros(shape, dtype=runner.model_config.dtype, device=device) for _ in blocks]
    return layers, buffers


def _decoder_blocks(model: nn.Module, count: int) -> nn.ModuleList:
    """The model's list of decoder blocks (`model.layers` in vLLM's models)."""
    for name, module in model.named_modules():
        named_as_blocks = name.rpartition(".")[2] in ("layers", "h")
        if named_as_blocks and isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise RuntimeError(f"live readout: no list of {count} decoder blocks in {type(model).__name__}")


_CAPTURE_OP: Any = None


def _capture_op() -> Any:
    """`livetrain::block_output(out, hidden, residual)`: out[:rows] = hidden + residual.
    Registered once per process, when a worker first needs it."""
    global _CAPTURE_OP
    if _CAPTURE_OP is None:

        @torch.library.custom_op("livetrain::block_output", mutates_args=("out",))
        def block_output(
            out: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
        ) -> None:
            rows = out.narrow(0, 0, hidden.shape[0])
            if residual is None:
                rows.copy_(hidden)
            else:
                torch.add(hidden, residual, out=rows)

        @block_output.register_fake
        def _(out: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None) -> None:
            return None

        _CAPTURE_OP = block_output
    return _CAPTURE_OP


_STEER_OP: Any = None


def _steer_op() -> Any:
    """`livetrain::add_rows(hidden, rows) -> hidden + rows[:len(hidden)]`, registered
    once per process. Opaque to the compiler, like the capture op."""
    global _STEER_OP
    if _STEER_OP is None:

        @torch.library.custom_op("livetrain::add_rows", mutates_args=())
        def add_rows(hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            return hidden + rows.narrow(0, 0, hidden.shape[0])

        @add_rows.register_fake
        def _(hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            return torch.empty_like(hidden)

        _STEER_OP = add_rows
    return _STEER_OP


def _add_into_output(block: nn.Module, buffer: torch.Tensor) -> None:
    """After each call, `block`'s output (hidden + residual) gains `buffer`'s first rows:
    added to `hidden`, which the next block's fused add-and-norm sums with `residual`."""
    forward, add = block.forward, _steer_op()

    def forward_and_add(*args: Any, **kwargs: Any) -> Any:
        out = forward(*args, **kwargs)
        if isinstance(out, tuple):
            return (add(out[0], buffer), *out[1:])
        return add(out, buffer)

    _patch(block, "forward", forward_and_add)


def _write_output_into(block: nn.Module, buffer: torch.Tensor) -> None:
    """After each call, `block` writes its output (hidden + residual) into `buffer`."""
    forward, capture = block.forward, _capture_op()

    def forward_and_capture(*args: Any, **kwargs: Any) -> Any:
        out = forward(*args, **kwargs)
        hidden, residual = out if isinstance(out, tuple) else (out, None)
        capture(buffer, hidden, residual)
        return out

    _patch(block, "forward", forward_and_capture)


def tensor_parallel_rank() -> int:
    """This worker's rank among the tensor-parallel ranks (0 without parallelism)."""
    return int(resolve("vllm.distributed.parallel_state", "get_tensor_model_parallel_rank")())


def runner_settings(runner: Any) -> tuple[WorkerSettings, int, torch.device]:
    """(our settings, hidden size, device) of a model runner."""
    return (
        worker_settings(runner.vllm_config),
        int(runner.model_config.get_hidden_size()),
        runner.device,
    )


def extra_args(sampling_params: Any) -> dict[str, Any]:
    """A request's `vllm_xargs` (JSON true arrives as 1: vllm_xargs has no bool)."""
    return getattr(sampling_params, "extra_args", None) or {}


def new_requests(scheduler_output: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """(request id, extra_args) of the requests a step schedules for the first time."""
    for new in scheduler_output.scheduled_new_reqs:
        yield new.req_id, extra_args(new.sampling_params)


def finished_requests(scheduler_output: Any) -> set[str]:
    return set(scheduler_output.finished_req_ids)


@dataclass(frozen=True)
class StepRequest:
    """One running request's share of a step's flattened token rows."""

    req_id: str
    n: int  # the request's `n` as the worker sees it (children of n > 1 have 1)
    first_row: int  # row of its first token in this step
    first_position: int  # position of that token in the sequence
    num_rows: int
    samples: bool  # False for a partial prefill chunk, which samples nothing
    num_prompt_tokens: int
    prompt_token_ids: Sequence[int]
    num_output_tokens: int


def step_block_outputs(runner: Any) -> list[torch.Tensor] | None:
    """The captured block outputs of the step just run, [rows, hidden] each, or None."""
    buffers = getattr(runner, "_livetrain_block_buffers", None)
    if buffers is not None:
        rows = int(runner.query_start_loc.np[runner.input_batch.num_reqs])
        return [buffer[:rows] for buffer in buffers]
    state = runner.execute_model_state
    return None if state is None else state.aux_hidden_states


def step_requests(runner: Any, wanted: set[str]) -> Iterator[StepRequest]:
    """The requests of the step just run that are in `wanted`, in batch order."""
    batch = runner.input_batch
    n = batch.num_reqs
    discard = runner.discard_request_mask.np[:n]
    ends = runner.query_start_loc.np
    for k, rid in enumerate(batch.req_ids[:n]):
        if rid not in wanted:
            continue
        request = runner.requests[rid]
        yield StepRequest(
            req_id=rid,
            n=int(request.sampling_params.n or 1),
            first_row=int(ends[k]),
            first_position=int(batch.num_computed_tokens_cpu[k]),
            num_rows=int(ends[k + 1] - ends[k]),
            samples=not discard[k],
            num_prompt_tokens=int(request.num_prompt_tokens),
            prompt_token_ids=request.prompt_token_ids,
            num_output_tokens=len(request.output_token_ids),
        )


def sampled_token(output: Any, req_id: str) -> int:
    """The token a step sampled for a request (-1 if none)."""
    sampled = output.sampled_token_ids[output.req_id_to_index[req_id]]
    return int(sampled[0]) if len(sampled) else -1


def has_sampled_tokens(output: Any) -> bool:
    return hasattr(output, "req_id_to_index")


# ---- API server: the engine client ---------------------------------------------------


async def pause_engine(engine: Any) -> None:
    """Hold all requests in place until `engine.resume_generation()`.

    AsyncLLM.pause_generation adds a fixed 20 ms sleep after the engine has paused
    (for log ordering, "not required for correctness" in vLLM's source); calling the
    engine-core client directly keeps the pause to the write itself.
    """
    core = getattr(engine, "engine_core", None)
    if core is not None and hasattr(core, "pause_scheduler_async"):
        await core.pause_scheduler_async(mode="keep", clear_cache=False)
    else:
        await engine.pause_generation(mode="keep", clear_cache=False)


def engine_quantization(engine: Any) -> str | None:
    """The quantisation vLLM applies to the served model (a checkpoint's or --quantization)."""
    return getattr(engine.model_config, "quantization", None)


def running_request_ids(engine: Any) -> Any:
    """A live container of the engine requests still running (None: not knowable)."""
    return getattr(getattr(engine, "output_processor", None), "request_states", None)


def watch_added_requests(engine: Any, note: Callable[[str, dict[str, Any], int], None]) -> None:
    """Call `note(request id, extra_args, parent's n)` for each child of an n > 1 request as
    the API server adds it: children reach the worker with n = 1, and the engine's own
    record of the parent is gone once the request finishes."""
    processor = getattr(engine, "output_processor", None)
    if processor is None:
        return
    add_request = processor.add_request

    def add_request_noting_n(request, prompt, parent_req=None, *args, **kwargs):
        if parent_req is not None:
            note(request.request_id, extra_args(request.sampling_params), parent_req.n)
        return add_request(request, prompt, parent_req, *args, **kwargs)

    _patch(processor, "add_request", add_request_noting_n)


def api_key_checker(args: Any) -> Callable[[Any], bool] | None:
    """A check of request headers against the keys vLLM's own middleware accepts
    (--api-key, else VLLM_API_KEY); None when the server has no key."""
    from vllm import envs

    tokens = [key for key in (getattr(args, "api_key", None) or [envs.VLLM_API_KEY]) if key]
    if not tokens:
        return None
    from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

    middleware = AuthenticationMiddleware(None, tokens)  # type: ignore[arg-type]
    return middleware.verify_token  # only the check is used
