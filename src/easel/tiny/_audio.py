"""Tiny text-to-audio pipelines, built offline like :mod:`easel.tiny._families` builds images.

Stable Audio Open's layout (a T5 encoder, a projection of text and duration, a DiT over the
latents, the Oobleck autoencoder), sized so that one second of sound takes well under a
second on a CPU. The configs are the real family's with small widths; the sounds are noise.
"""

from __future__ import annotations

import warnings
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
