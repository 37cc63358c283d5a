"""Shared fixtures: tiny models built once, real vLLM servers with the plugin.

A test that uses a server fixture is marked `server` here (`-m "not server"` runs the
rest in a minute); tests that start a server of their own carry the mark themselves.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from livetrain.config import TrainableFamilies
from livetrain.formats import messages as msg
from livetrain.formats import readout_format
from livetrain.tools.client import LivetrainClient
from livetrain.tools.launch import Server, plugin_env
from livetrain.tools.tiny_model import build_tiny_model
from livetrain.trainer.model import own_model
from livetrain.trainer.trainer import Trainer

API_KEY = "test-key-123"
SERVE_ARGS = [
    "--max-model-len",
    "256",
    "--enable-prefix-caching",
    "--max-num-seqs",
    "16",
]


# vLLM (CPU kernels, fp32) against Hugging Face eager/SDPA on the same memory.
LOGPROB_ATOL = 1e-4
SAMPLE_TEXT = (
    "The keeper of the lighthouse wrote in the log:",
    " the lamp burned all night and every ship came home.",
)
SERVER_FIXTURES = {"llama_server", "qwen2_server", "bf16_server", "readout_server", "real_server"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.server)


# A session-scoped server is stopped as soon as the last selected test that uses it has
# run, not at the end of the session: an idle vLLM still takes about a tenth of a core,
# which every later test on this 2-core machine would pay for.
_last_user: dict[str, str] = {}  # fixture name -> node id of the last test using it
_shared: dict[str, Server] = {}


def pytest_collection_finish(session: pytest.Session) -> None:
    for item in session.items:
        for name in SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            _last_user[name] = item.nodeid


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    for name, nodeid in _last_user.items():
        if nodeid == item.nodeid and name in _shared:
            _shared.pop(name).stop()


def share_until_last_user(request: pytest.FixtureRequest, client: LivetrainClient) -> None:
    _shared[request.fixturename] = client.server  # type: ignore[attr-defined]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {arch: build_tiny_model(root / arch, arch=arch) for arch in ("llama", "qwen2")}


def start_server(
    model: Path,
    workdir: Path,
    api_key: str | None,
    dtype: str = "float32",
    eager: bool = True,
    env: dict[str, str] | None = None,
    extra_args: list[str] | None = None,
    link_model: bool = False,
    trainer_states: tuple[str, ...] = ("idle",),
) -> Iterator[LivetrainClient]:
    """A real vLLM server on `model` with a private state dir; yields a client.

    `eager=False` keeps vLLM's default torch.compile path, which users get by default.
    A model outside `workdir` is served from a private copy there (one server per model
    folder: livetrain locks it); `link_model` hard-links the files instead of copying,
    for a large model on a server that never syncs (a sync would write through links).
    Returns once the trainer is in one of `trainer_states`.
    """
    if not Path(model).resolve().is_relative_to(workdir.resolve()):
        copy = shutil.copy2 if not link_model else os.link
        skip = shutil.ignore_patterns(".livetrain*")  # another server's lock or journal
        model = shutil.copytree(model, workdir / "model", copy_function=copy, ignore=skip)
    env = {**plugin_env(), **(env or {})}
    # Random tiny models move about 60 x lr of their norm per step (the built-in model
    # 12 x lr), so the tests' learning rates need a wider guard than the default.
    env.setdefault("LIVETRAIN_MAX_UPDATE_RATIO", "2")
    env["LIVETRAIN_STATE_DIR"] = str(workdir / "state")
    env["LIVETRAIN_RUNTIME_DIR"] = str(workdir / "run")
    args = [*SERVE_ARGS, "--dtype", dtype, *(["--enforce-eager"] if eager else [])]
    args += ["--api-key", api_key] if api_key else []
    args += extra_args or []
    log = workdir / "server.log"
    with Server(model, free_port(), args, env=env, log_path=log) as server:
        try:
            server.wait_healthy()
            client = LivetrainClient(server.url, api_key=api_key)
            client.workdir = workdir  # type: ignore[attr-defined]
            client.server = server  # type: ignore[attr-defined]
            client.wait_trainer(states=trainer_states)
        except Exception:
            print(log.read_text()[-5000:])
            raise
        yield client


@pytest.fixture(scope="session")
def llama_server(
    models: dict[str, Path], tmp_path_factory, request: pytest.FixtureRequest
) -> Iterator[LivetrainClient]:
    """Llama (untied, GQA, padded vocab) behind --api-key, compiled as vLLM defaults to;
    shared by the online-training, route-safety and undo tests (it keeps two steps)."""
    workdir, env = tmp_path_factory.mktemp("llama"), {"LIVETRAIN_UNDO_STEPS": "2"}
    for client in start_server(models["llama"], workdir, API_KEY, eager=False, env=env):
        share_until_last_user(request, client)
        yield client


@pytest.fixture(scope="session")
def sample(llama_server: LivetrainClient) -> tuple[list[int], list[int]]:
    return llama_server.tokenize(SAMPLE_TEXT[0]), llama_server.tokenize(SAMPLE_TEXT[1])


def make_trainer(
    model_dir: Path,
    state_dir: Path | None = None,
    weight_version: int = 0,
    dtype: torch.dtype = torch.float32,
    families: TrainableFamilies | None = None,
    **settings,
) -> Trainer:
    """A Trainer on a Hugging Face model of its own (no vLLM), as the bench builds one."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    model.requires_grad_(False)
    attached = own_model(model, model_dir, families or TrainableFamilies())
    return Trainer(attached, model_dir, state_dir, weight_version=weight_version, **settings)


def attach_request(
    model: Path,
    exports: list[msg.WeightExport],
    state: Path,
    restore: bool = False,
    families: TrainableFamilies | None = None,
    undo_steps: int = 0,
    step_mode: str = "fenced",
) -> msg.Attach:
    """The Attach the API server sends, for weights this process exports itself."""
    state.mkdir(parents=True, exist_ok=True)
    return msg.Attach(
        id=0,
        protocol_version=msg.PROTOCOL_VERSION,
        model_dir=str(model),
        state_dir=str(state),
        exports=exports,
        families=families or TrainableFamilies(),
        weight_version=0,
        sync_block_bytes=4096,
        max_update_ratio=2.0,
        sync_on_exit=False,
        restore_from_files=restore,
        guard=None,
        undo_steps=undo_steps,
        recompute_above_tokens=1024,
        step_mode=step_mode,
    )


def snapshot(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.attached.model.state_dict().items()}


def files_logprobs(model: Path, context: list[int], continuation: list[int]) -> list[float]:
    """What the weights in the files assign to `continuation`, by Hugging Face."""
    from livetrain.trainer.loss import continuation_logprobs

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.no_grad():
        return continuation_logprobs(hf, [(context, continuation)])[0].tolist()


def served_state(client: LivetrainClient, sample: tuple[list[int], list[int]]) -> tuple:
    """What a refused request must leave as it was: version, steps, optimizer size, and
    the served log-probs of `sample`."""
    status = client.status()
    return (
        status["weight_version"],
        status["steps"],
        status["optimizer_state_bytes"],
        client.continuation_logprobs(*sample),
    )


@pytest.fixture(scope="module")
def qwen2_server(models: dict[str, Path], tmp_path_factory) -> Iterator[LivetrainClient]:
    """Qwen2 (tied embeddings, q/k/v bias) on a private copy of the model files."""
    import shutil

    workdir = tmp_path_factory.mktemp("qwen2")
    model = shutil.copytree(models["qwen2"], workdir / "model")
    yield from start_server(model, workdir, None)


@pytest.fixture(scope="module")
def bf16_server(models: dict[str, Path], tmp_path_factory) -> Iterator[LivetrainClient]:
    """Qwen2 served in bfloat16 from fp32 files: vLLM casts, the trainer must agree."""
    yield from start_server(models["qwen2"], tmp_path_factory.mktemp("bf16"), None, "bfloat16")


@dataclass
class ReadoutServer:
    url: str
    api_key: str
    concepts: list[str]
    readout_dir: Path
    model: Path
    workdir: Path
    client: LivetrainClient


def write_readout(
    folder: Path,
    concepts: list[str],
    layers: list[int],
    hidden: int,
    seed: int,
    calibrated: bool = True,
    read_position: dict | None = None,
) -> Path:
    """A readout with random unit detectors and directions, steering units and
    calibrations, in the trainers' format."""
    gen = torch.Generator().manual_seed(seed)

    def calibration() -> readout_format.Calibration:
        return readout_format.Calibration(
            mean={i: torch.randn(len(concepts), generator=gen).tolist() for i in layers},
            std={i: (torch.rand(len(concepts), generator=gen) + 0.5).tolist() for i in layers},
        )

    readout = readout_format.Readout(
        concepts=concepts,
        layers=layers,
        detectors={
            i: F.normalize(torch.randn(len(concepts), hidden, generator=gen), dim=1) for i in layers
        },
        directions={
            i: F.normalize(torch.randn(len(concepts), hidden, generator=gen), dim=1) for i in layers
        },
        units={i: torch.rand(len(concepts), generator=gen) + 0.5 for i in layers},
        calibration=calibration() if calibrated else None,
    )
    if read_position is not None:
        readout.read_position = read_position
        readout.token_calibration = calibration() if calibrated else None
    readout_format.save(folder, readout)
    return folder


@pytest.fixture(scope="session")
def readout_server(
    models: dict[str, Path], tmp_path_factory, request: pytest.FixtureRequest
) -> Iterator[ReadoutServer]:
    """Llama compiled (as vLLM defaults to) with a 100-concept readout on both blocks,
    prefix caching, and chunked prefill forced by a small token budget per step; shared
    by the live readout's tests and its page's (test_live_readout*.py, run one after the
    other). Tests that load another readout load the launch one back. Its metrics are
    vLLM's multiprocess kind (PROMETHEUS_MULTIPROC_DIR)."""
    workdir = tmp_path_factory.mktemp("readout")
    concepts = list(
        json.loads(
            (Path(__file__).parent.parent / "amygdala_stories" / "manifest.json").read_text()
        )["concepts"]
    )[:100]
    folder = write_readout(workdir / "readout", concepts, [0, 1], 128, seed=0)
    env = {
        "LIVETRAIN_READOUT": str(folder),
        "LIVETRAIN_READOUT_MAX_REQUESTS": "40",
        # the tests write readouts in their own temp dirs; 1 MiB holds every one of them
        "LIVETRAIN_READOUT_ROOTS": str(tmp_path_factory.getbasetemp()),
        "LIVETRAIN_READOUT_MAX_BYTES": str(1 << 20),
        # vLLM's multiprocess metrics mode: livetrain's metrics must show there too
        "PROMETHEUS_MULTIPROC_DIR": str(workdir / "prometheus"),
    }
    (workdir / "prometheus").mkdir()
    template = workdir / "chat_template.jinja"  # the tiny tokenizer has none of its own
    template.write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    for client in start_server(
        models["llama"],
        workdir,
        API_KEY,
        eager=False,
        env=env,
        extra_args=["--max-num-batched-tokens", "64", "--chat-template", str(template)],
    ):
        share_until_last_user(request, client)
        yield ReadoutServer(
            client.http.base_url.__str__().rstrip("/"),
            API_KEY,
            concepts,
            folder,
            models["llama"],
            workdir,
            client,
        )


@pytest.fixture(scope="module")
def readout_hf(readout_server: ReadoutServer):
    """The readout server's model in transformers: the reference its rows are checked against."""
    return AutoModelForCausalLM.from_pretrained(str(readout_server.model)).eval()


@pytest.fixture(scope="module")
def readout_http(readout_server: ReadoutServer) -> httpx.Client:
    headers = {"Authorization": f"Bearer {readout_server.api_key}"}
    return httpx.Client(base_url=readout_server.url, headers=headers, timeout=120)
