"""Tiny, randomly initialised pipelines of every family easel serves, built offline.

Tests, demos and benchmarks need real diffusers folders that go through exactly the code paths
of a user's model (``from_pretrained``, ``from_pipe``, schedulers, callbacks, LoRA, ControlNet)
without a download and in well under a second per image. The weights are random, so the images
are noise; the configs and file layout are those of the real family (SD 1.x, SDXL, SD3, FLUX).
The builders live in ``easel.tiny._families``; this module names them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from easel.backends.diffusers._quiet import quiet_library_logs
from easel.errors import InvalidRequest

quiet_library_logs()  # before a builder imports transformers

TINY_FAMILIES = (
    "sd", "sd2", "sdxl", "sd3", "flux", "flux-dev", "kandinsky22", "kandinsky3", "stable-audio",
)  # fmt: skip
"""What :func:`make_tiny_pipeline` builds: SD 1.x, SD 2.x, SDXL, SD3, FLUX.1 (schnell, dev),
Kandinsky 2.2 and 3, and Stable Audio Open (text to sound); ``sd1`` is accepted for ``sd``."""

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


def byte_level_vocab() -> dict[str, int]:
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


def make_tiny_pipeline(path: Path | str, *, family: str = "sd", seed: int = 0) -> Path:
    """Build a tiny pipeline of ``family`` and save it as a diffusers folder at ``path``.

    The same ``seed`` gives the same weights; the caller's global torch RNG is left untouched.
    """
    family = {"sd1": "sd"}.get(family.casefold(), family.casefold())
    if family not in TINY_FAMILIES:
        raise InvalidRequest(
            f"unknown tiny family {family!r}; use one of: {', '.join(TINY_FAMILIES)}"
        )
    from easel.tiny._families import build

    path = Path(path)
    build(family, seed).save_pretrained(path)
    return path


def make_tiny_lora(
    path: Path | str, base: Path | str, *, seed: int = 0, scale: float = 1.0
) -> Path:
    """A random LoRA for the tiny pipeline at ``base``, saved as one ``.safetensors`` file.

    Needs peft (as diffusers' LoRA loading does).
    """
    from easel.tiny._parts import make_lora

    return make_lora(Path(path), Path(base), seed=seed, scale=scale)


def make_tiny_controlnet(path: Path | str, base: Path | str, *, seed: int = 0) -> Path:
    """A random ControlNet for the tiny SD/SDXL pipeline at ``base``, as a diffusers folder."""
    from easel.tiny._parts import make_controlnet

    return make_controlnet(Path(path), Path(base), seed=seed)


def make_tiny_preview_vae(path: Path | str, *, latent_channels: int = 4, seed: int = 0) -> Path:
    """A random tiny autoencoder (TAESD layout) for full-size previews."""
    from easel.tiny._parts import make_preview_vae

    return make_preview_vae(Path(path), latent_channels=latent_channels, seed=seed)


def save_tiny_single_file(folder: Path | str, path: Path | str) -> Path:
    """The tiny SD 1.x folder as one original-layout ``.safetensors`` checkpoint (what people
    download), for testing single-file loading."""
    from easel.tiny._parts import save_single_file

    return save_single_file(Path(folder), Path(path))


def make_tiny_clap(path: Path | str, *, seed: int = 0) -> Path:
    """A tiny random CLAP (a transformers folder) for ``clap_model``: real code, noise scores."""
    import torch

    from easel.tiny._audio import build_clap

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_clap(Path(path))
