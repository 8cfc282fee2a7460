"""Tiny add-ons for tiny pipelines: a LoRA, a ControlNet, a preview autoencoder (TAESD).

Each is built against a saved tiny pipeline and written in the layout users download: a
LoRA as one ``.safetensors`` file (diffusers' own ``save_lora_weights``), a ControlNet and a
TAESD as diffusers folders. Called by :mod:`easel.tiny`; torch is imported here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderTiny, ControlNetModel, DiffusionPipeline


def _load(base: Path) -> Any:
    return DiffusionPipeline.from_pretrained(base, local_files_only=True)  # type: ignore[no-untyped-call]


def make_lora(path: Path, base: Path, *, seed: int, rank: int = 4, scale: float = 1.0) -> Path:
    """A random LoRA on the attention projections of ``base``'s UNet or transformer.

    ``init_lora_weights=False`` makes both LoRA matrices random (peft's default zeroes one),
    so the LoRA visibly changes the output; ``scale`` multiplies its effect.
    """
    from diffusers.utils import convert_state_dict_to_diffusers  # type: ignore[attr-defined]
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = _load(base)
    denoiser_name = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    denoiser = getattr(pipe, denoiser_name)
    config = LoraConfig(
        r=rank,
        lora_alpha=max(1, round(rank * scale)),
        init_lora_weights=False,
        target_modules=["to_q", "to_k", "to_v", "to_out.0"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        denoiser.add_adapter(config)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser))  # type: ignore[no-untyped-call]
    path.parent.mkdir(parents=True, exist_ok=True)
    type(pipe).save_lora_weights(
        save_directory=path.parent,
        weight_name=path.name,
        **{f"{denoiser_name}_lora_layers": layers},
    )
    return path


def make_controlnet(path: Path, base: Path, *, seed: int) -> Path:
    """A ControlNet shaped after ``base``'s UNet (SD 1.x/2.x, SDXL), random zero-convs."""
    unet = _load(base).unet
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        controlnet = ControlNetModel.from_unet(
            unet, conditioning_embedding_out_channels=(8, 8, 8, 8)
        )
        # from_unet zero-initialises the outputs (a new ControlNet does nothing): randomise
        # them so that the control image visibly changes the result.
        zeroed = ("controlnet_down_blocks", "controlnet_mid_block", "cond_embedding.conv_out")
        for name, parameter in controlnet.named_parameters():
            if any(part in name for part in zeroed):
                torch.nn.init.normal_(parameter, std=0.2)
    controlnet.save_pretrained(path)
    return path


def make_preview_vae(path: Path, *, latent_channels: int = 4, seed: int = 0) -> Path:
    """A tiny TAESD-shaped autoencoder (downscale 8) for full-size previews."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae: Any = AutoencoderTiny(  # type: ignore[no-untyped-call]
            encoder_block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8, 8),
            num_encoder_blocks=(1, 1, 1, 1),
            num_decoder_blocks=(1, 1, 1, 1),
            latent_channels=latent_channels,
        )
    vae.save_pretrained(path)
    return path


# -- single-file export ---------------------------------------------------------------------

_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)
_VAE_RESNET = (("conv_shortcut", "nin_shortcut"),)
_VAE_ATTENTION = (
    ("group_norm", "norm"),
    ("to_q", "q"),
    ("to_k", "k"),
    ("to_v", "v"),
    ("to_out.0", "proj_out"),
)


def _renamed(rest: str, table: tuple[tuple[str, str], ...]) -> str:
    for new, old in table:
        if rest.startswith(new + "."):
            return old + rest[len(new) :]
    return rest


def _unet_key(key: str, fixed: dict[str, str], layers: int, attentive_up: set[int]) -> str:
    """A diffusers UNet key -> its original (LDM) name, for any number of blocks/layers."""
    if key in fixed:
        return fixed[key]
    per = layers + 1  # input blocks per level: the resnets plus a downsampler
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        sub, rest = (0, _renamed(rest, _RESNET)) if kind == "resnets" else (1, rest)
        return f"input_blocks.{1 + i * per + j}.{sub}.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_renamed(m[2], _RESNET)}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        sub, rest = (0, _renamed(rest, _RESNET)) if kind == "resnets" else (1, rest)
        return f"output_blocks.{i * per + j}.{sub}.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        i = int(m[1])
        return f"output_blocks.{i * per + layers}.{2 if i in attentive_up else 1}.conv.{m[2]}"
    raise KeyError(f"no original name for UNet key {key}")


def _vae_key(key: str, fixed: dict[str, str], blocks: int) -> str:
    if key in fixed:
        return fixed[key]
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_renamed(m[3], _VAE_RESNET)}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{blocks - 1 - int(m[1])}.block.{m[2]}.{_renamed(m[3], _VAE_RESNET)}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        return f"decoder.up.{blocks - 1 - int(m[1])}.upsample.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_renamed(m[3], _VAE_RESNET)}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        return f"{m[1]}.mid.attn_1.{_renamed(m[2], _VAE_ATTENTION)}"
    raise KeyError(f"no original name for VAE key {key}")


def save_single_file(folder: Path, path: Path) -> Path:
    """The SD 1.x diffusers folder as one original-layout (LDM) ``.safetensors`` checkpoint,
    the kind people download: ``model.diffusion_model.*``, ``first_stage_model.*``,
    ``cond_stage_model.transformer.*``."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
    from safetensors.torch import save_file

    pipe = _load(folder)
    mapping: Any = DIFFUSERS_TO_LDM_MAPPING
    unet_fixed: dict[str, str] = dict(mapping["unet"]["layers"])
    layers = pipe.unet.config.layers_per_block
    attentive_up = {i for i, t in enumerate(pipe.unet.config.up_block_types) if "CrossAttn" in t}
    tensors: dict[str, torch.Tensor] = {}
    for key, value in pipe.unet.state_dict().items():
        name = _unet_key(key, unet_fixed, layers, attentive_up)
        tensors[f"model.diffusion_model.{name}"] = value
    vae_fixed: dict[str, str] = dict(mapping["vae"])
    blocks = len(pipe.vae.config.up_block_types)
    for key, value in pipe.vae.state_dict().items():
        name = _vae_key(key, vae_fixed, blocks)
        if ".mid.attn_1." in name and name.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # 1x1 convolutions in the original VAE
        tensors[f"first_stage_model.{name}"] = value
    for key, value in pipe.text_encoder.state_dict().items():
        tensors[f"cond_stage_model.transformer.text_model.{key}"] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path
