"""A tiny, randomly initialised Stable-Diffusion pipeline, built offline.

Tests and demos need a real diffusers folder that goes through exactly the code paths of a
user's model (``from_pretrained``, ``from_pipe``, schedulers, callbacks) without a download and
in well under a second per image. The weights are random, so the images are noise; the shapes,
configs and file layout are those of Stable Diffusion 1.x (VAE downscale 8, 77-token CLIP).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_TOKENS = 77

# Stable Diffusion 1.x noise schedule; the extra keys (clip_sample, set_alpha_to_one,
# skip_prk_steps) are what real SD configs carry, so that any scheduler built from this config
# (DDIM, PNDM, ...) gets SD's values and not its own defaults.
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}


def _byte_level_vocab() -> dict[str, int]:
    """GPT-2/CLIP byte-level alphabet: 256 byte tokens, the same with ``</w>``, bos and eos.

    With no merges every word splits into single bytes, so any text tokenizes and no vocabulary
    file (nor download) is needed.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codepoints = dict(zip(printable, printable, strict=True))
    extra = 0
    for byte in range(256):
        if byte not in codepoints:
            codepoints[byte] = 256 + extra
            extra += 1
    chars = [chr(codepoints[byte]) for byte in range(256)]
    vocab = {char: i for i, char in enumerate(chars)}
    vocab.update({f"{char}</w>": 256 + i for i, char in enumerate(chars)})
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    return vocab


def make_tiny_pipeline(path: Path | str, *, seed: int = 0) -> Path:
    """Build a tiny ``StableDiffusionPipeline`` and save it as a diffusers folder at ``path``.

    The same ``seed`` gives the same weights; the caller's global torch RNG is left untouched.
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = Path(path)
    vocab = _byte_level_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=MAX_TOKENS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(vocab),
                hidden_size=32,
                intermediate_size=37,
                projection_dim=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=MAX_TOKENS,
                bos_token_id=vocab[BOS_TOKEN],
                eos_token_id=vocab[EOS_TOKEN],
                pad_token_id=vocab[EOS_TOKEN],
            )
        )
        unet = UNet2DConditionModel(  # type: ignore[no-untyped-call]
            sample_size=64,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        # Four blocks = downscale 8, like SD: latents stay small and the VAE stays fast.
        vae = AutoencoderKL(  # type: ignore[no-untyped-call]
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16),
            latent_channels=4,
            norm_num_groups=8,
            sample_size=512,
        )
    pipe: Any = StableDiffusionPipeline(  # type: ignore[no-untyped-call]
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG),  # type: ignore[no-untyped-call]
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path
