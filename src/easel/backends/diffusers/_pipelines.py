"""Loading pipelines onto a device, and keeping the recently used ones within a memory budget.

A loaded pipeline is only a holder of weights: each request runs on its own ``from_pipe``
copy (shared weights, ~1 ms), so a model is loaded once and serves every mode. Loaded models
live in an LRU cache bounded by the bytes of their weights; a model in use is never evicted.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from easel.backends.diffusers.models import ModelEntry, ModelFormat, ModelKind, ModelRegistry
from easel.errors import InvalidRequest, ModelNotFound, Unsupported

log = logging.getLogger("easel.diffusers")

DTYPES = {
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
}
OFFLOAD = ("none", "model", "sequential")
COMPILE = ("off", "regional", "full")

# The pipeline class that reads a single-file checkpoint of each family.
_SINGLE_FILE_CLASSES = {
    "sd1": "StableDiffusionPipeline",
    "sd2": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
}


@dataclass(frozen=True)
class DeviceOptions:
    """Per worker: where the weights live and what memory/speed trade-offs apply."""

    device: str = "auto"
    dtype: str | None = None
    offload: str = "none"
    attention_slicing: bool = False
    vae_slicing: bool = False
    vae_tiling: bool = False
    channels_last: bool = False
    fuse_qkv: bool = False
    compile: str = "off"
    allow_pickle: bool = False
    """Load pickled (.bin) weights of diffusers folders; off: .safetensors only."""

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype.lower() not in DTYPES:
            raise InvalidRequest(f"unknown dtype {self.dtype!r}; use one of: {', '.join(DTYPES)}")
        if self.offload not in OFFLOAD:
            raise InvalidRequest(f"offload must be one of {', '.join(OFFLOAD)}")
        if self.compile not in COMPILE:
            raise InvalidRequest(f"compile must be one of {', '.join(COMPILE)}")


def pick_device(option: str) -> str:
    """``auto`` is the best accelerator present; a device this machine lacks is a 4xx."""
    from easel.backends.diffusers.devices import check_device

    return check_device(option)


def dtype_name(options: DeviceOptions, device: str) -> str:
    """fp16 on CUDA and MPS unless asked otherwise; fp32 on the CPU (fp16 is slow there)."""
    if options.dtype is not None:
        return DTYPES[options.dtype.lower()]
    return "float32" if device == "cpu" else "float16"


def parse_bytes(value: str | int | None) -> int | None:
    """``"12GB"``, ``"512MiB"``, ``1_000_000`` -> bytes; None or ``"auto"`` -> None."""
    if value is None or value == "auto":
        return None
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?i?b?)\s*", value.lower())
    if match is None:
        raise InvalidRequest(f"memory budget {value!r} is not a size such as 12GB or 800MiB")
    number, unit = float(match.group(1)), match.group(2).rstrip("b").rstrip("i")
    return int(number * 1024 ** " kmgt".index(unit or " "))


def default_budget(device: str) -> int:
    """Three quarters of the device's memory (the host's RAM for the CPU)."""
    if device.startswith("cuda"):
        import torch

        index = int(device.partition(":")[2] or 0)
        return int(torch.cuda.get_device_properties(index).total_memory * 0.75)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.75)
    except (ValueError, OSError, AttributeError):
        return 8 * 1024**3


# -- loading ---------------------------------------------------------------------------------


def load_pipeline(entry: ModelEntry, registry: ModelRegistry, options: DeviceOptions) -> Any:
    """``entry`` as a diffusers pipeline on the configured device; never reaches a hub."""
    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    device = pick_device(options.device)
    dtype = getattr(torch, dtype_name(options, device))
    try:
        if entry.format is ModelFormat.single_file:
            pipe = _load_single_file(entry, registry, dtype)
        else:
            import diffusers

            pipe = diffusers.DiffusionPipeline.from_pretrained(  # type: ignore[no-untyped-call]
                entry.path,
                local_files_only=True,
                dtype=dtype,
                use_safetensors=None if options.allow_pickle else True,
            )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelNotFound(
            f"could not load model {entry.name!r} from {entry.path}: {exc}"
        ) from exc
    place(pipe, device, options)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_single_file(entry: ModelEntry, registry: ModelRegistry, dtype: Any) -> Any:
    """A single-file checkpoint, with its components' configs from a local diffusers folder."""
    import diffusers

    class_name = _SINGLE_FILE_CLASSES.get(entry.family)
    if class_name is None:
        raise Unsupported(
            f"{entry.name!r} is a single-file {entry.family} checkpoint; easel loads single "
            f"files of {', '.join(sorted(_SINGLE_FILE_CLASSES))} (add model_type to "
            f"{entry.path.with_suffix('.json').name} if the family was not recognised)"
        )
    if entry.variant == "inpaint":
        class_name = class_name.replace("Pipeline", "InpaintPipeline")
    config = single_file_config(entry, registry)
    cls = getattr(diffusers, class_name)
    return cls.from_single_file(
        str(entry.path), config=str(config), local_files_only=True, dtype=dtype
    )


def single_file_config(entry: ModelEntry, registry: ModelRegistry) -> str:
    """The diffusers folder whose configs describe a single file: its NAME.json ``config``, or
    any local diffusers folder of the same family (configs are per architecture)."""
    if entry.config:
        found = registry.find(entry.config)
        return str(found.path) if found is not None else entry.config
    for other in registry.entries(ModelKind.pipeline):
        if other.format is ModelFormat.diffusers and other.family == entry.family:
            return str(other.path)
    raise ModelNotFound(
        f"single-file checkpoint {entry.name!r} ({entry.family}) needs the configs of a "
        f"diffusers folder of the same family, and none is on this server: copy one into "
        f"the models directory, or name it in {entry.path.with_suffix('.json').name} as "
        '{"config": "<folder or model name>"}'
    )


def place(pipe: Any, device: str, options: DeviceOptions) -> None:
    """Device, offload and the memory/speed knobs, each only where the pipeline has it."""
    import torch

    if options.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif options.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
    if options.attention_slicing and hasattr(pipe, "enable_attention_slicing"):
        pipe.enable_attention_slicing()
    vae: Any = getattr(pipe, "vae", None)
    if options.vae_slicing and hasattr(vae, "enable_slicing"):
        vae.enable_slicing()
    if options.vae_tiling and hasattr(vae, "enable_tiling"):
        vae.enable_tiling()
    denoiser = denoiser_of(pipe)
    if options.channels_last and denoiser is not None:
        denoiser.to(memory_format=torch.channels_last)
    if options.fuse_qkv and hasattr(pipe, "fuse_qkv_projections"):
        pipe.fuse_qkv_projections()
    if options.compile != "off" and denoiser is not None:
        if options.compile == "regional" and hasattr(denoiser, "compile_repeated_blocks"):
            denoiser.compile_repeated_blocks(fullgraph=True)
        else:
            denoiser.compile(fullgraph=True, mode="max-autotune-no-cudagraphs")


def load_controlnet(entry: ModelEntry, options: DeviceOptions) -> Any:
    """A ControlNet (diffusers folder) on the worker's device and dtype."""
    import diffusers
    import torch

    if entry.format is not ModelFormat.diffusers:
        raise Unsupported(
            f"ControlNet {entry.name!r} is a single file; easel loads ControlNets as diffusers "
            "folders (config.json + weights)"
        )
    device = pick_device(options.device)
    class_name = json.loads((entry.path / "config.json").read_text("utf-8"))["_class_name"]
    cls = getattr(diffusers, class_name)
    dtype = getattr(torch, dtype_name(options, device))
    try:
        model = cls.from_pretrained(entry.path, local_files_only=True, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelNotFound(f"could not load ControlNet {entry.name!r}: {exc}") from exc
    return model.to(device)


def load_preview_vae(entry: ModelEntry, options: DeviceOptions) -> Any:
    """A tiny autoencoder (TAESD) for full-size previews, in fp16 on accelerators."""
    import torch
    from diffusers import AutoencoderTiny

    device = pick_device(options.device)
    dtype = torch.float32 if device == "cpu" else torch.float16
    decoder = AutoencoderTiny.from_pretrained(  # type: ignore[no-untyped-call]
        entry.path, local_files_only=True, dtype=dtype
    )
    return decoder.to(device)


def denoiser_of(pipe: Any) -> Any:
    """The UNet or transformer: where the time goes."""
    return getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)


def weight_bytes(*objects: Any) -> int:
    """Bytes of parameters and buffers of the torch modules in pipelines or modules, once each."""
    import torch

    seen: set[int] = set()
    total = 0
    for obj in objects:
        components = getattr(obj, "components", None)
        modules = components.values() if isinstance(components, dict) else [obj]
        for module in modules:
            if not isinstance(module, torch.nn.Module):
                continue
            for tensor in [*module.parameters(), *module.buffers()]:
                if tensor.data_ptr() in seen:
                    continue
                seen.add(tensor.data_ptr())
                total += tensor.numel() * tensor.element_size()
    return total


# -- the cache ----------------------------------------------------------------------------------


@dataclass(eq=False)
class Loaded:
    """One loaded model (or ControlNet) and what is attached to it."""

    name: str
    value: Any
    nbytes: int
    users: int = 0
    state: dict[str, Any] = field(default_factory=dict)
    """Per-model state owned by other modules (the LoRA gate, for one)."""


class PipelineCache:
    """Loaded models by name, least recently used first, within ``budget`` bytes of weights.

    Loading happens in the calling thread, one load per name at a time. A model in use is
    never evicted, nor the most recently used one (a budget below one model would otherwise
    reload it for every request), so the budget can be exceeded while those are loaded.
    """

    def __init__(self, budget: int | None = None) -> None:
        self.budget = budget
        self._items: OrderedDict[str, Loaded] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    @property
    def names(self) -> list[str]:
        """Loaded names, least recently used first."""
        with self._lock:
            return list(self._items)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(item.nbytes for item in self._items.values())

    @contextmanager
    def use(self, name: str, load: Callable[[], Any]) -> Iterator[Loaded]:
        """The loaded ``name`` (loading it with ``load`` if needed), held while in the block."""
        item = self._acquire(name, load)
        try:
            yield item
        finally:
            with self._lock:
                item.users -= 1
            self._evict()

    def _acquire(self, name: str, load: Callable[[], Any]) -> Loaded:
        with self._lock:
            loading = self._loading.setdefault(name, threading.Lock())
        with loading:
            with self._lock:
                item = self._items.get(name)
                if item is not None:
                    self._items.move_to_end(name)
                    item.users += 1
                    return item
            value = load()
            item = Loaded(name, value, weight_bytes(value), users=1)
            with self._lock:
                self._items[name] = item
        self._evict()
        return item

    def _evict(self) -> None:
        evicted: list[Loaded] = []
        with self._lock:
            if self.budget is None:
                return
            total = sum(item.nbytes for item in self._items.values())
            for name, item in list(self._items.items())[:-1]:  # never the latest
                if total <= self.budget:
                    break
                if item.users == 0:
                    evicted.append(self._items.pop(name))
                    total -= item.nbytes
        for item in evicted:
            log.info(
                "unloading %s (%.0f MB) to stay within the memory budget",
                item.name,
                item.nbytes / 1e6,
            )
        if evicted:
            del evicted
            free_memory()

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
        free_memory()


def free_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
