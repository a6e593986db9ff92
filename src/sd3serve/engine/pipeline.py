"""Text-to-image with SD3 components and the project's own samplers.

Reads top to bottom like diffusers' pipeline: encode the prompt, draw the noise, build the σ schedule,
sample, decode. Noise comes from one generator per image, so image i of a batch equals the single request
with seed + i (and, with ``exact_batches``, bit for bit).
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from diffusers import StableDiffusion3Pipeline
from PIL import Image

from sd3serve import allocator
from sd3serve.catalogue import SAMPLER_INFO
from sd3serve.engine.acceleration import apply_acceleration
from sd3serve.engine.flow import FlowSampling
from sd3serve.engine.img2img import encode_init, img2img_sigmas, noised
from sd3serve.engine.job import GenerationJob, GenerationResult
from sd3serve.engine.loading import LoadedModel, load_model, resolve_device
from sd3serve.engine.lora import LoraLibrary, applied
from sd3serve.engine.lora_names import lora_dir
from sd3serve.engine.noise import BatchNoise
from sd3serve.engine.previews import PreviewHook, X0Tap, latent_rgb_for
from sd3serve.engine.prompt_cache import PromptCache, TextEmbedding
from sd3serve.engine.protocol import ProgressCallback
from sd3serve.engine.samplers import SAMPLERS
from sd3serve.engine.schedules import sampler_sigmas
from sd3serve.engine.windows import MIN_VAE_TILE, VAE_TILING_ABOVE, t5_window
from sd3serve.settings import Settings
from sd3serve.threads import PhaseThreads, phase_threads, torch_threads

# Which jobs of a batch are still wanted, asked before every model call (True: keep computing it). A job whose
# requesters are all gone stops at the next step: its rows are no longer computed, and when no job is left the
# batch ends with AllAborted.
LiveJobs = Callable[[], Sequence[bool]]
TRUNCATION_CACHE = 4096  # texts whose "is it truncated" answer is kept
_PUNCTUATION = re.compile(r"[^\w\s]|_")


class AllAborted(Exception):
    """Every job of the batch was aborted: the batch stopped early."""


class FlowDenoiser:
    """Wraps the SD3 transformer as a denoiser for the samplers: velocity → x0, with classifier-free guidance.

    As ComfyUI: a plain call at guidance 1 evaluates only the prompt; ``with_uncond`` (CFG++) evaluates the
    negative prompt whenever one is given, at guidance 1 too. Sampler maths stays in float32; only the
    transformer sees the model dtype.
    """

    def __init__(
        self,
        model: LoadedModel,
        *,
        cond: tuple[torch.Tensor, torch.Tensor],  # (embeds (B, T, C), pooled (B, P))
        uncond: tuple[torch.Tensor, torch.Tensor] | None,
        guidance_scale: float,
        exact_batches: bool,
        live_rows: Callable[[], list[int] | None] | None = None,
    ) -> None:
        self.transformer = model.pipe.transformer
        self.flow: FlowSampling = model.flow
        self.dtype = model.dtype
        self.cond = cond
        self.uncond = uncond
        self.guidance_scale = guidance_scale
        self.cfg = uncond is not None and not math.isclose(guidance_scale, 1.0)  # plain calls: ComfyUI's cfg1 skip
        self.exact_batches = exact_batches
        self.live_rows = live_rows
        self.any_live: Callable[[], bool] | None = None  # set on a rows() view: whether the whole batch has any
        self.tap: X0Tap | None = None  # sees every guided x0, for live previews
        self.tap_rows: list[int] | None = None  # the batch rows this denoiser's rows are (None: all)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self._evaluate(x, sigma, self.uncond if self.cfg else None)[0]

    def with_uncond(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._evaluate(x, sigma, self.uncond)

    def rows(self, indices: list[int]) -> FlowDenoiser:
        """The denoiser of rows ``indices`` only (their prompts, their live state); the same abort rules."""
        view = copy.copy(self)
        pick = lambda t: (t[0][indices], t[1][indices])  # noqa: E731
        view.cond = pick(self.cond)
        view.uncond = pick(self.uncond) if self.uncond is not None else None
        view.tap_rows = [self.tap_rows[i] for i in indices] if self.tap_rows is not None else list(indices)
        parent = self.live_rows
        if parent is not None:
            view.live_rows = lambda: _rows_of(parent(), indices)
            view.any_live = lambda: (rows := parent()) is None or bool(rows)
        return view

    def _evaluate(
        self, x: torch.Tensor, sigma: torch.Tensor, uncond: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        guided, unc = self._evaluate_live(x, sigma, uncond)
        if self.tap is not None:
            self.tap.seen(guided, self.tap_rows)
        return guided, unc

    def _evaluate_live(
        self, x: torch.Tensor, sigma: torch.Tensor, uncond: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.live_rows() if self.live_rows is not None else None
        if rows is None or len(rows) == x.shape[0]:
            return self._guided(x, sigma, self.cond, uncond)
        if not rows and (self.any_live is None or not self.any_live()):
            raise AllAborted
        # Only the rows still wanted go through the model; the others are frozen (x0 = x: no change).
        full_guided, full_uncond = x.clone(), x.clone()
        if rows:
            idx = torch.tensor(rows, device=x.device)
            pick = lambda t: (t[0][idx], t[1][idx])  # noqa: E731
            guided, unc = self._guided(x[idx], sigma, pick(self.cond), pick(uncond) if uncond is not None else None)
            full_guided[idx], full_uncond[idx] = guided, unc
        return full_guided, full_uncond

    def _guided(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond: tuple[torch.Tensor, torch.Tensor],
        uncond: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if uncond is None:
            x0 = x - sigma * self._velocity(x, sigma, cond)
            return x0, x0
        if self.exact_batches:
            v_cond = self._velocity(x, sigma, cond)
            v_uncond = self._velocity(x, sigma, uncond)
        else:  # one forward for both halves, as diffusers does
            both = (torch.cat([cond[0], uncond[0]]), torch.cat([cond[1], uncond[1]]))
            v_cond, v_uncond = self._velocity(torch.cat([x, x]), sigma, both).chunk(2)
        x0_cond = x - sigma * v_cond
        x0_uncond = x - sigma * v_uncond
        return x0_uncond + self.guidance_scale * (x0_cond - x0_uncond), x0_uncond

    def _velocity(self, x: torch.Tensor, sigma: torch.Tensor, text: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        embeds, pooled = text
        if self.exact_batches and x.shape[0] > 1:
            # Batched and single matrix kernels round differently: one image at a time keeps them identical.
            return torch.cat(
                [self._forward(x[i : i + 1], sigma, embeds[i : i + 1], pooled[i : i + 1]) for i in range(x.shape[0])]
            )
        return self._forward(x, sigma, embeds, pooled)

    def _forward(
        self, x: torch.Tensor, sigma: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor
    ) -> torch.Tensor:
        timestep = self.flow.timestep(sigma).to(self.dtype).expand(x.shape[0])
        out = self.transformer(
            hidden_states=x.to(self.dtype),
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            timestep=timestep,
            return_dict=False,
        )[0]
        return out.float()


def normalise_demo_prompt(text: str) -> str:
    """What the demo model was trained on: lower case, no punctuation ("A Red Circle." reads "a red circle")."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def _rows_of(live: list[int] | None, indices: list[int]) -> list[int] | None:
    """The positions within ``indices`` of the batch rows still live (None: all of them)."""
    if live is None:
        return None
    keep = set(live)
    return [j for j, r in enumerate(indices) if r in keep]


def t5_length(pipe: StableDiffusion3Pipeline) -> int:
    """The T5 window the prompt is padded to (``windows.t5_window``)."""
    tok = pipe.tokenizer_3
    return t5_window(tok.model_max_length if tok is not None else None)


def batch_key(job: GenerationJob) -> tuple[object, ...]:
    """Jobs with the same key can share a forward pass: everything but the prompts, seeds and batch size."""
    init = (job.init.digest, job.strength) if job.init is not None else None
    return (job.width, job.height, job.steps, job.sampler, job.scheduler, job.guidance_scale, init, job.loras)


class SD3Pipeline:
    def __init__(
        self,
        model: LoadedModel,
        *,
        exact_batches: bool = True,
        prompt_cache_bytes: int = 0,
        vae_tiling: Literal["auto", "on", "off"] = "auto",
        loras: LoraLibrary | None = None,
        threads: PhaseThreads | None = None,
    ) -> None:
        self.model = model
        self.loras = loras or LoraLibrary(None, 0)
        self.exact_batches = exact_batches
        self.prompt_cache = PromptCache(prompt_cache_bytes)
        self.vae_tiling = vae_tiling
        self.threads = threads  # None: torch's thread setting as it is
        # decodes that may run at once across the workers of this model (each on all its decode threads)
        self.decode_slots = threading.BoundedSemaphore(threads.decode_slots) if threads is not None else None
        # Tokenizers and text encoders are shared by the workers of one model; fast tokenizers are not re-entrant.
        self._text_lock = threading.Lock()
        self._truncated: OrderedDict[str, bool] = OrderedDict()
        vae = model.pipe.vae
        if getattr(vae, "tile_sample_min_size", 0) < MIN_VAE_TILE:  # small demo configs: tiles of real size
            vae.tile_sample_min_size = MIN_VAE_TILE
            vae.tile_latent_min_size = MIN_VAE_TILE // model.vae_scale_factor
        # This pipeline's view of the VAE: its own tiling switch, the shared layers and weights.
        self.vae = copy.copy(vae)
        self.latent_rgb = latent_rgb_for(model)  # the live previews' latent→RGB map

    def worker(self) -> SD3Pipeline:
        """Another pipeline on the same model (weights, prompt cache, text lock, decode slots), for another thread."""
        other = copy.copy(self)
        other.vae = copy.copy(self.vae)
        return other

    @torch.no_grad()
    def encode_text(self, text: str) -> TextEmbedding:
        """(embeds (1, T, C), pooled (1, P)) of one text, from the cache when it was seen before.

        The negative prompt goes through here too: diffusers encodes it exactly as a prompt.
        """
        if self.model.normalise_prompts:
            text = normalise_demo_prompt(text)
        cached = self.prompt_cache.get(text)
        if cached is not None:
            return cached
        with self._text_lock:
            return self._encode_text(text)

    def _encode_text(self, text: str) -> TextEmbedding:
        embeds, _, pooled, _ = self.model.pipe.encode_prompt(
            prompt=text,
            prompt_2=None,
            prompt_3=None,
            do_classifier_free_guidance=False,
            num_images_per_prompt=1,
            device=self.model.device,
            max_sequence_length=t5_length(self.model.pipe),
        )
        value = (embeds.to(self.model.dtype), pooled.to(self.model.dtype))
        self.prompt_cache.put(text, value)
        return value

    def is_truncated(self, text: str) -> bool:
        """Whether the text encoders see only the start of ``text`` (SD3.5: CLIP 77 tokens, T5 256), as diffusers
        truncates."""
        pipe = self.model.pipe
        if self.model.normalise_prompts:
            text = normalise_demo_prompt(text)
        with self._text_lock:
            if (known := self._truncated.get(text)) is not None:
                self._truncated.move_to_end(text)
                return known
            limits = [(pipe.tokenizer, pipe.tokenizer_max_length), (pipe.tokenizer_2, pipe.tokenizer_max_length)]
            if pipe.tokenizer_3 is not None and pipe.text_encoder_3 is not None:
                limits.append((pipe.tokenizer_3, t5_length(pipe)))
            truncated = any(len(tok(text, truncation=False).input_ids) > limit for tok, limit in limits)
            self._truncated[text] = truncated
            if len(self._truncated) > TRUNCATION_CACHE:
                self._truncated.popitem(last=False)
            return truncated

    def __call__(
        self, job: GenerationJob, *, progress: ProgressCallback | None = None, previews: PreviewHook | None = None
    ) -> GenerationResult:
        return self.generate_many([job], progress=progress, previews=previews)[0]

    @torch.no_grad()
    def generate_many(
        self, jobs: list[GenerationJob], *, progress: ProgressCallback | None = None, live: LiveJobs | None = None,
        previews: PreviewHook | None = None,
    ) -> list[GenerationResult]:  # fmt: skip
        """Several compatible jobs (same ``batch_key``) in one batch; each job's images are what it gets alone.

        With ``live``, a job that is no longer wanted stops at the next model call (its result has no images)
        while the others go on unchanged; AllAborted when none is left. With ``previews``, the rows it asks for get
        their x0 estimate as a small picture after every step (nothing is computed while none asks)."""
        if len({batch_key(j) for j in jobs}) != 1:
            raise ValueError("jobs in one batch must share size, steps, sampler, scheduler, guidance, image, adapters")
        # encoding and denoising on the denoise threads; the decode sets its own inside
        with torch_threads(self.threads.denoise if self.threads is not None else None):
            return self._generate_many(jobs, progress, live, previews)

    def _generate_many(
        self, jobs: list[GenerationJob], progress: ProgressCallback | None, live: LiveJobs | None,
        previews: PreviewHook | None,
    ) -> list[GenerationResult]:  # fmt: skip
        model, first, timings = self.model, jobs[0], {}
        # the negative prompt is evaluated for CFG (guidance > 1) and, as ComfyUI does, by CFG++ at any guidance
        guidance = first.guidance_scale > 1 or SAMPLER_INFO[first.sampler].cfg_pp

        # 1. Encode each prompt (once per text), one row per image.
        t0 = time.perf_counter()
        cond = _stack([self.encode_text(j.prompt) for j in jobs], jobs)
        uncond = _stack([self.encode_text(j.negative_prompt) for j in jobs], jobs) if guidance else None
        timings["encode"] = time.perf_counter() - t0

        # 2. Noise: one generator per image (seed + i).
        t0 = time.perf_counter()
        m, f = model.size_multiple, model.vae_scale_factor
        gen_h, gen_w = -(-first.height // m) * m, -(-first.width // m) * m  # round up to what the model takes
        noise = BatchNoise([seed for j in jobs for seed in j.seeds])
        channels = model.pipe.transformer.config.in_channels
        eps = noise(torch.empty(len(noise), channels, gen_h // f, gen_w // f, device=model.device))

        # 3. σ schedule from the model's own shift, as ComfyUI's KSampler builds it for this sampler; the start is
        # x_σ0 of an empty latent (σ0 < 1 for ddim_uniform).
        if first.init is None:
            sigmas = sampler_sigmas(first.sampler, first.scheduler, model.flow, first.steps).to(model.device)
            x = eps * sigmas[0]
        else:  # image-to-image: the image's latent, noised to the first σ of the shortened schedule
            sigmas = img2img_sigmas(first.sampler, first.scheduler, model.flow, first.steps, first.strength)
            sigmas = sigmas.to(model.device)
            latent = encode_init(self.vae, first.init, gen_h, gen_w, tiling=self._tiles(max(gen_h, gen_w)))
            latent = latent.expand_as(eps)
            x = noised(latent, eps, sigmas[0]) if len(sigmas) else latent

        # 4. Sample.
        row_job = [k for k, j in enumerate(jobs) for _ in range(j.batch_size)]

        def live_rows() -> list[int] | None:
            wanted = live() if live is not None else None
            return None if wanted is None or all(wanted) else [r for r, k in enumerate(row_job) if wanted[k]]

        denoiser = FlowDenoiser(
            model, cond=cond, uncond=uncond, guidance_scale=first.guidance_scale, exact_batches=self.exact_batches,
            live_rows=live_rows,
        )  # fmt: skip
        n_steps = max(0, len(sigmas) - 1)
        tap = denoiser.tap = X0Tap(previews, self.latent_rgb) if previews is not None else None

        def on_step(i: int, n: int) -> None:
            if tap is not None:
                tap.flush(i + 1, n)
            if progress is not None:
                progress(i + 1, n)

        if progress is not None:
            progress(0, n_steps)
        with applied(model.pipe.transformer, self.loras, first.loras):
            x0 = SAMPLERS[first.sampler](denoiser, x, sigmas, noise=noise, callback=on_step) if n_steps > 0 else x
        timings["denoise"] = time.perf_counter() - t0

        # 5. Decode the rows still wanted, crop to the requested size, hand each job its images.
        t0 = time.perf_counter()
        rows = live_rows()
        if rows == []:
            raise AllAborted
        kept = list(range(len(row_job))) if rows is None else rows
        with self.decode_slots or contextlib.nullcontext(), torch_threads(self.decode_threads()):
            decoded = self.decode(x0[kept] if rows is not None else x0)
        if (gen_h, gen_w) != (first.height, first.width):
            top, left = (gen_h - first.height) // 2, (gen_w - first.width) // 2
            decoded = [im.crop((left, top, left + first.width, top + first.height)) for im in decoded]
        images: dict[int, Image.Image] = dict(zip(kept, decoded, strict=True))
        timings["decode"] = time.perf_counter() - t0
        timings["batch_images"] = len(decoded)
        results, start = [], 0
        for j in jobs:
            truncated = self.is_truncated(j.prompt) or (guidance and self.is_truncated(j.negative_prompt))
            mine = [images[r] for r in range(start, start + j.batch_size) if r in images]
            results.append(GenerationResult(images=mine, timings=dict(timings), prompt_truncated=truncated))
            start += j.batch_size
        return results

    def decode_threads(self) -> int | None:
        return self.threads.decode if self.threads is not None else None

    def _tiles(self, side: int) -> bool:
        """Whether the VAE works in tiles on an image of ``side`` pixels (its longer side)."""
        return self.vae_tiling == "on" or (self.vae_tiling == "auto" and side > VAE_TILING_ABOVE)

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        vae = self.vae
        vae.use_tiling = self._tiles(max(latents.shape[-2:]) * self.model.vae_scale_factor)
        z = (latents / vae.config.scaling_factor + vae.config.shift_factor).to(self.model.dtype)
        chunks = z.split(1) if self.exact_batches else [z]
        pixels = torch.cat([vae.decode(c, return_dict=False)[0] for c in chunks])
        pixels = (pixels.float() / 2).add_(0.5).clamp_(0, 1).mul_(255).round_().to(torch.uint8)  # one new tensor
        arr = pixels.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
        return [Image.fromarray(a) for a in arr]


def _stack(texts: list[TextEmbedding], jobs: list[GenerationJob]) -> TextEmbedding:
    """One (embeds, pooled) row per image: each job's text repeated batch_size times."""
    embeds = torch.cat([t[0].expand(j.batch_size, -1, -1) for t, j in zip(texts, jobs, strict=True)])
    pooled = torch.cat([t[1].expand(j.batch_size, -1) for t, j in zip(texts, jobs, strict=True)])
    return embeds, pooled


def build_pipeline(settings: Settings, model: LoadedModel | None = None) -> SD3Pipeline:
    """The pipeline exactly as the server runs it (``serve`` and ``generate`` both build it here): the model
    loaded and accelerated as the settings say, with the prompt cache and VAE tiling settings."""
    if model is None:
        device = resolve_device(settings.device)
        if allocator.wanted(settings.malloc_tuning, device.type):
            allocator.tune_allocator()  # before the weights and the first activations are allocated
        model = load_model(settings)
    elif allocator.wanted(settings.malloc_tuning, model.device.type):
        allocator.tune_allocator()
    apply_acceleration(model, settings)
    width = model.pipe.transformer.config.num_attention_heads * model.pipe.transformer.config.attention_head_dim
    return SD3Pipeline(
        model,
        exact_batches=settings.exact_batches,
        prompt_cache_bytes=int(settings.prompt_cache_mb * 2**20),
        vae_tiling=settings.vae_tiling,
        loras=LoraLibrary(lora_dir(settings), int(settings.lora_cache_mb * 2**20)),
        threads=phase_threads(settings, device_type=model.device.type, transformer_width=width),
    )
