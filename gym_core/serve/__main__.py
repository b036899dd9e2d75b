"""``python -m gym_core.serve``: serve a base model and its variants over an
OpenAI-compatible HTTP API.

    python -m gym_core.serve --base smollm2 --variants runs/a runs/b c=runs/c/final
    python -m gym_core.serve --base tiny --variants runs/          # every run in runs/

Each variant is addressed by the request's ``model`` field (the base by
``--served-model-name``, default the ``--base`` value). docs/serve.md has the API.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

DESCRIPTION = """\
Serve a base model and its variants (runs' BitDelta / DeltaQuant deltas and LoRA
adapters) over an OpenAI-compatible API: /v1/chat/completions, /v1/completions,
/v1/models, /health, and /v1/variants to add and remove variants while serving."""

EPILOG = """\
variants: PATH (a run directory: its delta/*.safetensors, else its LoRA adapter in final/;
a delta file; a LoRA adapter folder; or a folder of runs, one variant each, named after
the run) or NAME=PATH.
examples:
  python -m gym_core.serve --base smollm2 --variants runs/a runs/b
  python -m gym_core.serve --base tiny --variants runs/ --port 8001
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "a", "messages": [{"role": "user", "content": "What is 2 + 3?"}]}'
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gym_core.serve", description=DESCRIPTION,
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="smollm2",
                   help="smollm2 (default), tiny (gym's random test model) or a Hugging Face "
                        "model folder")
    p.add_argument("--variants", "--lora-modules", nargs="*", default=[], metavar="[NAME=]PATH",
                   help="variants to serve from the start (--lora-modules: vLLM's name for it)")
    p.add_argument("--served-model-name", default=None,
                   help="the base model's name in requests (default: the --base value, or "
                        "the folder's name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--max-num-seqs", type=int, default=64,
                   help="requests decoded together at most (the rest wait)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=True,
                   help="keep the keys and values of prompt starts that requests share (a "
                        "system prompt, few-shot examples) and run them once (vLLM's "
                        "automatic prefix caching; default on, at most 256 MiB)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context length in tokens (default: the model's)")
    p.add_argument("--api-key", default=os.environ.get("GYM_SERVE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes "
                        "(default: $GYM_SERVE_API_KEY; unset: no key)")
    p.add_argument("--variant-dirs", nargs="+", default=["runs"], metavar="FOLDER",
                   help="POST /v1/variants loads only from inside these folders (default: "
                        "runs, the runs folder); any other path is refused")
    p.add_argument("--max-body-bytes", type=int, default=4 * 2**20,
                   help="largest request body accepted (default 4 MiB); larger gets 413")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    args = p.parse_args(argv)
    if not 0 <= args.port < 65536:
        refuse(f"--port {args.port} is not a port number (0..65535; 0 picks a free one)")
    if args.max_body_bytes < 1024:
        refuse(f"--max-body-bytes {args.max_body_bytes} is too small: at least 1024")
    if not is_loopback(args.host) and not args.api_key:
        refuse(f"--host {args.host} lets other machines in, and the server has no API key: "
               "give one with --api-key (or $GYM_SERVE_API_KEY), or listen on 127.0.0.1")
    if args.max_num_seqs < 1:
        refuse(f"--max-num-seqs {args.max_num_seqs} must be at least 1")
    if args.max_model_len is not None and args.max_model_len < 2:
        refuse(f"--max-model-len {args.max_model_len} must be at least 2")
    return args


def refuse(message: str):
    """gym's one line for a bad command-line option, exit status 2."""
    print(f"gym: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine only (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def base_config(base: str):
    """--base -> gym's ModelConfig (smollm2, tiny, or model=local at a folder)."""
    from omegaconf import OmegaConf

    from gym_core.base.errors import GymError
    from gym_core.config.schema import MODEL_OPTIONS, ModelConfig

    if base in ("smollm2", "tiny"):
        return OmegaConf.structured(MODEL_OPTIONS[base])
    if not os.path.isdir(base):
        raise GymError(f"--base {base!r} is neither smollm2, tiny nor a model folder")
    return OmegaConf.structured(ModelConfig(source="local", path=os.path.abspath(base)))


def build(args: argparse.Namespace):
    """Load the base and the variants; return the ASGI app and its engine."""
    from gym_core.base.errors import GymError
    from gym_core.model.policy import describe, load_base
    from gym_core.plugin.startup import bootstrap
    from gym_core.serve.app import Server, create_app
    from gym_core.serve.engine import Engine
    from gym_core.serve.variants import Base, Registry, expand, load_variant

    plugins = bootstrap()
    cfg = base_config(args.base)
    name = args.served_model_name or (args.base if cfg.source != "local"
                                      else os.path.basename(os.path.normpath(args.base)))
    model, tok = load_base(cfg)
    # serving never trains: no autograd graphs (the engine thread also runs without grad;
    # grad mode is per thread, so an in-process server leaves the caller's alone)
    model.requires_grad_(False)
    base = Base.of(model, cfg, f"the base model ({describe(cfg)})")
    max_len = getattr(model.config, "max_position_embeddings", None) or 2048
    if args.max_model_len:
        if args.max_model_len > max_len:
            raise GymError(f"--max-model-len {args.max_model_len} is more than the model's "
                           f"{max_len} positions")
        max_len = args.max_model_len
    registry = Registry(name)
    for vname, path in expand(args.variants):
        variant = load_variant(vname, path, base, plugins)
        registry.add(variant)
        print(f"gym serve: variant {vname}: {variant.kind} from {variant.source} "
              f"({variant.nbytes / 2**20:.1f} MiB)", flush=True)
    engine = Engine(model, tok, max_rows=args.max_num_seqs, max_len=max_len,
                    prefix_cache_bytes=256 * 2**20 if args.enable_prefix_caching else 0)
    from pathlib import Path

    server = Server(engine=engine, registry=registry, base=base, tokenizer=tok, base_name=name,
                    plugins=plugins, api_key=args.api_key,
                    variant_dirs=[Path(d).expanduser() for d in args.variant_dirs],
                    max_body_bytes=args.max_body_bytes)
    return create_app(server), engine


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    import importlib.util

    from gym_core.base.errors import exit_on_user_error

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"gym: error: python -m gym_core.serve needs {' and '.join(missing)}: install "
              "gym's serve extra (pip install -e '.[serve]')", file=sys.stderr)
        return 2
    with exit_on_user_error():
        app, engine = build(args)
    import uvicorn

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal after shutting down; SIGINT / SIGTERM are the
            # normal way to stop a server, so end with status 0 instead
            self._captured_signals.clear()

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.servers and self.servers[0].sockets:
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                print(f"gym serve: listening on http://{host}:{port}/v1 (models: "
                      f"{', '.join(m['id'] for m in _models(app))})", flush=True)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=5)
    try:
        _Server(config).run()  # returns after SIGINT / SIGTERM
    finally:
        engine.stop()
    print("gym serve: stopped", flush=True)
    return 0


def _models(app) -> list[dict]:
    server = app.state.server
    return [{"id": server.base_name}] + [{"id": n} for n in server.registry.names()]


if __name__ == "__main__":
    sys.exit(main())
