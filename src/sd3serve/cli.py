"""``sd3serve serve | generate | keys ...``: the server, one-off generation, and API keys."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd3serve.settings import Settings
from sd3serve.threads import configure_threads

if TYPE_CHECKING:
    from sd3serve.ledger.keys import Keys

DESCRIPTION = """\
Stable Diffusion 3.5 Turbo text-to-image with Segmind's hosted HTTP API.

First picture:
  sd3serve keys create --credits 100        # prints a key: keep it
  sd3serve serve                            # http://127.0.0.1:8000/ is the playground, /docs the API
  sd3serve generate "a red circle on a blue background" -o circle.png

Every option of `serve` is also an environment variable SD3SERVE_<NAME> (SD3SERVE_PORT=8123); docs/settings.md
lists the ones without a flag. `serve` and `keys` must use the same --data-dir (or --database-url).
"""

# Flags of `serve` and `generate`, each the same as a Settings field (and an SD3SERVE_* variable).
_MODEL_FLAGS: list[tuple[str, dict[str, Any]]] = [
    ("--model", {"type": Path, "metavar": "PATH", "help": "diffusers directory or single-file SD3 checkpoint",
                 "shown_default": "the embedded demo model"}),
    ("--model-config-dir", {"type": Path, "metavar": "DIR",
                            "help": "configs and tokenizers (diffusers layout) for a single-file checkpoint"}),
    ("--device", {"choices": ["auto", "cpu", "cuda"], "help": "auto: CUDA if there is one"}),
    ("--dtype", {"choices": ["auto", "float32", "float16", "bfloat16"], "help": "auto: bf16 on CUDA, fp32 on a CPU"}),
    ("--no-t5", {"dest": "load_t5", "action": "store_const", "const": False, "help": "don't load the T5 encoder"}),
    ("--weights", {"choices": ["full", "fp8", "t5-fp8"], "help": "weight storage: fp8 halves transformer and T5"}),
    ("--memory-budget", {"metavar": "GIB",
                         "help": "auto (the GPU's free memory) or GiB: the fastest memory mode that fits"}),
    ("--threads", {"type": int, "metavar": "N", "help": "torch's CPU threads; 0: the cores this process may use"}),
    ("--lora-dir", {"type": Path, "metavar": "DIR", "help": "LoRA adapters (*.safetensors) requests may name"}),
]
_STORE_FLAGS: list[tuple[str, dict[str, Any]]] = [
    ("--data-dir", {"type": Path, "metavar": "DIR", "help": "where the SQLite database (sd3serve.db) lives"}),
    ("--database-url", {"metavar": "URL", "help": "SQLAlchemy URL, e.g. postgresql://user@host/db",
                        "shown_default": "SQLite in the data dir"}),
]
_SERVE_FLAGS: list[tuple[str, dict[str, Any]]] = [
    ("--host", {"help": "address to listen on (0.0.0.0: every interface)"}),
    ("--port", {"type": int}),
    ("--price-per-image", {"type": Decimal, "help": "credits one image costs"}),
    ("--max-body-bytes", {"type": int, "help": "request bodies above this are 413"}),
    ("--max-queue", {"type": int, "help": "requests waiting for the model; more get 503"}),
    ("--max-batch-images", {"type": int, "help": "images in one batch; 0: 4 on CUDA, 1 on a CPU"}),
    ("--log-level", {"choices": ["debug", "info", "warning", "error"]}),
]
_SETTING_FLAGS = _MODEL_FLAGS + _STORE_FLAGS  # kept for callers that add them all
IMAGE_FORMATS = {".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png", ".webp": "webp"}


def _setting_help(dest: str, text: str | None, *, switch_off: bool = False, shown: object = None) -> str:
    """The flag's help with its default and its environment variable."""
    env = f"SD3SERVE_{dest.upper()}"
    if switch_off:  # a flag that turns a setting off
        return f"{text} (env {env}=false)"
    if shown is None:
        shown = Settings.model_fields[dest].get_default(call_default_factory=True)
        shown = "unset" if shown is None else shown
    return f"{text} (default: {shown}; env {env})" if text else f"default: {shown}; env {env}"


def _add_flags(p: argparse.ArgumentParser, flags: list[tuple[str, dict[str, Any]]], title: str | None = None) -> None:
    group = p.add_argument_group(title) if title else p
    for flag, options in flags:
        kw = dict(options)
        dest = kw.get("dest", flag.removeprefix("--").replace("-", "_"))
        shown = kw.pop("shown_default", None)
        kw["help"] = _setting_help(dest, kw.get("help"), switch_off=kw.get("action") == "store_const", shown=shown)
        group.add_argument(flag, default=None, **kw)


def _settings(args: argparse.Namespace) -> Settings:
    fields = Settings.model_fields
    overrides = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    return Settings(**overrides)


def _amount(text: str, *, positive: bool) -> Decimal:
    from sd3serve.service.amounts import amount_error

    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if error := amount_error(value, positive=positive):
        raise argparse.ArgumentTypeError(error)
    return value


def _credits(text: str) -> Decimal:
    return _amount(text, positive=False)


def _added_credits(text: str) -> Decimal:
    return _amount(text, positive=True)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _configure_logging(settings.log_level)
    if args.replicas:  # Ray Serve: each replica sets its own threads before it loads torch
        try:
            from sd3serve.scaleout import serve_forever
        except ImportError as e:
            print(f"error: --replicas needs Ray Serve ({e}): pip install 'sd3serve[ray]'", file=sys.stderr)
            return 2
        return serve_forever(settings, replicas=args.replicas)
    configure_threads(settings)  # first: before anything imports torch
    import uvicorn

    from sd3serve.api.app import create_app
    from sd3serve.api.connections import uvicorn_options

    failures: list[BaseException] = []

    def stop(error: BaseException) -> None:  # the model could not be loaded: nothing to serve
        failures.append(error)
        signal.raise_signal(signal.SIGINT)  # uvicorn shuts down gracefully, then re-raises it as KeyboardInterrupt

    try:
        uvicorn.run(create_app(settings, on_start_failure=stop), **uvicorn_options(settings))
    except KeyboardInterrupt:
        if not failures:
            raise
    return 1 if failures else 0


# The request fields `generate` takes, as the API has them (image_format comes from the output's extension).
GENERATE_FIELDS = ("negative_prompt", "steps", "guidance_scale", "seed", "sampler", "scheduler", "width", "height",
                   "aspect_ratio", "batch_size", "image_quality")  # fmt: skip


class ProgressBar:
    """The denoising steps, then the decode, on stderr: one line redrawn on a terminal, a line each elsewhere."""

    WIDTH = 30

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()

    def show(self, text: str, *, last: bool = False) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K" + text + ("\n" if last else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def step(self, done: int, total: int) -> None:
        bar = "#" * (self.WIDTH * done // max(total, 1))
        after = ", decoding..." if done == total else ""
        self.show(f"[{bar:<{self.WIDTH}}] step {done}/{total}{after}")


def _generate_warnings(args: argparse.Namespace, req: Any, fmt: str) -> list[str]:
    """Options that were given but change nothing, and sizes that are changed."""
    from sd3serve.api.schemas import ASPECT_RATIOS

    warnings = []
    if args.negative_prompt is not None and req.guidance_scale <= 1:
        warnings.append("--negative-prompt is unused at --guidance-scale 1 (it takes effect above 1)")
    preset = ASPECT_RATIOS[req.aspect_ratio.value]
    if preset and (args.width is not None or args.height is not None):
        size = f"{preset[0]}x{preset[1]}"
        warnings.append(f"--width/--height are ignored: --aspect-ratio {req.aspect_ratio.value} sets {size}")
    elif not preset and req.width is not None and req.height is not None and (req.width, req.height) != req.size():
        w, h = req.size()
        warnings.append(f"sizes are rounded down to a multiple of 16: {req.width}x{req.height} is generated as {w}x{h}")
    if args.image_quality is not None and fmt == "png":
        warnings.append("--image-quality is unused for PNG (lossless)")
    return warnings


def _lora_flag(text: str) -> dict[str, Any]:
    """``NAME`` or ``NAME:SCALE`` of --lora."""
    from sd3serve.errors import InvalidRequest

    name, _, scale = text.partition(":")
    try:
        return {"name": name, "scale": float(scale) if scale else 1.0}
    except ValueError:
        raise InvalidRequest(f"--lora {text!r}: give NAME or NAME:SCALE (a number)") from None


def cmd_generate(args: argparse.Namespace) -> int:
    settings = _settings(args)
    out: Path = args.output
    fmt = IMAGE_FORMATS.get(out.suffix.lower())
    if fmt is None:
        print(f"error: {out.name}: the format comes from the extension: {', '.join(IMAGE_FORMATS)}", file=sys.stderr)
        return 2
    from sd3serve.api.schemas import parse_img2img, parse_txt2img
    from sd3serve.engine.lora_names import check_adapters, lora_dir
    from sd3serve.errors import InvalidRequest

    body = {k: getattr(args, k) for k in GENERATE_FIELDS if getattr(args, k) is not None}
    body |= {"prompt": args.prompt, "image_format": fmt, "base64": True}
    try:
        body |= {"loras": [_lora_flag(text) for text in args.lora]} if args.lora else {}
        if args.image is not None:
            from sd3serve.api.images_in import decode_image

            body |= {"image": str(args.image)} | ({"strength": args.strength} if args.strength is not None else {})
            req: Any = parse_img2img(body)
            try:
                data = args.image.read_bytes()
            except OSError as e:
                raise InvalidRequest(f"--image {args.image}: cannot read it ({e.strerror or e})") from None
            if len(data) > settings.max_image_bytes:
                raise InvalidRequest(f"--image: over {settings.max_image_bytes} bytes")
            req.attach(decode_image(data, field="--image", settings=settings))
        else:
            if args.strength is not None:
                raise InvalidRequest("--strength needs --image")
            req = parse_txt2img(body)
        # an unknown adapter is refused before the model loads, as the server refuses it before any work
        check_adapters(lora_dir(settings), [lora["name"] for lora in body.get("loras", [])])
    except (InvalidRequest, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for warning in _generate_warnings(args, req, fmt):
        print(f"warning: {warning}", file=sys.stderr)
    _configure_logging("warning")
    configure_threads(settings)  # first: before anything imports torch
    from sd3serve.engine.pipeline import build_pipeline
    from sd3serve.imaging import encode_image

    bar = ProgressBar()
    bar.show(f"loading {settings.model or 'the demo model'}...")
    started = time.perf_counter()
    pipeline = build_pipeline(settings)  # the engine exactly as `serve` builds it
    loaded = time.perf_counter()
    job = req.to_job()
    bar.show(f"loaded in {loaded - started:.1f} s; {job.batch_size} image(s) of {job.width}x{job.height}", last=True)
    result = pipeline(job, progress=bar.step)
    bar.show(f"done in {time.perf_counter() - loaded:.2f} s", last=True)
    for i, image in enumerate(result.images):
        path = out if len(result.images) == 1 else out.with_stem(f"{out.stem}-{i}")
        path.write_bytes(encode_image(image, req.image_format, req.image_quality))
        print(path)
    phases = [k for k in ("encode", "denoise", "decode") if k in result.timings]  # timings also holds counts
    seconds = ", ".join(f"{k} {result.timings[k]:.2f} s" for k in phases)
    print(f"seed {job.seed}{' (image i: seed + i)' if job.batch_size > 1 else ''}; {seconds}", file=sys.stderr)
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from sd3serve.errors import InvalidRequest, NotFound
    from sd3serve.ledger import Database

    settings = _settings(args)
    db = Database.open(settings.resolved_database_url)
    where = _database_name(settings)
    try:
        db.create_schema()
        with db.transaction() as tx:
            return _keys(args, tx.keys, where)
    except InvalidRequest as e:  # an amount the ledger cannot keep, or a balance that would overflow
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NotFound as e:
        print(f"error: {e} (in {where})", file=sys.stderr)
        return 1
    finally:
        db.close()


def _keys(args: argparse.Namespace, keys: Keys, where: str) -> int:
    """One `keys` command, in one transaction."""
    if args.keys_cmd == "create":
        k, plaintext = keys.create(credits=args.credits, name=args.name or "")
        print(plaintext)  # alone on stdout: `KEY=$(sd3serve keys create --credits 100)`
        print(f"key {k.id} created in {where}: a server must use the same database", file=sys.stderr)
    elif args.keys_cmd == "list":
        listed = keys.all()
        if not listed:
            print(f"no keys in {where}; create one with `sd3serve keys create --credits 100`", file=sys.stderr)
            return 0
        print(f"{'id':>4}  {'prefix':<12} {'credits':>12} {'spent':>12}  {'status':<8} name")
        for k in listed:
            status = "revoked" if k.revoked else "active"
            print(f"{k.id:>4}  {k.prefix:<12} {k.credits:>12g} {k.spent:>12g}  {status:<8} {k.name}")
    elif args.keys_cmd == "add-credits":
        k = keys.add_credits(args.key_id, args.credits)
        print(f"key {k.id}: {k.credits:g} credits")
        if k.revoked:
            print(f"warning: key {k.id} is revoked: it cannot spend these credits", file=sys.stderr)
    elif args.keys_cmd == "revoke":
        if keys.get(args.key_id).revoked:
            print(f"warning: key {args.key_id} was already revoked; nothing changed", file=sys.stderr)
            return 0
        k = keys.revoke(args.key_id)
        print(f"key {k.id} revoked")
    return 0


def _database_name(settings: Settings) -> str:
    from sqlalchemy.engine import make_url

    return make_url(settings.resolved_database_url).render_as_string(hide_password=True)


def _request_help(name: str, text: str) -> str:
    """The flag's purpose, then what the API allows for the field (the request schema's own limits)."""
    from sd3serve.api.schemas import ALLOWED, Txt2ImgRequest

    default = Txt2ImgRequest.model_fields[name].default
    return f"{text}: {ALLOWED[name]} (default: {getattr(default, 'value', default)})".replace("%", "%%")


def cmd_plan(args: argparse.Namespace) -> int:
    from sd3serve.engine.loading import demo_model_dir
    from sd3serve.engine.memory import GiB, NoModeFits, memory_plan

    model_dir: Path = args.model or demo_model_dir()
    if not (model_dir / "model_index.json").exists():
        print(f"error: {model_dir}: needs a diffusers directory (its config files are enough)", file=sys.stderr)
        return 2
    plan = memory_plan(model_dir, prompt_cache_bytes=int(args.prompt_cache_mb * 2**20))
    budgets = tuple(args.budget or (24.0, 16.0))
    print(f"Memory plan for {model_dir} (GiB; bf16 compute; no weights read)\n")
    print(plan.components_table() + "\n")
    print(plan.table(budgets=budgets) + "\n")
    print(
        "Columns: peak GPU memory of one request at size² with N images in one forward pass (with exact batches,\n"
        "the default, the server passes one image at a time: the x1 columns). A mode fits a budget when\n"
        f"1.1 x peak + 0.5 GiB is within it; 'resident' is what stays on the GPU; prompt cache {args.prompt_cache_mb:g}"
        " MiB included.\n"
    )
    for budget in budgets:
        for with_t5 in (True, False):
            try:
                mode, _ = plan.choose(int(budget * GiB), size=2048, rows=1, with_t5=with_t5)
                choice = f"{mode.name} (--memory-budget {budget:g} chooses it{'' if with_t5 else ' with --no-t5'})"
            except NoModeFits as e:
                choice = f"none: {e}"
            print(f"{budget:g} GiB{'' if with_t5 else ', no T5'}: {choice}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="sd3serve", description=DESCRIPTION, formatter_class=formatter)
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="{serve,generate,keys}")

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=description, formatter_class=formatter)

    serve = command(
        "serve", "start the HTTP server (playground at /, docs at /docs)",
        "Start the HTTP server. HTTP answers at once; /readyz says 503 loading until the model is "
        "loaded and warmed up.\nThe log names the data directory, the database and the URLs.",
    )
    _add_flags(serve, _SERVE_FLAGS, "server")
    _add_flags(serve, _MODEL_FLAGS, "model")
    _add_flags(serve, _STORE_FLAGS, "keys and credits")
    serve.add_argument(
        "--replicas", type=int, default=0, metavar="N",
        help="run N replicas on Ray Serve, one per GPU (needs sd3serve[ray]); 0: one process, no Ray",
    )  # fmt: skip
    serve.set_defaults(func=cmd_serve)

    gen = command(
        "generate", "generate images here, without a server",
        "Generate images with the same engine as the server, and write them to a file.\n"
        "A batch writes NAME-0.jpg, NAME-1.jpg, ...; image i uses seed + i.",
    )
    gen.add_argument("prompt", help="what to draw (the demo model: e.g. 'a red circle on a blue background')")
    gen.add_argument("-o", "--output", type=Path, default=Path("out.jpg"),
                     help="the file; its extension sets the format: .jpg/.jpeg, .png or .webp (default: out.jpg)")
    request = gen.add_argument_group("request (the API's fields)")
    for flag, typ, text in (
        ("--negative-prompt", str, "what to avoid; used when --guidance-scale > 1"),
        ("--steps", int, "denoising steps"),
        ("--guidance-scale", float, "classifier-free guidance"),
        ("--seed", int, "image i uses seed + i"),
        ("--sampler", str, "a ComfyUI sampler name (docs/samplers.md)"),
        ("--scheduler", str, "a ComfyUI scheduler name"),
        ("--width", int, "pixels"),
        ("--height", int, "pixels"),
        ("--aspect-ratio", str, "custom (use --width/--height), or a preset"),
        ("--batch-size", int, "images"),
        ("--image-quality", int, "for .jpg and .webp"),
    ):
        name = flag.removeprefix("--").replace("-", "_")
        request.add_argument(flag, type=typ, default=None, help=_request_help(name, text))
    from sd3serve.api.schemas import ALLOWED as allowed
    from sd3serve.api.schemas import MAX_LORAS

    i2i = gen.add_argument_group("image-to-image and adapters")
    i2i.add_argument("--image", type=Path, metavar="PATH", help="start from this PNG, JPEG or WebP image")
    i2i.add_argument("--strength", type=float, metavar="S", help=f"with --image: {allowed['strength']} (default: 0.7)")
    i2i.add_argument("--lora", action="append", metavar="NAME[:SCALE]",
                     help=f"apply an adapter of --lora-dir (repeatable, at most {MAX_LORAS}; scale default 1)")
    _add_flags(gen, _MODEL_FLAGS, "model")
    gen.set_defaults(func=cmd_generate)

    plan = sub.add_parser("plan", help="GPU memory each memory mode needs for a model, from its configs")
    plan.add_argument("--model", type=Path, help="diffusers directory (configs only are enough; default: demo model)")
    plan.add_argument("--budget", type=float, action="append", help="GiB to check (repeatable; default 24 and 16)")
    plan.add_argument("--prompt-cache-mb", type=float, default=256.0, help="as SD3SERVE_PROMPT_CACHE_MB")
    plan.set_defaults(func=cmd_plan)

    keys = command(
        "keys", "manage API keys and credits",
        "Manage API keys and credits in the server's database: use the same --data-dir (or "
        "--database-url, or SD3SERVE_DATA_DIR / SD3SERVE_DATABASE_URL) as `sd3serve serve`.",
    )
    _add_flags(keys, _STORE_FLAGS)
    ksub = keys.add_subparsers(dest="keys_cmd", required=True, metavar="{create,list,add-credits,revoke}")
    create = ksub.add_parser("create", help="create a key; prints it alone on stdout (it is shown only this once)")
    create.add_argument("--credits", type=_credits, required=True, help="the key's starting balance")
    create.add_argument("--name", default="", help="a label for `keys list`")
    ksub.add_parser("list", help="list keys with their balances (never the keys themselves)")
    add = ksub.add_parser("add-credits", help="add credits to a key")
    add.add_argument("key_id", type=int, help="the key's id (from `keys list`)")
    add.add_argument("credits", type=_added_credits, help="credits to add (> 0)")
    revoke = ksub.add_parser("revoke", help="revoke a key: refused (401) from its next request on")
    revoke.add_argument("key_id", type=int, help="the key's id (from `keys list`)")
    keys.set_defaults(func=cmd_keys)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
