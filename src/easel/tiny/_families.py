"""Builders of tiny random pipelines, one per model family, shaped like the real ones.

Sizes follow diffusers' own pipeline tests (hidden size 32, one or two blocks) except where a
real model's *interface* matters to easel: the VAE downscales by 8 and SD3/FLUX latents have
16 channels, as in the real models, so that size checks, latent packing and latent previews
run the code paths real weights do. Called by :mod:`easel.tiny`; torch is imported here.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    Kandinsky3Pipeline,
    Kandinsky3UNet,
    KandinskyV22CombinedPipeline,
    PriorTransformer,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UnCLIPScheduler,
    UNet2DConditionModel,
    VQModel,
)
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from easel.tiny import BOS_TOKEN, EOS_TOKEN, MAX_TOKENS, SCHEDULER_CONFIG, byte_level_vocab

HIDDEN = 32
"""Hidden size of every tiny text encoder."""

SD2_HIDDEN = 1024
"""SD 2.x's text width: the registry tells SD 2.x from 1.x by it, as for real checkpoints."""

T5_TOKENS = 64
"""The tiny T5's sequence length (FLUX/SD3 pad prompts to it); real models use 256-512."""

SDXL_SCHEDULER_CONFIG: dict[str, Any] = {**SCHEDULER_CONFIG, "timestep_spacing": "leading"}
FLUX_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
SD3_SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}


def clip_tokenizer() -> CLIPTokenizer:
    vocab = byte_level_vocab()
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=MAX_TOKENS)


def clip_config(**extra: Any) -> CLIPTextConfig:
    vocab = byte_level_vocab()
    options: dict[str, Any] = {
        "hidden_size": HIDDEN,
        "projection_dim": HIDDEN,
        "num_hidden_layers": 3,  # 3, so that clip_skip has layers to skip
        **extra,
    }
    return CLIPTextConfig(
        vocab_size=len(vocab),
        intermediate_size=37,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],
        pad_token_id=vocab[EOS_TOKEN],
        **options,
    )


def t5_tokenizer() -> T5Tokenizer:
    """A unigram vocabulary of printable ASCII characters: any text tokenizes, no file needed."""
    chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(c, -2.0) for c in chars] + [(f"\u2581{c}", -1.5) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=T5_TOKENS)


def t5_encoder(vocab_size: int, width: int = HIDDEN) -> T5EncoderModel:
    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=width,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
        )
    )


def vae(latent_channels: int = 4, **extra: Any) -> AutoencoderKL:
    """Four blocks = downscale 8, like every real SD/SDXL/SD3/FLUX VAE."""
    return AutoencoderKL(  # type: ignore[no-untyped-call]
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=512,
        **extra,
    )


def sd_unet(**extra: Any) -> UNet2DConditionModel:
    options: dict[str, Any] = {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "cross_attention_dim": HIDDEN,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
        **extra,
    }
    return UNet2DConditionModel(**options)  # type: ignore[no-untyped-call]


def build_sd() -> Any:
    """Stable Diffusion 1.x: one CLIP text encoder, a UNet, a 4-channel VAE."""
    return StableDiffusionPipeline(  # type: ignore[no-untyped-call]
        vae=vae(),
        text_encoder=CLIPTextModel(clip_config()),
        tokenizer=clip_tokenizer(),
        unet=sd_unet(),
        scheduler=EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG),  # type: ignore[no-untyped-call]
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_sd2() -> Any:
    """Stable Diffusion 2.x: SD 1.x's layout with a 1024-wide text encoder (OpenCLIP ViT-H in
    the real model, which is how its family is told apart) and v-prediction."""
    return StableDiffusionPipeline(  # type: ignore[no-untyped-call]
        vae=vae(),
        text_encoder=CLIPTextModel(clip_config(hidden_size=SD2_HIDDEN, num_hidden_layers=2)),
        tokenizer=clip_tokenizer(),
        unet=sd_unet(cross_attention_dim=SD2_HIDDEN, use_linear_projection=True),
        scheduler=EulerDiscreteScheduler.from_config(  # type: ignore[no-untyped-call]
            {**SCHEDULER_CONFIG, "prediction_type": "v_prediction"}
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_sdxl() -> Any:
    """SDXL: two CLIP encoders (the second projected), size/crop conditioning in the UNet."""
    time_dim = 8
    unet = sd_unet(
        cross_attention_dim=2 * HIDDEN,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        # 6 size/crop numbers, each embedded in time_dim, plus the pooled text embedding
        projection_class_embeddings_input_dim=6 * time_dim + HIDDEN,
        transformer_layers_per_block=(1, 1),
    )
    return StableDiffusionXLPipeline(  # type: ignore[no-untyped-call]
        vae=vae(scaling_factor=0.13025, force_upcast=False),
        text_encoder=CLIPTextModel(clip_config()),
        text_encoder_2=CLIPTextModelWithProjection(clip_config()),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG),  # type: ignore[no-untyped-call]
        force_zeros_for_empty_prompt=True,
    )


def build_sd3() -> Any:
    """SD3/3.5: an MMDiT transformer, two CLIP encoders and a T5, a 16-channel VAE."""
    t5_tok = t5_tokenizer()
    transformer = SD3Transformer2DModel(  # type: ignore[no-untyped-call]
        sample_size=64,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=2 * HIDDEN,  # T5 width; CLIP embeddings are padded to it
        caption_projection_dim=HIDDEN,
        pooled_projection_dim=2 * HIDDEN,
        pos_embed_max_size=96,
    )
    # SD3 pads CLIP states (2 x 32 wide) to the T5 width: the tiny T5 is 64 wide.
    t5 = t5_encoder(len(t5_tok), width=2 * HIDDEN)
    return StableDiffusion3Pipeline(  # type: ignore[no-untyped-call]
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_CONFIG),  # type: ignore[no-untyped-call]
        vae=vae(
            16,
            use_quant_conv=False,
            use_post_quant_conv=False,
            scaling_factor=1.5305,
            shift_factor=0.0609,
        ),
        text_encoder=CLIPTextModelWithProjection(clip_config()),
        tokenizer=clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(clip_config()),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5,
        tokenizer_3=t5_tok,
    )


def build_flux(*, guidance: bool = False) -> Any:
    """FLUX.1: a double/single-stream transformer on 2x2-packed 16-channel latents.

    ``guidance`` gives the guidance-distilled (dev) variant; without it, schnell.
    """
    t5_tok = t5_tokenizer()
    transformer = FluxTransformer2DModel(  # type: ignore[no-untyped-call]
        patch_size=1,
        in_channels=64,  # 16 latent channels x 2x2 packing
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=HIDDEN,
        pooled_projection_dim=HIDDEN,
        guidance_embeds=guidance,
        axes_dims_rope=(4, 4, 8),
    )
    return FluxPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHEDULER_CONFIG),  # type: ignore[no-untyped-call]
        vae=vae(
            16,
            use_quant_conv=False,
            use_post_quant_conv=False,
            scaling_factor=0.3611,
            shift_factor=0.1159,
        ),
        text_encoder=CLIPTextModel(clip_config()),
        tokenizer=clip_tokenizer(),
        text_encoder_2=t5_encoder(len(t5_tok)),
        tokenizer_2=t5_tok,
    )


def movq() -> VQModel:
    """Kandinsky's MoVQ decoder, downscale 8 like the real one (no attention: fast)."""
    return VQModel(  # type: ignore[no-untyped-call]
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32),  # spatial norm groups by 32
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        norm_type="spatial",
        num_vq_embeddings=12,
        vq_embed_dim=4,
    )


def kandinsky_decoder_scheduler() -> DDIMScheduler:
    return DDIMScheduler(  # type: ignore[no-untyped-call]
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
        thresholding=False,
    )


def build_kandinsky22() -> Any:
    """Kandinsky 2.2, prior and decoder in one folder (its combined pipeline).

    The prior turns text (or images) into a CLIP image embedding, which is what makes
    mixing images and prompts possible; the decoder draws from that embedding.
    """
    image_size = 32
    prior: Any = PriorTransformer(  # type: ignore[no-untyped-call]
        num_attention_heads=2, attention_head_dim=12, embedding_dim=HIDDEN, num_layers=1
    )
    prior.clip_std = torch.nn.Parameter(torch.ones(prior.clip_std.shape))
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=HIDDEN,
            image_size=image_size,
            projection_dim=HIDDEN,
            intermediate_size=37,
            num_attention_heads=4,
            num_channels=3,
            num_hidden_layers=2,
            patch_size=8,
        )
    )
    processor = CLIPImageProcessor(
        crop_size={"height": image_size, "width": image_size},
        size={"shortest_edge": image_size},
        do_center_crop=True,
        do_normalize=True,
        do_resize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        resample=3,
    )
    unet = UNet2DConditionModel(  # type: ignore[no-untyped-call]
        in_channels=4,
        out_channels=8,  # predicts noise and variance
        addition_embed_type="image",
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=(32, 64),
        layers_per_block=1,
        encoder_hid_dim=HIDDEN,
        encoder_hid_dim_type="image_proj",
        cross_attention_dim=HIDDEN,
        attention_head_dim=4,
        resnet_time_scale_shift="scale_shift",
        class_embed_type=None,
    )
    return KandinskyV22CombinedPipeline(  # type: ignore[no-untyped-call]
        unet=unet,
        scheduler=kandinsky_decoder_scheduler(),
        movq=movq(),
        prior_prior=prior,
        prior_image_encoder=image_encoder,
        prior_text_encoder=CLIPTextModelWithProjection(clip_config()),
        prior_tokenizer=clip_tokenizer(),
        prior_scheduler=UnCLIPScheduler(  # type: ignore[no-untyped-call]
            variance_type="fixed_small_log",
            prediction_type="sample",
            num_train_timesteps=1000,
            clip_sample=True,
            clip_sample_range=10.0,
        ),
        prior_image_processor=processor,
    )


def build_kandinsky3() -> Any:
    """Kandinsky 3: a T5 text encoder, its own UNet, the MoVQ decoder."""
    t5_tok = t5_tokenizer()
    unet = Kandinsky3UNet(  # type: ignore[no-untyped-call]
        in_channels=4,
        time_embedding_dim=4,
        groups=2,
        attention_head_dim=4,
        layers_per_block=3,
        block_out_channels=(32, 64),
        cross_attention_dim=4,
        encoder_hid_dim=HIDDEN,
    )
    return Kandinsky3Pipeline(  # type: ignore[no-untyped-call]
        tokenizer=t5_tok,
        text_encoder=t5_encoder(len(t5_tok)),
        unet=unet,
        scheduler=DDPMScheduler(  # type: ignore[no-untyped-call]
            beta_start=0.00085,
            beta_end=0.012,
            steps_offset=1,
            beta_schedule="squaredcos_cap_v2",
            clip_sample=True,
            thresholding=False,
        ),
        movq=movq(),
    )


def build_stable_audio() -> Any:
    """Stable Audio Open in miniature (:mod:`easel.tiny._audio` imports this module's T5)."""
    from easel.tiny._audio import build_stable_audio as build

    return build()


BUILDERS = {
    "sd": build_sd,
    "sd2": build_sd2,
    "sdxl": build_sdxl,
    "sd3": build_sd3,
    "flux": build_flux,
    "flux-dev": lambda: build_flux(guidance=True),
    "kandinsky22": build_kandinsky22,
    "kandinsky3": build_kandinsky3,
    "stable-audio": build_stable_audio,
}


def build(family: str, seed: int) -> Any:
    """A tiny pipeline of ``family`` whose weights depend only on ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BUILDERS[family]()
