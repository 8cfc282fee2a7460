"""The model registry: folders, single files and the HF cache, classified from their contents.

Pure: the fixtures are config files and safetensors headers written by hand, no torch.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from easel.backends.diffusers.models import ModelFormat, ModelKind, ModelRegistry, classify_tensors
from easel.errors import ModelNotFound


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def diffusers_folder(path: Path, pipeline: str, unet: dict[str, Any] | None = None) -> Path:
    write_json(path / "model_index.json", {"_class_name": pipeline})
    if unet is not None:
        write_json(path / "unet" / "config.json", unet)
    (path / "vae").mkdir(parents=True, exist_ok=True)
    (path / "vae" / "weights.safetensors").write_bytes(b"\0" * 1000)
    return path


def safetensors(path: Path, tensors: dict[str, list[int]], padding: int = 0) -> Path:
    """A file with a real safetensors header (the registry never reads past it)."""
    header = {
        name: {"dtype": "F16", "shape": shape, "data_offsets": [0, 0]}
        for name, shape in tensors.items()
    }
    raw = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * padding)
    return path


SD1_KEYS = {
    "model.diffusion_model.input_blocks.0.0.weight": [320, 4, 3, 3],
    "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": [320, 768],
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": [77, 768],
}


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    diffusers_folder(root / "sd15", "StableDiffusionPipeline", {"cross_attention_dim": 768})
    diffusers_folder(root / "sd21", "StableDiffusionPipeline", {"cross_attention_dim": 1024})
    diffusers_folder(root / "xl", "StableDiffusionXLPipeline", {"in_channels": 4})
    diffusers_folder(root / "xl-inpaint", "StableDiffusionXLInpaintPipeline", {"in_channels": 9})
    diffusers_folder(root / "sd3", "StableDiffusion3Pipeline")
    diffusers_folder(root / "schnell", "FluxPipeline")
    diffusers_folder(root / "k22", "KandinskyV22CombinedPipeline")
    diffusers_folder(root / "k3", "Kandinsky3Pipeline")
    diffusers_folder(root / "audio", "AudioLDM2Pipeline")  # not an image model: not listed
    safetensors(root / "dreamy.safetensors", SD1_KEYS, padding=5000)
    write_json(
        root / "dreamy.json",
        {
            "model_type": "SDXL",  # wrong: the weights say SD 1.x, and the weights win
            "base_model": "sd15",
            "description": "soft light",
            "merged_from": ["a", "b"],
            "config": "sd15",
        },
    )
    safetensors(
        root / "loras" / "pixel.safetensors",
        {"lora_unet_down_blocks_0_attentions_0_attn2_to_k.lora_down.weight": [4, 2048]},
    )
    safetensors(root / "loras" / "mystery.safetensors", {"unet.x.lora_A.weight": [4, 32]})
    write_json(root / "loras" / "mystery.json", {"model_type": "FLUX"})
    write_json(
        root / "controlnet" / "canny" / "config.json",
        {"_class_name": "ControlNetModel", "cross_attention_dim": 768},
    )
    write_json(
        root / "taesd" / "config.json", {"_class_name": "AutoencoderTiny", "latent_channels": 4}
    )
    (root / "notes.txt").write_text("not a model")
    (root / "model.ckpt").write_bytes(b"pickle")  # never unpickled, never listed
    return root


def test_scan_classifies_every_family_from_its_config(models_dir: Path) -> None:
    registry = ModelRegistry(models_dir, hf_cache=False)
    found = {e.name: (e.kind, e.family, e.format, e.variant) for e in registry.entries()}

    pipeline, diffusers, single = ModelKind.pipeline, ModelFormat.diffusers, ModelFormat.single_file
    assert found == {
        "sd15": (pipeline, "sd1", diffusers, None),
        "sd21": (pipeline, "sd2", diffusers, None),
        "xl": (pipeline, "sdxl", diffusers, None),
        "xl-inpaint": (pipeline, "sdxl", diffusers, "inpaint"),
        "sd3": (pipeline, "sd3", diffusers, None),
        "schnell": (pipeline, "flux", diffusers, None),
        "k22": (pipeline, "kandinsky22", diffusers, None),
        "k3": (pipeline, "kandinsky3", diffusers, None),
        "dreamy": (pipeline, "sd1", single, None),
        "loras/pixel": (ModelKind.lora, "sdxl", single, None),
        "loras/mystery": (ModelKind.lora, "flux", single, None),
        "controlnet/canny": (ModelKind.controlnet, "sd1", diffusers, None),
        "taesd": (ModelKind.preview_vae, "sd1/sdxl", diffusers, None),
    }


def test_name_json_adds_what_the_weights_cannot_say(models_dir: Path) -> None:
    entry = ModelRegistry(models_dir, hf_cache=False).get("dreamy")

    assert entry.base_model == "sd15"
    assert entry.description == "soft light"
    assert entry.merged_from == ("a", "b")
    assert entry.config == str(models_dir / "sd15")
    assert entry.size_bytes == (models_dir / "dreamy.safetensors").stat().st_size
    assert entry.to_dict()["path"] == str(models_dir / "dreamy.safetensors")
    json.dumps(entry.to_dict())  # JSON-ready for the API


def test_sizes_count_every_file_of_a_folder(models_dir: Path) -> None:
    entry = ModelRegistry(models_dir, hf_cache=False).get("sd15")

    assert entry.size_bytes == sum(f.stat().st_size for f in entry.path.rglob("*") if f.is_file())
    assert entry.size_bytes > 1000


def test_lookup_by_path_stem_and_case(models_dir: Path) -> None:
    registry = ModelRegistry(models_dir, hf_cache=False)

    assert registry.get(str(models_dir / "xl")).name == "xl"
    assert registry.get("pixel", ModelKind.lora).name == "loras/pixel"
    assert registry.get("SD15").name == "sd15"
    assert registry.find("pixel") is None  # a LoRA is not a pipeline


def test_missing_model_lists_what_is_there_and_never_downloads(models_dir: Path) -> None:
    registry = ModelRegistry(models_dir, hf_cache=False)

    with pytest.raises(ModelNotFound, match="Available models: dreamy, k22") as info:
        registry.get("nope")
    assert info.value.status == 404
    with pytest.raises(ModelNotFound, match="never downloads: fetch it first"):
        registry.get("stabilityai/sdxl-turbo")
    with pytest.raises(ModelNotFound, match="Available loras: loras/mystery, loras/pixel"):
        registry.get("sd15", ModelKind.lora)


def test_a_model_copied_in_later_is_found(models_dir: Path) -> None:
    registry = ModelRegistry(models_dir, hf_cache=False)
    diffusers_folder(models_dir / "late", "StableDiffusionXLPipeline")
    registry._scanned_at -= 1  # a miss rescans (at most 5 times a second)

    assert registry.get("late").family == "sdxl"


def test_hf_cache_entries_are_named_by_repo(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    repo = cache / "models--stabilityai--sdxl-turbo"
    snapshot = diffusers_folder(repo / "snapshots" / "abc123", "StableDiffusionXLPipeline")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    diffusers_folder(cache / "models--org--old" / "snapshots" / "x", "FluxPipeline")

    registry = ModelRegistry(None, hf_cache=cache)
    turbo = registry.get("stabilityai/sdxl-turbo")

    assert (turbo.family, turbo.source, turbo.path) == ("sdxl", "hf_cache", snapshot)
    assert registry.get("org/old").family == "flux"  # no refs/main: the newest snapshot


def test_hf_cache_location_follows_the_hub_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from easel.backends.diffusers.models import default_hf_cache

    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert default_hf_cache() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert default_hf_cache() == tmp_path / "elsewhere"


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale": [128]}, "flux"),
        ({"double_blocks.0.img_attn.norm.key_norm.scale": [128]}, "flux"),
        ({"model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight": [1]}, "sd3"),
        ({"conditioner.embedders.1.model.ln_final.weight": [1280]}, "sdxl"),
        (
            {
                "model.diffusion_model.input_blocks.0.0.weight": [320, 4, 3, 3],
                "cond_stage_model.model.token_embedding.weight": [49408, 1024],
            },
            "sd2",
        ),
        (SD1_KEYS, "sd1"),
    ],
)
def test_single_file_family_from_tensor_names(keys: dict[str, list[int]], expected: str) -> None:
    header = {k: {"shape": v} for k, v in keys.items()}
    assert classify_tensors(header) == (ModelKind.pipeline, expected, None)


def test_inpainting_checkpoint_is_marked() -> None:
    header = {k: {"shape": v} for k, v in SD1_KEYS.items()}
    header["model.diffusion_model.input_blocks.0.0.weight"] = {"shape": [320, 9, 3, 3]}

    assert classify_tensors(header) == (ModelKind.pipeline, "sd1", "inpaint")


def test_registry_imports_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = sys.modules['diffusers'] = None\n"
        "import easel.backends.diffusers.models; print('ok')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.stdout.strip() == "ok", result.stderr


def test_names_match_case_insensitively_and_by_path_inside_the_dir(models_dir: Path) -> None:
    registry = ModelRegistry(models_dir, hf_cache=False)

    assert registry.get("XL-INPAINT").name == "xl-inpaint"
    assert registry.get("Loras/PIXEL", ModelKind.lora).name == "loras/pixel"
    assert registry.get("dreamy.safetensors").name == "dreamy"
    assert registry.get("Controlnet/Canny/", ModelKind.controlnet).name == "controlnet/canny"


def test_pickled_weights_are_refused_unless_allowed(models_dir: Path) -> None:
    from easel.backends.diffusers.models import refuse_pickles
    from easel.errors import Unsupported

    folder = diffusers_folder(models_dir / "old", "StableDiffusionPipeline")
    (folder / "unet").mkdir()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    (models_dir / "evil.ckpt").write_bytes(b"\0" * 2_000_000)
    registry = ModelRegistry(models_dir, hf_cache=False)
    old, evil = registry.get("old"), registry.get("evil.ckpt")

    assert old.pickled == ("unet/diffusion_pytorch_model.bin",)
    assert registry.get("sd15").pickled == ()  # its weights are .safetensors
    with pytest.raises(Unsupported, match=r"pickled weights \(unet/diffusion_pytorch_model.bin"):
        refuse_pickles(old, allowed=False)
    refuse_pickles(old, allowed=True)
    with pytest.raises(Unsupported, match=r"evil.ckpt is a pickled checkpoint \(.ckpt\)"):
        refuse_pickles(evil, allowed=True)
