"""The diffusers backend: the user's own models (SD 1.x/2.x, SDXL, SD3, FLUX, Kandinsky), local.

Models come from the registry (a models directory, single files, the Hugging Face cache) and
are loaded on first use into an LRU cache bounded by a memory budget. A loaded pipeline is only
a holder of weights: each request gets its own pipeline object for its mode (``from_pipe``,
weights shared) and its own scheduler, because a pipeline and a scheduler keep per-call state
on ``self``. What a model cannot do is refused at admission from its family's table, before
anything is loaded. torch and diffusers are imported inside methods, so easel imports without.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from easel.backends.base import (
    Backend,
    Capability,
    GenerationResult,
    ModelInfo,
    RunContext,
)
from easel.backends.diffusers._batch import batch_callback, merge, signature, split
from easel.backends.diffusers._calls import (
    call_kwargs,
    generators,
    mix_ingredients,
    request_pipeline,
    upscale_latents,
    upscaled_size,
)
from easel.backends.diffusers._families import Family, Mode
from easel.backends.diffusers._lora import LoraGate
from easel.backends.diffusers._options import BackendOptions, Extras
from easel.backends.diffusers._pipelines import (
    DeviceOptions,
    PipelineCache,
    default_budget,
    free_memory,
    load_controlnet,
    load_pipeline,
    load_preview_vae,
    parse_bytes,
    pick_device,
)
from easel.backends.diffusers._plans import Plan, family_for, plan_request
from easel.backends.diffusers._previews import Previewer, step_callback
from easel.backends.diffusers._quiet import quiet_warnings
from easel.backends.diffusers.models import (
    ModelEntry,
    ModelKind,
    ModelRegistry,
    inspect_path,
    refuse_pickles,
)
from easel.backends.diffusers.schedulers import build_scheduler, resolve_sampler, sampler_record
from easel.errors import (
    Cancelled,
    EaselError,
    GenerationError,
    InvalidRequest,
    ModelNotFound,
    Unsupported,
)
from easel.jobs import GenerationRequest
from easel.payloads import Executor
from easel.samplers import SamplerName, known_sampler


@dataclass
class Parts:
    """What one run uses, held for its duration: the base pipeline and optional extras."""

    base: Any
    controlnet: Any = None
    decoder: Any = None


_MODE_CAPABILITY = {
    Mode.txt2img: Capability.txt2img,
    Mode.img2img: Capability.img2img,
    Mode.inpaint: Capability.inpaint,
    Mode.mix: Capability.mix,
}


class DiffusersBackend(Backend):
    """Serve local diffusers models.

    ``model`` is the default model: a diffusers folder, a single ``.safetensors`` file, a
    registry name, or a directory of models (then served as ``models_dir``). Memory and speed
    options apply to every model this worker loads.
    """

    name = "diffusers"
    capabilities = frozenset(
        {
            Capability.txt2img,
            Capability.img2img,
            Capability.inpaint,
            Capability.controlnet,
            Capability.negative_prompt,
            Capability.seed,
            Capability.scheduler,
            Capability.lora,
            Capability.upscale,
            Capability.preview,
            Capability.mix,
        }
    )

    def __init__(self, settings: BackendOptions | None = None) -> None:
        settings = settings or BackendOptions()
        self.settings = settings
        self.options = DeviceOptions(
            settings.device, settings.dtype, settings.offload, settings.attention_slicing,
            settings.vae_slicing, settings.vae_tiling, settings.channels_last,
            settings.fuse_qkv, settings.compile, settings.allow_pickle,
        )  # fmt: skip
        model, models_dir = settings.model, settings.models_dir
        extra: list[Path] = []
        self._default: str | None = model
        self._problem: EaselError | None = None
        as_dir = False
        if model:
            path = Path(model).expanduser()
            if path.exists() and inspect_path(path, name=path.name) is not None:
                extra.append(path)
                self._default = path.stem if path.is_file() else path.name
            elif path.is_dir() and models_dir is None:
                models_dir, self._default, as_dir = str(path), None, True
            elif path.is_absolute() or model.startswith((".", "~")) or path.exists():
                self._problem = ModelNotFound(
                    f"model {model!r} does not exist; easel loads models from disk and never "
                    f"downloads (fetch one first, e.g. `hf download <repo> --local-dir {model}`)"
                )
            # else: a name, looked up in the models directory and the Hugging Face cache
        self.registry = ModelRegistry(models_dir, hf_cache=settings.hf_cache, extra=extra)
        if as_dir and not self.registry.entries(ModelKind.pipeline):
            self._problem = ModelNotFound(
                f"{model!r} is neither a model (no model_index.json, not a .safetensors "
                "checkpoint) nor a directory with models in it"
            )
        self.cache = PipelineCache(parse_bytes(settings.memory_budget))
        self._budget_given = settings.memory_budget not in (None, "auto")
        self.preview_every = settings.preview_every
        self.preview_vae = settings.preview_vae
        self.warmup = tuple(settings.warmup)
        self.device: str | None = None
        self._executors: frozenset[Executor] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def preflight(self) -> None:
        """What ``start`` would refuse, found without torch or loading anything (a model
        that does not exist, pickled weights): for the command line to say before serving."""
        if self._problem is not None:
            raise self._problem
        if self._default is not None:
            entry = self.registry.get(self._default)
            refuse_pickles(entry, allowed=self.options.allow_pickle)

    async def start(self) -> None:
        await asyncio.to_thread(self._start)

    def _start(self) -> None:
        if self._problem is not None:
            raise self._problem
        try:
            import diffusers  # noqa: F401
            import torch  # noqa: F401
        except ImportError as exc:
            raise ImportError(
                f"the diffusers backend needs torch and diffusers ({exc}); "
                "install them with: pip install 'easel[diffusers]'"
            ) from exc
        self.device = pick_device(self.options.device)
        if self.options.offload != "none" and self.device == "cpu":
            raise InvalidRequest(
                "offload moves weights between the CPU and an accelerator; with device cpu "
                "there is nothing to offload (use offload none)"
            )
        if not self._budget_given:
            self.cache.budget = default_budget(self.device)
        if self._default is not None:
            entry = self.registry.get(self._default)
            refuse_pickles(entry, allowed=self.options.allow_pickle)
            with self.cache.use(entry.name, lambda: self._load(entry)):
                pass
            for size in self.warmup:
                self._warm(entry, size)

    async def close(self) -> None:
        self.cache.clear()

    preloads = True

    async def load(self, model: str) -> None:
        """Load a model into the cache ahead of its jobs (the fleet's model pressure)."""
        entry = self.registry.get(model)
        refuse_pickles(entry, allowed=self.options.allow_pickle)
        await asyncio.to_thread(self._hold, entry)

    def _hold(self, entry: ModelEntry) -> None:
        with quiet_warnings(), self.cache.use(entry.name, lambda: self._load(entry)):
            pass

    def _load(self, entry: ModelEntry) -> Any:
        return load_pipeline(entry, self.registry, self.options)

    def _warm(self, entry: ModelEntry, size: str) -> None:
        """One short run at ``size`` (e.g. "1024x1024"): compiles before the first user waits."""
        width, _, height = size.partition("x")
        request = GenerationRequest(
            prompt="warm-up", width=int(width), height=int(height or width), steps=2, seed=0
        )
        self._run(request.model_copy(update={"model": entry.name}), RunContext())

    # -- what this backend serves ----------------------------------------------------------

    def models(self) -> list[ModelInfo]:
        loaded = set(self.cache.names)
        self.registry.refresh()
        entries = self.registry.entries()
        # pipelines first, the default first among them: admission serves the first
        entries.sort(key=lambda e: (e.kind is not ModelKind.pipeline, e.name != self._default))
        return [
            ModelInfo(
                name=e.name,
                backend=self.name,
                family=e.family,
                path=str(e.path),
                loaded=e.name in loaded,
                kind=e.kind.value,
                size_bytes=e.size_bytes,
                description=e.description,
                base_model=e.base_model,
                merged_from=e.merged_from,
                format=e.format.value,
            )
            for e in entries
        ]

    def capabilities_of(self, model: str) -> frozenset[Capability]:
        """What one model can do (the class attribute is what some model here can do)."""
        family = self._family(self.registry.get(model))
        caps = {Capability.seed, Capability.scheduler, Capability.preview}
        caps |= {_MODE_CAPABILITY[m] for m in family.modes if m in _MODE_CAPABILITY}
        flags = {
            Capability.negative_prompt: family.negative_prompt,
            Capability.lora: family.lora,
            Capability.controlnet: family.controlnet,
            Capability.upscale: family.upscale,
        }
        return frozenset(caps | {cap for cap, on in flags.items() if on})

    def check(self, request: GenerationRequest) -> None:
        super().check(request)
        self._plan(request)

    def check_sampler(self, name: str, model: str | None = None) -> None:
        """An unknown name is refused listing what the model's family runs."""
        if not known_sampler(name):
            resolve_sampler(name, self._family_of(model))
        super().check_sampler(name, model)

    def sampler_refusal(self, sampler: SamplerName, model: str | None) -> str | None:
        """What the model's family can drive (:func:`resolve_sampler`); a model it does
        not serve is refused by the plan, not here."""
        try:
            resolve_sampler(sampler.name, self._family_of(model))
        except InvalidRequest as exc:
            return exc.message
        return None

    def _family_of(self, model: str | None) -> Family | None:
        """The family of ``model`` (None: the default one), None when it is not here."""
        name = model or self._default
        if name is None:
            name = next((e.name for e in self.registry.entries(ModelKind.pipeline)), None)
        entry = None if name is None else self.registry.find(name)
        return None if entry is None else self._family(entry)

    def _family(self, entry: ModelEntry) -> Family:
        return family_for(entry)

    @property
    def executors(self) -> frozenset[Executor]:
        """A1111 payloads (as easel fields) always; Kandinsky payloads while a Kandinsky
        2.2/3 pipeline is here (they run on it)."""
        if self._executors is not None:
            return self._executors
        if self._kandinsky_models():
            return frozenset({Executor.automatic1111, Executor.kandinsky})
        return frozenset({Executor.automatic1111})

    @executors.setter
    def executors(self, value: frozenset[Executor]) -> None:
        self._executors = value

    def _kandinsky_models(self) -> list[str]:
        entries = self.registry.entries(ModelKind.pipeline)
        return [e.name for e in entries if self._family(e).name.startswith("kandinsky")]

    def _plan(self, request: GenerationRequest) -> Plan:
        """Everything admission can refuse, without loading anything."""
        default = self._default
        if request.executor is Executor.kandinsky:  # a Kandinsky payload runs on Kandinsky
            kandinsky = self._kandinsky_models()
            if request.model is not None and request.model not in kandinsky:
                raise Unsupported(
                    f"a kandinsky payload runs on a Kandinsky model; {request.model!r} is not "
                    f"one (Kandinsky models here: {', '.join(kandinsky) or 'none'})"
                )
            if default not in kandinsky:
                default = kandinsky[0] if kandinsky else default
        if default is None:  # the first model found (no rescan: this runs at admission)
            default = next((e.name for e in self.registry.entries(ModelKind.pipeline)), None)
        return plan_request(request, self.registry, default, self.options)

    # -- generation ------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest, context: RunContext) -> GenerationResult:
        self.check(request)
        try:
            return await asyncio.to_thread(self._run, request, context)
        except asyncio.CancelledError:
            # The thread cannot be killed; ask the pipeline to stop at its next step.
            context.cancel_event.set()
            raise

    def _run(self, request: GenerationRequest, context: RunContext) -> GenerationResult:
        context.raise_if_cancelled()
        plan = self._plan(request)
        images, pipe = self._execute(
            plan,
            f"{request.batch_size} image(s) of {request.width}x{request.height}",
            lambda parts: self._generate(parts, plan, request, context),
        )
        context.raise_if_cancelled()
        return GenerationResult(
            images=images, seeds=request.seeds, model=plan.entry.name, info=_info(plan, pipe)
        )

    def _execute(
        self, plan: Plan, what: str, work: Callable[[Parts], tuple[list[Any], Any]]
    ) -> tuple[list[Any], Any]:
        """``work(parts)`` with the model, its ControlNet and preview decoder loaded and held
        (never evicted meanwhile), the request's LoRAs applied, and foreign exceptions
        translated to easel's."""
        import torch

        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(quiet_warnings())
                use = self.cache.use
                model = stack.enter_context(use(plan.entry.name, lambda: self._load(plan.entry)))
                parts = Parts(model.value)
                if (cn := plan.controlnet) is not None:
                    load = partial(load_controlnet, cn, self.options)
                    parts.controlnet = stack.enter_context(use(f"controlnet:{cn.name}", load)).value
                if (vae := self._preview_vae(plan)) is not None:
                    load = partial(load_preview_vae, vae, self.options)
                    parts.decoder = stack.enter_context(use(f"preview:{vae.name}", load)).value
                gate = model.state.setdefault("lora", LoraGate(model.value))
                stack.enter_context(gate.use(plan.loras))
                return work(parts)
        except EaselError:
            raise
        except torch.cuda.OutOfMemoryError as exc:
            free_memory()
            raise GenerationError(
                f"out of {self.device} memory for {what}; try a smaller size or batch, or set "
                "offload/vae_tiling on this worker"
            ) from exc
        except Exception as exc:
            raise GenerationError(f"diffusers failed: {type(exc).__name__}: {exc}") from exc

    # -- batches of compatible requests --------------------------------------------------------

    batches = True

    async def generate_batch(
        self, requests: list[GenerationRequest], contexts: list[RunContext]
    ) -> list[GenerationResult]:
        for request in requests:
            self.check(request)
        try:
            return await asyncio.to_thread(self._run_batch, requests, contexts)
        except asyncio.CancelledError:
            for context in contexts:
                context.cancel_event.set()
            raise

    def _run_batch(
        self, requests: list[GenerationRequest], contexts: list[RunContext]
    ) -> list[GenerationResult]:
        """One call when every request would run the same way, else one call each."""
        plans = [self._plan(request) for request in requests]
        keys = {signature(plan, request) for plan, request in zip(plans, requests, strict=True)}
        if len(keys) != 1 or None in keys:
            return [self._run_or_skip(r, c) for r, c in zip(requests, contexts, strict=True)]
        plan, merged = plans[0], merge(requests)
        every = [self._every(p.extras) for p in plans]

        def work(parts: Parts) -> tuple[list[Any], Any]:
            base = parts.base
            pipe = request_pipeline(base, Mode.txt2img, self._scheduler(base, plan))
            previewer = Previewer(plan.family, merged.width, merged.height, decoder=parts.decoder)
            callback = batch_callback(contexts, merged.counts, every, previewer)
            kwargs = call_kwargs(pipe, merged, plan.extras, plan.scheduler, plan.family, callback)
            return list(pipe(**kwargs).images), pipe

        images, pipe = self._execute(
            plan, f"a batch of {len(merged.seeds)} {merged.width}x{merged.height} images", work
        )
        info = {**_info(plan, pipe), "batched_with": len(requests)}
        return [
            GenerationResult(images=part, seeds=r.seeds, model=plan.entry.name, info=dict(info))
            for part, r in zip(split(images, merged.counts), requests, strict=True)
        ]

    def _run_or_skip(self, request: GenerationRequest, context: RunContext) -> GenerationResult:
        """A request of a batch run alone; a cancelled one gets an empty result (discarded)."""
        try:
            return self._run(request, context)
        except Cancelled:
            return GenerationResult(images=[], seeds=request.seeds)

    def _generate(
        self, parts: Parts, plan: Plan, request: GenerationRequest, context: RunContext
    ) -> tuple[list[Any], Any]:
        base, family, extras = parts.base, plan.family, plan.extras
        pipe = request_pipeline(base, extras.mode, self._scheduler(base, plan), parts.controlnet)
        every = self._every(extras)
        previewer = Previewer(family, request.width, request.height, decoder=parts.decoder)
        upscale = extras.upscale
        if extras.mode is Mode.mix:
            return self._mix(pipe, request, extras, context, every, previewer), pipe
        if upscale is None:
            callback = step_callback(context, every=every, previewer=previewer)
            kwargs = call_kwargs(pipe, request, extras, plan.scheduler, family, callback)
            return list(pipe(**kwargs).images), pipe
        # Latent upscale: txt2img to latents, then img2img on the upscaled latents.
        steps2 = upscale.steps or request.steps
        total = request.steps + int(steps2 * upscale.strength)
        callback = step_callback(context, total=total, every=every, previewer=previewer)
        kwargs = call_kwargs(
            pipe, request, extras, plan.scheduler, family, callback, output_type="latent"
        )
        latents = upscale_latents(pipe(**kwargs).images, family, request, upscale.factor)
        width, height = upscaled_size(request.width, request.height, upscale.factor, family)
        second = request.model_copy(update={"width": width, "height": height, "steps": steps2})
        hires = request_pipeline(base, Mode.img2img, self._scheduler(base, plan))
        big = Previewer(family, width, height, decoder=previewer.decoder)
        callback = step_callback(
            context, offset=request.steps, total=total, every=every, previewer=big
        )
        again = replace(extras, mode=Mode.txt2img, controlnet=None, upscale=None)  # + clip skip
        kwargs = call_kwargs(hires, second, again, plan.scheduler, family, callback)
        kwargs.update(image=latents, strength=upscale.strength)
        return list(hires(**kwargs).images), hires

    def _every(self, extras: Extras) -> int | None:
        """Steps between previews: the request's, else the worker's default (0: none)."""
        every = extras.preview_every if extras.preview_every is not None else self.preview_every
        return every or None

    def _scheduler(self, base: Any, plan: Plan) -> Any:
        """A fresh scheduler for one run: schedulers keep per-run state too."""
        config = base.scheduler.config
        if plan.scheduler is None:
            with quiet_warnings():
                return type(base.scheduler).from_config(config)
        return build_scheduler(plan.scheduler, config)

    def _preview_vae(self, plan: Plan) -> ModelEntry | None:
        """The worker's tiny autoencoder for full-size previews, if it fits this latent space
        (else previews are the linear projection)."""
        if self.preview_vae is None:
            return None
        entry = self.registry.get(self.preview_vae, ModelKind.preview_vae)
        fits = plan.family.latent_channels == (16 if "flux" in entry.family else 4)
        return entry if fits else None

    def _mix(
        self,
        pipe: Any,
        request: GenerationRequest,
        extras: Extras,
        context: RunContext,
        every: int | None,
        previewer: Previewer,
    ) -> list[Any]:
        """Kandinsky: mix prompts and images in CLIP image space (the prior), then decode."""
        items, weights = mix_ingredients(request, extras)
        embeds = pipe.prior_pipe.interpolate(
            items,
            weights,
            num_images_per_prompt=request.batch_size,
            generator=generators(request.seeds[:1])[0],
            negative_prompt=request.negative_prompt,
        )
        callback = step_callback(context, every=every, previewer=previewer)
        output = pipe.decoder_pipe(
            image_embeds=embeds.image_embeds,
            negative_image_embeds=embeds.negative_image_embeds,
            width=request.width,
            height=request.height,
            num_inference_steps=request.steps,
            guidance_scale=request.cfg_scale,
            generator=generators(request.seeds),
            callback_on_step_end=callback,
        )
        return list(output.images)


def _info(plan: Plan, pipe: Any) -> dict[str, Any]:
    """What the result records about how it was made (beyond the request): the sampler as
    A1111 names it, the diffusers class and config that ran, and any substitution."""
    scheduler = pipe.scheduler
    info: dict[str, Any] = {
        **sampler_record(plan.scheduler, scheduler),
        "family": plan.family.name,
        "mode": str(plan.extras.mode),
    }
    if plan.loras:
        info["loras"] = [{"name": e.name, "weight": w} for e, w in plan.loras]
    return info


def create(model: str | None = None, **options: Any) -> DiffusersBackend:
    """The ``diffusers`` kind as the registry builds it (``model``, ``device=``, the
    options of :class:`BackendOptions`): validated first, an unknown option refused."""
    return DiffusersBackend(BackendOptions.of({"model": model, **options}))
