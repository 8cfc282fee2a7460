"""GPU speed of the diffusers backend's loading path: SD 1.5 and SDXL architectures, random weights.

    python benchmarks/gpu.py                       # everything: ~10-20 min on an H100
    python benchmarks/gpu.py --models sd15 --variants eager,compile-full --batches 1
    python benchmarks/gpu.py --tiny --device cpu   # a smoke run of this script, no GPU

Speed does not depend on weight values, so the pipelines are built from the real
architectures' configs (SD 1.5: UNet 320/640/1280/1280 + CLIP ViT-L/14 + the SD VAE; SDXL:
UNet 320/640/1280 with 1/2/10 transformer layers + CLIP ViT-L and OpenCLIP bigG + the VAE)
with random weights, directly on the device, in fp16. Each variant applies easel's own
device/speed knobs (``easel.backends.diffusers._pipelines.place``) to a fresh pipeline:

    eager          fp16, PyTorch SDPA attention (the default)
    tuned          + channels_last UNet + fused QKV projections
    compile-rgn    + torch.compile of the repeated blocks (regional: quick to compile)
    compile-full   + torch.compile of the whole UNet (max-autotune, no CUDA graphs)

and reports, per model/size/batch: denoising it/s (UNet steps per second, measured between
step callbacks with the device synchronised), and seconds per image end to end (text
encoding + denoising + VAE decode, divided by the batch). Targets (issue 8, on an H100):
SD 1.5 512x512 >= 100 it/s, SDXL 1024x1024 >= 21 it/s, batch 1.
Nothing here was measured on the machine that wrote it (it has no GPU): run it and record
the figures with the GPU's name.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGETS = {("sd15", 512, 1): 100.0, ("sdxl", 1024, 1): 21.0}
DEFAULT_SIZES = {"sd15": 512, "sdxl": 1024}
VARIANTS = ("eager", "tuned", "compile-rgn", "compile-full")


def clip_config(hidden: int, layers: int, heads: int, projection: int) -> Any:
    from transformers import CLIPTextConfig

    from easel.tiny import BOS_TOKEN, EOS_TOKEN, byte_level_vocab

    vocab = byte_level_vocab()
    return CLIPTextConfig(
        vocab_size=49408,  # the real table; the byte-level tokenizer uses its first 514 ids
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        projection_dim=projection,
        max_position_embeddings=77,
        hidden_act="quick_gelu" if hidden == 768 else "gelu",
        bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],
        pad_token_id=vocab[EOS_TOKEN],
    )


def vae(scaling: float) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(  # type: ignore[no-untyped-call]
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
        scaling_factor=scaling,
        force_upcast=False,  # fp16 all the way, as with the fp16-fixed SDXL VAE
    )


def build(model: str, scheduler: Any) -> Any:
    """A real-size pipeline with random weights, built on the current default device."""
    from diffusers import (
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from easel.tiny._families import clip_tokenizer

    if model == "sd15":
        unet = UNet2DConditionModel(  # type: ignore[no-untyped-call]
            sample_size=64,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
        )
        return StableDiffusionPipeline(  # type: ignore[no-untyped-call]
            vae=vae(0.18215),
            text_encoder=CLIPTextModel(clip_config(768, 12, 12, 768)),
            tokenizer=clip_tokenizer(),
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    unet = UNet2DConditionModel(  # type: ignore[no-untyped-call]
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    return StableDiffusionXLPipeline(  # type: ignore[no-untyped-call]
        vae=vae(0.13025),
        text_encoder=CLIPTextModel(clip_config(768, 12, 12, 768)),
        text_encoder_2=CLIPTextModelWithProjection(clip_config(1280, 32, 20, 1280)),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
    )


def build_tiny(model: str) -> Any:
    """The smoke-test stand-in: easel's tiny SD / SDXL (same code path, tiny configs)."""
    from easel.tiny._families import build as build_family

    return build_family("sd" if model == "sd15" else "sdxl", seed=0)


def options_for(variant: str, device: str) -> Any:
    from easel.backends.diffusers._pipelines import DeviceOptions

    dtype = "float32" if device == "cpu" else "float16"
    tuned = variant != "eager"
    compile = {"compile-rgn": "regional", "compile-full": "full"}.get(variant, "off")
    return DeviceOptions(
        device=device, dtype=dtype, channels_last=tuned, fuse_qkv=tuned, compile=compile
    )


def measure(
    pipe: Any, size: int, batch: int, steps: int, runs: int, device: str
) -> tuple[float, float]:
    """(denoising it/s, seconds per image end to end), medians over ``runs``."""
    import torch

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    rates, per_image = [], []
    for _ in range(runs):
        stamps: list[float] = []

        def on_step_end(
            p: Any, step: int, t: Any, kwargs: dict[str, Any], stamps: list[float] = stamps
        ) -> dict[str, Any]:
            sync()
            stamps.append(time.perf_counter())
            return kwargs

        sync()
        began = time.perf_counter()
        pipe(
            prompt=["a photo of an astronaut riding a horse on mars"] * batch,
            num_inference_steps=steps,
            width=size,
            height=size,
            guidance_scale=7.0,
            generator=[torch.Generator("cpu").manual_seed(i) for i in range(batch)],
            callback_on_step_end=on_step_end,
            output_type="pil",
        )
        sync()
        total = time.perf_counter() - began
        rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        per_image.append(total / batch)
    return statistics.median(rates), statistics.median(per_image)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="sd15,sdxl")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--sizes", default="", help="override, e.g. 512 or 768,1024")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="smoke-test with tiny models")
    args = parser.parse_args()

    import torch
    from diffusers import EulerDiscreteScheduler

    from easel.backends.diffusers._pipelines import place
    from easel.tiny import SCHEDULER_CONFIG

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"device: {name}; torch {torch.__version__}; {args.steps} steps, median of {args.runs}")
    print(f"{'model':6} {'size':>5} {'batch':>5} {'variant':13} {'it/s':>8} {'s/image':>8}  target")
    for model in args.models.split(","):
        sizes = [int(s) for s in args.sizes.split(",") if s] or [DEFAULT_SIZES[model]]
        for variant in args.variants.split(","):
            # the scheduler's sigmas stay float32 on the CPU: built outside the contexts below
            scheduler = EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG)  # type: ignore[no-untyped-call]
            dtype = torch.float32 if args.device == "cpu" else torch.float16
            default_dtype = torch.get_default_dtype()
            torch.set_default_dtype(dtype)  # allocate fp16 weights directly, on the device
            try:
                with torch.device(args.device):
                    pipe = build_tiny(model) if args.tiny else build(model, scheduler)
            finally:
                torch.set_default_dtype(default_dtype)
            pipe.set_progress_bar_config(disable=True)
            place(pipe, args.device, options_for(variant, args.device))
            for size in sizes:
                for batch in (int(b) for b in args.batches.split(",")):
                    measure(pipe, size, batch, steps=min(args.steps, 4), runs=2, device=args.device)
                    rate, seconds = measure(pipe, size, batch, args.steps, args.runs, args.device)
                    target = TARGETS.get((model, size, batch))
                    verdict = (
                        ""
                        if target is None or args.tiny
                        else (f">= {target:g} it/s: {'met' if rate >= target else 'NOT met'}")
                    )
                    print(
                        f"{model:6} {size:5d} {batch:5d} {variant:13} {rate:8.2f} "
                        f"{seconds:8.3f}  {verdict}",
                        flush=True,
                    )
            del pipe
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
