"""``sd3serve serve | generate | keys ...``"""

from __future__ import annotations

import argparse
import logging
import sys
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from sd3serve.settings import Settings
from sd3serve.threads import configure_threads

# Flags of `serve` and `generate`, each the same as a Settings field (and an SD3SERVE_* variable).
_SETTING_FLAGS: list[tuple[str, dict[str, Any]]] = [
    (
        "--model",
        {"type": Path, "help": "diffusers directory or single-file SD3 checkpoint (default: demo model)"},
    ),
    (
        "--model-config-dir",
        {"type": Path, "help": "configs + tokenizers (diffusers layout) for a single file"},
    ),
    ("--device", {"choices": ["auto", "cpu", "cuda"]}),
    ("--dtype", {"choices": ["auto", "float32", "float16", "bfloat16"]}),
    ("--no-t5", {"dest": "load_t5", "action": "store_const", "const": False, "help": "don't load T5"}),
    ("--weights", {"choices": ["full", "fp8", "t5-fp8"], "help": "weight storage: fp8 halves transformer and T5"}),
    ("--memory-budget", {"help": "auto (the GPU's free memory) or GiB: pick the fastest memory mode that fits"}),
    ("--data-dir", {"type": Path, "help": "where the SQLite store and the cached demo model live"}),
    ("--database-url", {"help": "SQLAlchemy URL, e.g. postgresql://user@host/db (default: SQLite)"}),
    ("--threads", {"type": int, "help": "torch's CPU threads (default 0: the cores this process may use)"}),
]
_SERVE_FLAGS: list[tuple[str, dict[str, Any]]] = [
    ("--host", {}),
    ("--port", {"type": int}),
    ("--price-per-image", {"type": Decimal}),
    ("--max-body-bytes", {"type": int}),
    ("--max-queue", {"type": int, "help": "requests waiting for the model; more get 503"}),
    ("--max-batch-images", {"type": int, "help": "images in one batch"}),
    ("--log-level", {"choices": ["debug", "info", "warning", "error"]}),
]


def _add_flags(p: argparse.ArgumentParser, flags: list[tuple[str, dict[str, Any]]]) -> None:
    for flag, kw in flags:
        p.add_argument(flag, default=None, **kw)


def _settings(args: argparse.Namespace) -> Settings:
    fields = Settings.model_fields
    overrides = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    return Settings(**overrides)


def _amount(text: str, *, positive: bool) -> Decimal:
    from sd3serve.api.amounts import amount_error

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

    app = create_app(settings)
    uvicorn.run(app, **uvicorn_options(settings))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _configure_logging("warning")
    configure_threads(settings)  # first: before anything imports torch
    from sd3serve.api.schemas import parse_txt2img
    from sd3serve.engine.pipeline import build_pipeline
    from sd3serve.errors import InvalidRequest
    from sd3serve.imaging import encode_image

    body = {
        k: getattr(args, k)
        for k in (
            "steps",
            "guidance_scale",
            "seed",
            "sampler",
            "scheduler",
            "width",
            "height",
            "aspect_ratio",
            "batch_size",
        )
        if getattr(args, k) is not None
    }
    out: Path = args.output
    fmt = {".png": "png", ".webp": "webp"}.get(out.suffix.lower(), "jpeg")
    body |= {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "image_format": fmt,
        "base64": True,
    }
    try:
        req = parse_txt2img(body)
    except InvalidRequest as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    job = req.to_job()
    result = build_pipeline(settings)(job)  # the engine exactly as `serve` builds it
    for i, image in enumerate(result.images):
        path = out if len(result.images) == 1 else out.with_stem(f"{out.stem}-{i}")
        path.write_bytes(encode_image(image, req.image_format, req.image_quality))
        print(path)
    print(f"seed {job.seed}, " + ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items()), file=sys.stderr)
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from sd3serve.errors import InvalidRequest, NotFound
    from sd3serve.store.credits import CreditStore

    settings = _settings(args)
    store = CreditStore(settings.resolved_database_url)
    store.create_schema()
    try:
        if args.keys_cmd == "create":
            _, plaintext = store.create_key(credits=args.credits, name=args.name or "")
            print(plaintext)  # alone on stdout: `KEY=$(sd3serve keys create --credits 100)`
        elif args.keys_cmd == "list":
            print(f"{'id':>4}  {'prefix':<12} {'credits':>12} {'spent':>12}  {'status':<8} name")
            for k in store.list_keys():
                status = "revoked" if k.revoked else "active"
                print(f"{k.id:>4}  {k.prefix:<12} {k.credits:>12g} {k.spent:>12g}  {status:<8} {k.name}")
        elif args.keys_cmd == "add-credits":
            try:
                k = store.add_credits(key_id=args.key_id, credits=args.credits)
            except InvalidRequest as e:  # the balance would overflow
                print(f"error: {e}", file=sys.stderr)
                return 2
            print(f"key {k.id}: {k.credits:g} credits")
        elif args.keys_cmd == "revoke":
            k = store.revoke(key_id=args.key_id)
            print(f"key {k.id} revoked")
    except NotFound as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        store.close()
    return 0


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
    parser = argparse.ArgumentParser(prog="sd3serve", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)

    serve = sub.add_parser("serve", help="start the HTTP server")
    _add_flags(serve, _SETTING_FLAGS + _SERVE_FLAGS)
    serve.add_argument(
        "--replicas", type=int, default=0, metavar="N",
        help="run N replicas on Ray Serve, one per GPU (needs sd3serve[ray]); 0: one process, no Ray",
    )  # fmt: skip
    serve.set_defaults(func=cmd_serve)

    gen = sub.add_parser("generate", help="generate an image from the command line")
    gen.add_argument("prompt")
    gen.add_argument("-o", "--output", type=Path, default=Path("out.jpg"), help="file; .jpg, .png or .webp")
    gen.add_argument("--negative-prompt", default="low quality, blurry")
    for flag, typ in (
        ("--steps", int),
        ("--guidance-scale", float),
        ("--seed", int),
        ("--sampler", str),
        ("--scheduler", str),
        ("--width", int),
        ("--height", int),
        ("--aspect-ratio", str),
        ("--batch-size", int),
    ):
        gen.add_argument(flag, type=typ, default=None)
    _add_flags(gen, _SETTING_FLAGS)
    gen.set_defaults(func=cmd_generate)

    plan = sub.add_parser("plan", help="GPU memory each memory mode needs for a model, from its configs")
    plan.add_argument("--model", type=Path, help="diffusers directory (configs only are enough; default: demo model)")
    plan.add_argument("--budget", type=float, action="append", help="GiB to check (repeatable; default 24 and 16)")
    plan.add_argument("--prompt-cache-mb", type=float, default=256.0, help="as SD3SERVE_PROMPT_CACHE_MB")
    plan.set_defaults(func=cmd_plan)

    keys = sub.add_parser("keys", help="manage API keys and credits")
    _add_flags(keys, [f for f in _SETTING_FLAGS if f[0] in ("--data-dir", "--database-url")])
    ksub = keys.add_subparsers(dest="keys_cmd", required=True)
    create = ksub.add_parser("create", help="create a key; prints it alone on stdout (shown only once)")
    create.add_argument("--credits", type=_credits, required=True)
    create.add_argument("--name", default="")
    ksub.add_parser("list", help="list keys with their balances")
    add = ksub.add_parser("add-credits", help="add credits to a key")
    add.add_argument("key_id", type=int)
    add.add_argument("credits", type=_added_credits)
    revoke = ksub.add_parser("revoke", help="revoke a key")
    revoke.add_argument("key_id", type=int)
    keys.set_defaults(func=cmd_keys)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
