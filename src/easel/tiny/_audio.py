"""Tiny text-to-audio pipelines, built offline like :mod:`easel.tiny._families` builds images.

Stable Audio Open's layout (a T5 encoder, a projection of text and duration, a DiT over the
latents, the Oobleck autoencoder), sized so that one second of sound takes well under a
second on a CPU. The configs are the real family's with small widths; the sounds are noise.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from diffusers import (
    AutoencoderOobleck,
    EDMDPMSolverMultistepScheduler,
    StableAudioDiTModel,
    StableAudioPipeline,
)
from diffusers.pipelines.stable_audio import StableAudioProjectionModel

from easel.tiny._families import t5_encoder, t5_tokenizer

STABLE_AUDIO_SAMPLE_RATE = 8000
"""The tiny autoencoder's rate (the real one: 44.1 kHz); easel resamples to what is asked."""
STABLE_AUDIO_HOP = 64
"""Samples per latent frame: the product of the autoencoder's downsampling ratios."""
STABLE_AUDIO_FRAMES = 256
"""Latent frames the DiT sees: the longest clip is 256 x 64 / 8000 = 2.048 seconds."""


def build_stable_audio() -> Any:
    """Stable Audio Open in miniature: stereo, up to 2 seconds at 8 kHz."""
    tokenizer = t5_tokenizer()
    text_encoder = t5_encoder(len(tokenizer), width=16)
    transformer = StableAudioDiTModel(  # type: ignore[no-untyped-call]
        sample_size=STABLE_AUDIO_FRAMES,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        num_key_value_attention_heads=1,
        out_channels=4,
        cross_attention_dim=16,
        time_proj_dim=16,
        global_states_input_dim=32,  # start and end durations, each conditioning_dim wide
        cross_attention_input_dim=16,
    )
    with warnings.catch_warnings():  # Oobleck is built with torch's old weight_norm
        warnings.filterwarnings("ignore", message=".*weight_norm` is deprecated")
        vae = AutoencoderOobleck(  # type: ignore[no-untyped-call]
            encoder_hidden_size=8,
            downsampling_ratios=[2, 4, 8],
            decoder_channels=8,
            decoder_input_channels=4,
            audio_channels=2,
            channel_multiples=[1, 2, 2],
            sampling_rate=STABLE_AUDIO_SAMPLE_RATE,
        )
    projection = StableAudioProjectionModel(  # type: ignore[no-untyped-call]
        text_encoder_dim=text_encoder.config.d_model, conditioning_dim=16, min_value=0, max_value=32
    )
    # The real model ships the SDE variant (CosineDPMSolver, which needs torchsde); the ODE
    # solver of the pipeline's own signature keeps the tiny one deterministic and light.
    scheduler = EDMDPMSolverMultistepScheduler(  # type: ignore[no-untyped-call]
        solver_order=2,
        prediction_type="v_prediction",
        sigma_data=1.0,
        sigma_schedule="exponential",
        sigma_min=0.3,
        sigma_max=500,
    )
    return StableAudioPipeline(  # type: ignore[no-untyped-call]
        vae=vae,
        text_encoder=text_encoder,
        projection_model=projection,
        tokenizer=tokenizer,
        transformer=transformer,
        scheduler=scheduler,
    )


def build_clap(path: Path) -> Path:
    """A tiny random CLAP (text and audio towers, processor) saved as a transformers folder:
    scores are meaningless, the code path is the real one."""
    from transformers import (
        ClapAudioConfig,
        ClapConfig,
        ClapFeatureExtractor,
        ClapModel,
        ClapProcessor,
        ClapTextConfig,
        RobertaTokenizer,
    )

    from easel.tiny import byte_level_vocab

    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    chars = [t for t in byte_level_vocab() if not t.endswith("</w>") and not t.startswith("<|")]
    tokenizer = RobertaTokenizer(
        vocab={token: i for i, token in enumerate(special + chars)}, merges=[],
        model_max_length=77,
    )  # fmt: skip
    text = ClapTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=37, num_attention_heads=2,
        num_hidden_layers=2, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        max_position_embeddings=80,
    )  # fmt: skip
    audio = ClapAudioConfig(
        spec_size=64, window_size=4, num_mel_bins=64, depths=[2, 2],
        num_attention_heads=[2, 2], num_hidden_layers=2, hidden_size=192, patch_size=2,
        patch_stride=2, patch_embed_input_channels=4,
    )  # fmt: skip
    config = ClapConfig(text_config=text.to_dict(), audio_config=audio.to_dict(), projection_dim=32)
    # 10 s at 48 kHz in at most 64 frames: the tiny audio tower's input size
    features = ClapFeatureExtractor(feature_size=64, sampling_rate=48_000, hop_length=7900)
    processor = ClapProcessor(  # type: ignore[no-untyped-call]
        feature_extractor=features, tokenizer=tokenizer
    )
    processor.save_pretrained(path)
    ClapModel(config).save_pretrained(path)
    return path
