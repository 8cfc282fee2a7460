"""The model registry: what is on disk, what family it is, never a download.

Scans a models directory (diffusers folders, single-file ``.safetensors`` checkpoints with an
optional ``NAME.json`` beside them, LoRAs, ControlNets, tiny preview autoencoders) and the
Hugging Face cache. The family comes from the model's own config (``model_index.json``,
``config.json``) or, for a single file, from the tensor names in its header, never from the
file name. Pure: JSON and file headers only, no torch, so listing models is instant.
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from easel.errors import ModelNotFound, Unsupported


class ModelKind(StrEnum):
    pipeline = "pipeline"
    lora = "lora"
    controlnet = "controlnet"
    preview_vae = "preview_vae"


class ModelFormat(StrEnum):
    diffusers = "diffusers"
    single_file = "single_file"


FAMILIES: Mapping[str, str] = {
    "sd1": "Stable Diffusion 1.x",
    "sd2": "Stable Diffusion 2.x",
    "sdxl": "Stable Diffusion XL",
    "sd3": "Stable Diffusion 3/3.5",
    "flux": "FLUX.1",
    "kandinsky22": "Kandinsky 2.2",
    "kandinsky3": "Kandinsky 3",
    "unknown": "unknown",
}

# NAME.json "model_type" values people write -> families.
_MODEL_TYPES = {
    "sd": "sd1",
    "sd1": "sd1",
    "sd15": "sd1",
    "sd1.5": "sd1",
    "sd2": "sd2",
    "sd21": "sd2",
    "sdxl": "sdxl",
    "sd3": "sd3",
    "sd35": "sd3",
    "sd3.5": "sd3",
    "flux": "flux",
    "flux1": "flux",
    "kandinsky22": "kandinsky22",
    "kandinsky2.2": "kandinsky22",
    "kandinsky3": "kandinsky3",
}

_PIPELINE_PREFIXES = (  # longest first: "StableDiffusionXL" before "StableDiffusion"
    ("StableDiffusionXL", "sdxl"),
    ("StableDiffusion3", "sd3"),
    ("StableDiffusion", "sd1"),
    ("LatentConsistencyModel", "sd1"),
    ("Flux", "flux"),
    ("KandinskyV22Combined", "kandinsky22"),
    ("Kandinsky3", "kandinsky3"),
)
_CONTROLNET_CLASSES = {"SD3ControlNetModel": "sd3", "FluxControlNetModel": "flux"}
_LORA_FILES = ("pytorch_lora_weights.safetensors",)
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class ModelEntry:
    """One model on disk. ``name`` is what requests use; ``path`` where it is."""

    name: str
    path: Path
    kind: ModelKind
    family: str
    format: ModelFormat
    source: str
    """``models_dir``, ``hf_cache`` or ``path`` (named directly by the server's config)."""
    size_bytes: int
    pipeline: str | None = None
    """The diffusers pipeline class of a diffusers folder (``model_index.json``)."""
    variant: str | None = None
    """``inpaint`` for inpainting checkpoints, ``refiner`` for the SDXL refiner."""
    config: str | None = None
    """For a single file: a diffusers folder (or model name) describing its components."""
    base_model: str | None = None
    description: str | None = None
    merged_from: tuple[str, ...] = field(default_factory=tuple)
    text_layers: int | None = None
    """Layers of its (shallowest) CLIP text encoder: the deepest clip_skip it can take."""
    pickled: tuple[str, ...] = field(default_factory=tuple)
    """Weight files in pickle formats (``.bin``, ``.ckpt``, ``.pt``) it would load from."""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        data["merged_from"] = list(self.merged_from)
        data["pickled"] = list(self.pickled)
        return data


class ModelRegistry:
    """Models found under ``models_dir`` and in the Hugging Face cache, by name."""

    def __init__(
        self,
        models_dir: Path | str | None = None,
        *,
        hf_cache: Path | str | bool | None = True,
        extra: Iterable[Path | str] = (),
    ) -> None:
        self.models_dir = Path(models_dir).expanduser() if models_dir else None
        if hf_cache is True:
            self.hf_cache: Path | None = default_hf_cache()
        elif hf_cache:
            self.hf_cache = Path(hf_cache).expanduser()
        else:
            self.hf_cache = None
        self.extra = [Path(p).expanduser() for p in extra]
        self._entries: dict[str, ModelEntry] = {}
        self._scanned_at = 0.0
        self.scan()

    def refresh(self, max_age: float = 10.0) -> None:
        """Scan again if the last scan is older than ``max_age`` seconds (models copied in
        while serving appear; a flood of lookups does not become a flood of scans)."""
        if time.monotonic() - self._scanned_at > max_age:
            self.scan()

    def scan(self) -> list[ModelEntry]:
        """Look at the disk again (cheap: headers and JSON only)."""
        found: dict[str, ModelEntry] = {}
        for path in self.extra:
            entry = inspect_path(path, name=path.stem if path.is_file() else path.name)
            if entry is None:
                continue
            found.setdefault(entry.name, _with(entry, source="path"))
        if self.models_dir is not None and self.models_dir.is_dir():
            for entry in _scan_dir(self.models_dir, self.models_dir, depth=3):
                found.setdefault(entry.name, entry)
        if self.hf_cache is not None and self.hf_cache.is_dir():
            for entry in _scan_hf_cache(self.hf_cache):
                found.setdefault(entry.name, entry)
        self._entries = found
        self._scanned_at = time.monotonic()
        return list(found.values())

    def entries(self, kind: ModelKind | None = None) -> list[ModelEntry]:
        return [e for e in self._entries.values() if kind is None or e.kind is kind]

    def get(self, name: str, kind: ModelKind = ModelKind.pipeline) -> ModelEntry:
        """The entry called ``name`` (or at that path, or with that unique file stem)."""
        entry = self.find(name, kind)
        if entry is None:
            self.refresh(max_age=0.2)  # a model copied in since the last scan: look again
            entry = self.find(name, kind)
        if entry is None:
            raise ModelNotFound(_not_found(name, kind, self.entries(kind)))
        return entry

    def find(self, name: str, kind: ModelKind = ModelKind.pipeline) -> ModelEntry | None:
        candidates = self.entries(kind)
        for entry in candidates:
            if name in (entry.name, str(entry.path)):
                return entry
        key = name.casefold().removesuffix("/")
        folded = [
            e
            for e in candidates
            if key in (e.name.casefold(), e.path.stem.casefold(), e.path.name.casefold())
            or (self.models_dir is not None and _inside(e.path, self.models_dir) == key)
        ]
        return folded[0] if len(folded) == 1 else None


def _inside(path: Path, root: Path) -> str | None:
    """``path`` relative to ``root``, casefolded (None when outside it)."""
    try:
        return path.relative_to(root).as_posix().casefold()
    except ValueError:
        return None


PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
"""Weight files torch loads by unpickling: loading one can run code it carries."""


def refuse_pickles(entry: ModelEntry, *, allowed: bool) -> None:
    """A model that would load pickled weights is refused, naming the files, unless the
    server's ``diffusers.allow_pickle`` says its operator trusts them."""
    if not entry.pickled:
        return
    files = ", ".join(entry.pickled[:3]) + (" ..." if len(entry.pickled) > 3 else "")
    if entry.format is ModelFormat.single_file:
        raise Unsupported(
            f"{entry.path} is a pickled checkpoint ({entry.path.suffix}): loading it can run "
            "code it carries, and easel loads checkpoints only from .safetensors. Convert it "
            "to .safetensors (with a tool you trust) and serve that file"
        )
    if not allowed:
        raise Unsupported(
            f"model {entry.name!r} has pickled weights ({files}) and no .safetensors for "
            "them: loading a pickle can run code it carries, so easel refuses it. Convert "
            "the model (diffusers' save_pretrained writes .safetensors), or set "
            "diffusers.allow_pickle = true if you trust these files"
        )


def default_hf_cache() -> Path:
    """Where ``huggingface_hub`` keeps downloads: $HF_HUB_CACHE, $HF_HOME/hub, or ~/.cache."""
    if hub := os.environ.get("HF_HUB_CACHE"):
        return Path(hub).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def _not_found(name: str, kind: ModelKind, entries: list[ModelEntry]) -> str:
    what = "model" if kind is ModelKind.pipeline else kind.value
    known = ", ".join(sorted(e.name for e in entries)) or "none"
    hint = ""
    if "/" in name and not Path(name).exists():
        hint = (
            "; easel never downloads: fetch it first (e.g. `hf download "
            f"{name}`) or copy it into the models directory"
        )
    return f"{what} {name!r} is not on this server{hint}. Available {what}s: {known}"


def _with(entry: ModelEntry, **changes: Any) -> ModelEntry:
    return ModelEntry(**{**entry.__dict__, **changes})


# -- scanning ------------------------------------------------------------------------------------


def _scan_dir(root: Path, folder: Path, depth: int) -> Iterator[ModelEntry]:
    try:
        children = sorted(folder.iterdir())
    except OSError:
        return
    for child in children:
        if child.name.startswith("."):
            continue
        name = (
            child.relative_to(root).with_suffix("").as_posix()
            if child.is_file()
            else (child.relative_to(root).as_posix())
        )
        entry = inspect_path(child, name=name)
        if entry is not None:
            yield entry
        elif child.is_dir() and depth > 1:
            yield from _scan_dir(root, child, depth - 1)


def _scan_hf_cache(cache: Path) -> Iterator[ModelEntry]:
    for repo in sorted(cache.glob("models--*")):
        snapshot = _snapshot(repo)
        if snapshot is None:
            continue
        name = repo.name.removeprefix("models--").replace("--", "/")
        entry = inspect_path(snapshot, name=name)
        if entry is not None:
            yield _with(entry, source="hf_cache")


def _snapshot(repo: Path) -> Path | None:
    """The snapshot ``refs/main`` points at, else the newest one."""
    ref = repo / "refs" / "main"
    if ref.is_file():
        candidate = repo / "snapshots" / ref.read_text().strip()
        if candidate.is_dir():
            return candidate
    snapshots = sorted((repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime)
    return snapshots[-1] if snapshots else None


def inspect_path(path: Path, *, name: str) -> ModelEntry | None:
    """What model ``path`` holds, or None when it holds none easel can serve."""
    if path.is_dir():
        return _inspect_folder(path, name)
    if path.suffix == ".safetensors" and path.is_file():
        return _inspect_single_file(path, name)
    if path.suffix in PICKLE_SUFFIXES and path.is_file() and path.stat().st_size > 1_000_000:
        return ModelEntry(  # listed (and named when refused), never unpickled to look inside
            name=name,
            path=path,
            kind=ModelKind.pipeline,
            family="unknown",
            format=ModelFormat.single_file,
            source="models_dir",
            size_bytes=path.stat().st_size,
            pickled=(path.name,),
        )
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _folder_size(path: Path) -> int:
    total = 0
    for file in path.rglob("*"):
        try:
            if file.is_file():
                total += file.stat().st_size  # follows the HF cache's symlinks to blobs
        except OSError:
            continue
    return total


def _inspect_folder(path: Path, name: str) -> ModelEntry | None:
    index = _read_json(path / "model_index.json")
    config = _read_json(path / "config.json")
    kind, family, pipeline, variant = ModelKind.pipeline, "unknown", None, None
    if index:
        pipeline = str(index.get("_class_name", ""))
        unet = _read_json(path / "unet" / "config.json")
        family = pipeline_family(pipeline, unet)
        if family == "unknown":
            return None  # a pipeline easel does not serve (audio, video, ...)
        if unet.get("in_channels") == 9 and family in ("sd1", "sd2", "sdxl", "kandinsky22"):
            variant = "inpaint"
    elif config.get("_class_name") in ("ControlNetModel", *_CONTROLNET_CLASSES):
        kind, family = ModelKind.controlnet, _controlnet_family(config)
    elif config.get("_class_name") == "AutoencoderTiny":
        kind = ModelKind.preview_vae
        family = "sd3/flux" if config.get("latent_channels") == 16 else "sd1/sdxl"
    elif any((path / f).is_file() for f in _LORA_FILES):
        kind = ModelKind.lora
    else:
        return None
    meta = _read_json(path.with_name(path.name + ".json"))
    return ModelEntry(
        name=name,
        path=path,
        kind=kind,
        family=_family_from_meta(meta, family, trust_meta=kind is ModelKind.lora),
        format=ModelFormat.diffusers,
        source="models_dir",
        size_bytes=_folder_size(path),
        pipeline=pipeline,
        variant=variant,
        pickled=_pickled_components(path) if kind is ModelKind.pipeline else (),
        text_layers=_text_layers(path) if kind is ModelKind.pipeline else None,
        **_meta_fields(meta, path),
    )


def _text_layers(path: Path) -> int | None:
    layers = [
        int(config["num_hidden_layers"])
        for folder in ("text_encoder", "text_encoder_2")
        if isinstance(
            (config := _read_json(path / folder / "config.json")).get("num_hidden_layers"), int
        )
        and "CLIP" in str(config.get("architectures", ["CLIP"]))
    ]
    return min(layers) if layers else None


def _pickled_components(path: Path) -> tuple[str, ...]:
    """Component weights stored only as pickles (a .safetensors beside one wins in diffusers)."""
    found = []
    for folder in sorted(p for p in path.iterdir() if p.is_dir()):
        files = [f for f in folder.iterdir() if f.is_file()]
        if any(f.suffix == ".safetensors" for f in files):
            continue
        found += [f"{folder.name}/{f.name}" for f in files if f.suffix in PICKLE_SUFFIXES]
    return tuple(found)


def pipeline_family(class_name: str, unet_config: Mapping[str, Any] | None = None) -> str:
    """The family of a diffusers pipeline class; SD 2.x is told from its UNet's text width."""
    for prefix, family in _PIPELINE_PREFIXES:
        if class_name.startswith(prefix):
            if family == "sd1" and (unet_config or {}).get("cross_attention_dim") == 1024:
                return "sd2"
            return family
    return "unknown"


def _controlnet_family(config: Mapping[str, Any]) -> str:
    cls = str(config.get("_class_name"))
    if cls in _CONTROLNET_CLASSES:
        return _CONTROLNET_CLASSES[cls]
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    return "sd2" if config.get("cross_attention_dim") == 1024 else "sd1"


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """Tensor names -> {dtype, shape, data_offsets}, read from the header alone."""
    with path.open("rb") as file:
        raw = file.read(8)
        if len(raw) != 8:
            return {}
        (length,) = struct.unpack("<Q", raw)
        if length > _MAX_HEADER:
            return {}
        try:
            header = json.loads(file.read(length))
        except ValueError:
            return {}
    return header if isinstance(header, dict) else {}


def _inspect_single_file(path: Path, name: str) -> ModelEntry | None:
    header = read_safetensors_header(path)
    if not header:
        return None
    kind, family, variant = classify_tensors(header)
    meta = _read_json(path.with_suffix(".json"))
    return ModelEntry(
        name=name,
        path=path,
        kind=kind,
        family=_family_from_meta(meta, family, trust_meta=kind is not ModelKind.pipeline),
        format=ModelFormat.single_file,
        source="models_dir",
        size_bytes=path.stat().st_size,
        variant=variant,
        **_meta_fields(meta, path),
    )


def classify_tensors(header: Mapping[str, Any]) -> tuple[ModelKind, str, str | None]:
    """(kind, family, variant) of a single-file checkpoint, from its tensor names and shapes."""
    keys = [k for k in header if k != "__metadata__"]
    joined = "\n".join(keys)
    if any(m in joined for m in ("lora_down", "lora_up", "lora_A", "lora_B", "lora.down")):
        return ModelKind.lora, _lora_family(joined, header), None
    if "control_model." in joined or "controlnet_cond_embedding" in joined:
        return ModelKind.controlnet, "unknown", None
    if "double_blocks." in joined:
        return ModelKind.pipeline, "flux", None
    if "joint_blocks." in joined:
        return ModelKind.pipeline, "sd3", None
    if "conditioner.embedders.1." in joined:
        return ModelKind.pipeline, "sdxl", _inpaint(header)
    if "conditioner.embedders.0.model." in joined:
        return ModelKind.pipeline, "sdxl", "refiner"
    if "model.diffusion_model.input_blocks." in joined:
        to_k = header.get(
            "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
        )
        wide = isinstance(to_k, dict) and to_k.get("shape", [0])[-1] == 1024
        family = "sd2" if wide or "cond_stage_model.model." in joined else "sd1"
        return ModelKind.pipeline, family, _inpaint(header)
    return ModelKind.pipeline, "unknown", None


def _inpaint(header: Mapping[str, Any]) -> str | None:
    conv_in = header.get("model.diffusion_model.input_blocks.0.0.weight")
    if isinstance(conv_in, dict) and len(conv_in.get("shape", [])) > 1 and conv_in["shape"][1] == 9:
        return "inpaint"
    return None


_CROSS_ATTENTION_WIDTHS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


def _lora_family(joined: str, header: Mapping[str, Any]) -> str:
    """FLUX and SD3 by their block names; UNet LoRAs by the text width of cross-attention."""
    if "double_blocks" in joined or "single_transformer_blocks" in joined:
        return "flux"
    if (
        "joint_blocks" in joined
        or "context_block" in joined
        or ("transformer.transformer_blocks" in joined)
    ):
        return "sd3"
    if "lora_te2_" in joined or "text_encoder_2." in joined:
        return "sdxl"
    for key, info in header.items():
        down = "attn2_to_k.lora_down" in key or ("attn2.to_k.lora" in key and "down" in key)
        if (down or ("attn2.to_k.lora_A" in key)) and isinstance(info, dict):
            shape = info.get("shape") or [0, 0]
            return _CROSS_ATTENTION_WIDTHS.get(shape[-1], "unknown")
    return "unknown"


def _family_from_meta(meta: Mapping[str, Any], detected: str, *, trust_meta: bool) -> str:
    """The weights decide a checkpoint's family; NAME.json fills in what they cannot tell."""
    declared = _MODEL_TYPES.get(str(meta.get("model_type", "")).casefold().replace("-", ""))
    if declared is not None and (trust_meta or detected == "unknown"):
        return declared
    return detected


def _meta_fields(meta: Mapping[str, Any], path: Path) -> dict[str, Any]:
    merged = meta.get("merged_from") or ()
    config = meta.get("config")
    if isinstance(config, str) and not os.path.isabs(config) and (path.parent / config).exists():
        config = str(path.parent / config)
    return {
        "base_model": _str_or_none(meta.get("base_model")),
        "description": _str_or_none(meta.get("description")),
        "merged_from": tuple(str(m) for m in merged) if isinstance(merged, list) else (),
        "config": _str_or_none(config),
    }


def _str_or_none(value: object) -> str | None:
    return str(value) if value is not None else None
