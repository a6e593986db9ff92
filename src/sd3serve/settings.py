"""One validated settings object: flags and ``SD3SERVE_*`` environment variables."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "sd3serve"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SD3SERVE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # A diffusers directory or a single-file SD3 checkpoint; unset: the embedded demo model.
    model: Path | None = None
    # For a single-file checkpoint: a diffusers-layout directory with the configs and tokenizers
    # (model_index.json, */config.json, tokenizer*/); unset: the configs shipped for the SD3 family.
    model_config_dir: Path | None = None
    load_t5: bool = True  # SD3 works without T5; skipping it saves ~9 GB (fp16) on the real model
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")  # cuda:N picks one GPU of several
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    data_dir: Path = Field(default_factory=default_data_dir)
    database_url: str | None = None  # unset: SQLite file in data_dir
    price_per_image: Decimal = Field(Decimal(1), ge=0, decimal_places=6)  # credits, in steps of one micro-credit
    max_body_bytes: int = Field(64 * 1024, ge=1024)
    # Run each image of a batch through the model on its own, so batched images are bit-identical to single
    # ones (batched and single matrix kernels round differently). Turn off on GPUs for throughput.
    exact_batches: bool = True
    # Serving: a bounded queue (503 past it), dynamic batching of compatible requests, a prompt-embedding cache.
    max_queue: int = Field(64, ge=1)  # requests waiting (not running); more get 503 with Retry-After
    queue_timeout_s: float = Field(300.0, gt=0)  # a request still queued after this fails, uncharged
    # One request's work, in megapixel model evaluations (width·height/1e6 × images × steps × model calls per step,
    # ×2 with guidance > 1); more is a 400. 3000 admits every request of the contract at guidance 1 with a
    # one-call sampler (2048² × 10 images × 70 steps = 2936); 1024², 4 steps, 1 image is 4.2. 0: no limit.
    max_request_work: float = Field(3000.0, ge=0)
    # Images in one batch; 0: auto, 4 on CUDA and 1 on a CPU (measured there: a batch of 4 is 0.92-1.04x as
    # fast as 4 single passes with exact batches, 0.71-0.91x as one forward pass, and it raises p99 latency).
    max_batch_images: int = Field(0, ge=0)
    batch_wait_ms: float = Field(0.0, ge=0)  # how long a lone request waits for company (GPU: try 5-20)
    prompt_cache_mb: float = Field(256.0, ge=0)  # prompt embeddings kept, by bytes
    task_ttl_s: float = Field(3600.0, ge=60)  # v2 results are kept this long after they finish
    # Stored results (v2 images, idempotent answers): per key (429 past it) and in all (503); 0: no budget. Checked
    # at submission, so tasks already accepted can add up to their own size each (10 × 2048² PNG ≈ 126 MB).
    storage_per_key_mb: float = Field(1024.0, ge=0)
    storage_total_mb: float = Field(20480.0, ge=0)
    # Speed and memory (engine/acceleration.py). "auto" turns an option on where it helps: on CUDA.
    fuse_qkv: Literal["auto", "on", "off"] = "auto"  # one matmul for Q, K and V in every attention
    compile: Literal["off", "regional", "full"] = "off"  # torch.compile: each transformer block, or the whole model
    channels_last_vae: Literal["auto", "on", "off"] = "auto"
    vae_tiling: Literal["auto", "on", "off"] = "auto"  # auto: tiles above 1536 pixels a side (2048² in 24 GB)
    offload: Literal["none", "model", "sequential"] = "none"  # CUDA only: keep idle components in CPU memory
    # Torch's CPU threads; 0: the cores this process may use. The server also sets OMP_WAIT_POLICY=PASSIVE unless
    # it is set, so idle OpenMP threads sleep instead of spinning against other processes (sd3serve/threads.py).
    threads: int = Field(0, ge=0)
    # Weight storage (engine/memory.py): "full" (the dtype), "fp8" (transformer and T5 in float8_e4m3fn, computed
    # in the dtype: half their memory), "t5-fp8" (T5 only).
    weights: Literal["full", "fp8", "t5-fp8"] = "full"
    # "off": the settings above as given; "auto" (the GPU's free memory) or a size in GiB: choose the fastest memory
    # mode (weights, offload) that fits, keeping T5 unless load_t5 is off; refuse to start when none fits.
    memory_budget: str = Field("off", pattern=r"^(off|auto|\d+(\.\d+)?)$")

    # Reliability and security.
    rate_limit_per_minute: int = Field(0, ge=0)  # generation requests per key and minute; 0: no limit
    admin_key: SecretStr | None = None  # enables the HTTP admin API (/admin/...); at least 32 characters
    heartbeat_s: float = Field(5.0, gt=0)  # a process silent for 3 heartbeats is dead; others settle its work
    shutdown_grace_s: float = Field(60.0, ge=0)  # on SIGTERM, how long running v2 tasks may take to finish
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Webhooks: a target must resolve to public addresses unless this allows private, loopback and link-local ones.
    webhook_allow_private: bool = False
    webhook_timeout_s: float = Field(10.0, gt=0)  # per delivery attempt
    # Sending (service/webhook_delivery.py): attempts in flight per process, of them at most this many per key and per
    # target host; an attempt's whole time (name, connect, send, the answer's head) is webhook_timeout_s.
    webhook_concurrency: int = Field(32, ge=1)
    webhook_per_key: int = Field(4, ge=1)
    webhook_per_host: int = Field(8, ge=1)
    public_url: str | None = None  # base for absolute URLs when behind a proxy; unset: from the request
    # Connections: slow, idle or numerous clients cannot hold the server (api/connections.py, api/middleware.py).
    header_timeout_s: float = Field(10.0, gt=0)  # a request's headers must arrive within this, or the connection closes
    body_timeout_s: float = Field(30.0, gt=0)  # a request's body must arrive within this after its headers, or 408
    keep_alive_s: int = Field(5, ge=1)  # an idle keep-alive connection closes after this
    max_connections: int = Field(1000, ge=0)  # open connections (and requests) past this get 503; 0: no cap
    forwarded_allow_ips: str = ""  # proxies trusted for X-Forwarded-For/-Proto: IPs or CIDRs, comma-separated; "": none
    # Streams (service/streams.py): open event streams and base64 result downloads, per key (429 past it) and per
    # process (503 past it; never more than half of max_connections, so streams leave room for every other request).
    max_streams_per_key: int = Field(8, ge=1)
    max_streams: int = Field(256, ge=1)
    # A response whose client takes no data for this long (the server's send buffer stays full) is cut off.
    write_timeout_s: float = Field(60.0, gt=0)

    # Image-to-image inputs (api/images_in.py): a file's bytes, its pixels and its longer side, checked from its
    # header before it is decoded; a URL is fetched within the timeout, from public addresses only (the webhook
    # guard: SD3SERVE_WEBHOOK_ALLOW_PRIVATE). Routes that take an image accept bodies up to max_image_body_bytes.
    max_image_bytes: int = Field(10 * 2**20, ge=1024)
    max_image_pixels: int = Field(4096 * 4096, ge=64 * 64)
    max_image_side: int = Field(8192, ge=64)
    image_fetch_timeout_s: float = Field(10.0, gt=0)
    max_image_body_bytes: int = Field(16 * 2**20, ge=1024)
    # LoRA adapters (engine/lora.py): *.safetensors in this directory, by file name; loaded on demand into an LRU
    # cache of lora_cache_mb (weights as loaded, float32 on the CPU).
    lora_dir: Path | None = None
    lora_cache_mb: float = Field(512.0, ge=0)

    # CPU performance (docs/performance.md). glibc malloc keeps freed memory instead of giving it back after every
    # image (the process stays at its peak RSS); "auto": on a CPU device, off on CUDA.
    malloc_tuning: Literal["auto", "on", "off"] = "auto"
    # torch threads while encoding and denoising / while decoding, per model worker; 0: auto (CPU: one thread for
    # a small transformer, whose ops are too small to share; the decode gets the worker's share of the cores).
    # CUDA: torch's setting is left as it is.
    denoise_threads: int = Field(0, ge=0)
    decode_threads: int = Field(0, ge=0)
    # Model workers per process: requests run on this many threads at once, sharing the weights (each needs its
    # own activations). 0: auto (on a CPU, one per core for a small transformer such as the demo's, else one;
    # CUDA: one).
    model_workers: int = Field(0, ge=0)
    # The VAE decoder's nearest-2x-then-3x3 upsamplers as one transposed convolution (engine/subpixel.py).
    vae_subpixel: Literal["auto", "on", "off"] = "auto"  # auto: on the CPU
    # The VAE decoder's resnet blocks with SiLU and the residual sum in place (engine/vae_inplace.py; same pixels).
    vae_inplace: Literal["auto", "on", "off"] = "auto"  # auto: on the CPU

    @field_validator("admin_key")
    @classmethod
    def _admin_key_strong(cls, v: SecretStr | None) -> SecretStr | None:
        if v is None or not v.get_secret_value():
            return None
        key = v.get_secret_value()
        if len(key) < 32 or len(set(key)) < 10:
            raise ValueError(
                'the admin key is too weak: use at least 32 random characters, e.g. `python -c "import secrets; '
                'print(secrets.token_urlsafe(32))"`'
            )
        return v

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'sd3serve.db'}"
