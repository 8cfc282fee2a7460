"""Progress, previews and cancellation, from inside the denoising loop.

A preview every K steps is a linear latent -> RGB projection (a few hundred multiply-adds per
latent pixel: ~4% of a step, where a VAE decode would double the run) at one pixel per latent,
or, when the server names a tiny autoencoder (TAESD), its decode at full size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PIL import Image

from easel.backends.base import RunContext
from easel.backends.diffusers._families import Family
from easel.errors import Cancelled

StepCallback = Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]


class Previewer:
    """Turns the loop's latents into a small RGB image of one image of the batch."""

    def __init__(
        self, family: Family, width: int, height: int, *, decoder: Any = None, scale: int = 8
    ) -> None:
        self.family = family
        self.latent_size = (height // scale, width // scale)
        self.decoder = decoder
        self._weights: Any = None

    def __call__(self, latents: Any, index: int = 0) -> Image.Image:
        import torch

        with torch.no_grad():
            latents = self._unpacked(latents[index : index + 1])
            if self.decoder is not None:
                return self._decoded(latents)
            rgb = self._project(latents[0].float())
            pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            array = pixels.permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(array, "RGB")

    def _unpacked(self, latents: Any) -> Any:
        """FLUX's (B, tokens, C*4) tokens back to (B, C, H, W) latents."""
        if not self.family.packed or latents.ndim != 3:
            return latents
        height, width = self.latent_size
        batch, _, channels = latents.shape
        latents = latents.view(batch, height // 2, width // 2, channels // 4, 2, 2)
        return latents.permute(0, 3, 1, 4, 2, 5).reshape(batch, channels // 4, height, width)

    def _project(self, latent: Any) -> Any:
        import torch

        channels = latent.shape[0]
        table = self.family.latent_rgb
        if table is None or len(table) != channels:
            # No published fit for this latent space: the first three channels, stretched.
            rgb = latent[:3]
            low = rgb.amin(dim=(1, 2), keepdim=True)
            high = rgb.amax(dim=(1, 2), keepdim=True)
            return (rgb - low) / (high - low).clamp(min=1e-6) * 2 - 1
        if self._weights is None or self._weights[0].device != latent.device:
            weights = torch.tensor(table, device=latent.device)
            bias = torch.tensor(self.family.latent_rgb_bias, device=latent.device)
            self._weights = (weights, bias)
        weights, bias = self._weights
        return torch.einsum("chw,cr->rhw", latent, weights) + bias[:, None, None]

    def _decoded(self, latents: Any) -> Image.Image:
        import torch

        decoder = self.decoder
        sample = decoder.decode(latents.to(decoder.device, decoder.dtype)).sample[0]
        pixels = ((sample.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy(), "RGB")


def step_callback(
    context: RunContext,
    *,
    offset: int = 0,
    total: int | None = None,
    every: int | None = None,
    previewer: Previewer | None = None,
) -> StepCallback:
    """diffusers' ``callback_on_step_end``: progress after each step, a preview every
    ``every`` steps (and at the last), and a stop at the first step after a cancel.

    ``offset``/``total`` let a second pass (upscale) continue the first one's count.
    Raising, rather than setting ``pipe._interrupt``, skips the final VAE decode.
    """

    def on_step_end(
        pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        # The real count: img2img runs fewer steps, Heun/DPM2 twice as many, PLMS one more.
        count = int(getattr(pipe, "num_timesteps", None) or len(pipe.scheduler.timesteps))
        done, of = offset + step + 1, total or offset + count
        preview = None
        latents = callback_kwargs.get("latents")
        if (
            every
            and previewer is not None
            and latents is not None
            and (done % every == 0 or done == of)
        ):
            preview = previewer(latents)
        context.progress(done, of, preview)
        if context.cancelled:
            raise Cancelled("the job was cancelled")
        return callback_kwargs

    return on_step_end
