"""``python -m gym_core.ui``: serve gym's web UI on a local address.

    python -m gym_core.ui                                  # http://127.0.0.1:7860
    python -m gym_core.ui --runs runs --port 8080 --serve-url http://127.0.0.1:8000

Pages: Runs (summaries, live curves, sweeps), New run, Data, Playground, Variants
(docs/guide.md, "The web UI"). Every asset is served by the installed packages: no
internet is needed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gym_core.ui", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="The Playground and Variants pages talk to a running "
                                       "python -m gym_core.serve (docs/serve.md).")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="default 7860; 0 picks a free port")
    p.add_argument("--runs", default="runs",
                   help="the runs folder the pages open (run.root; default: runs)")
    p.add_argument("--serve-url", default=os.environ.get("GYM_SERVE_URL", "http://127.0.0.1:8000"),
                   help="the gym_core.serve server the Playground and Variants pages use "
                        "(default: $GYM_SERVE_URL or http://127.0.0.1:8000)")
    p.add_argument("--api-key", default=os.environ.get("GYM_SERVE_API_KEY"),
                   help="the server's API key, if it has one (default: $GYM_SERVE_API_KEY)")
    p.add_argument("--token", default=os.environ.get("GYM_UI_TOKEN"),
                   help="the token every page and websocket needs (default: $GYM_UI_TOKEN, "
                        "else a new random one, printed in the address at start); '' turns "
                        "it off, on 127.0.0.1 only")
    args = p.parse_args(argv)
    from gym_core.serve.__main__ import is_loopback, refuse

    if not 0 <= args.port < 65536:
        refuse(f"--port {args.port} is not a port number (0..65535; 0 picks a free one)")
    if args.token is None:
        import secrets

        args.token = secrets.token_urlsafe(24)
    if not args.token and not is_loopback(args.host):
        refuse(f"--host {args.host} lets other machines in, and the UI launches processes: "
               "keep its token (leave --token out, or give one), or listen on 127.0.0.1")
    return args


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if importlib.util.find_spec("nicegui") is None:
        print("gym: error: python -m gym_core.ui needs NiceGUI: install gym's ui extra "
              "(pip install -e '.[ui]')", file=sys.stderr)
        return 2
    # NiceGUI switches to its own test harness when it sees pytest's variable (inherited
    # when a test or a CI step starts the UI as a program): this process is the real app.
    os.environ.pop("PYTEST_CURRENT_TEST", None)
    port = args.port or free_port(args.host)
    from gym_core.ui.app import start

    try:
        start(args.host, port, Path(args.runs), args.serve_url, args.api_key, args.token or None)
    except OSError as exc:  # the port is taken
        print(f"gym: error: cannot listen on {args.host}:{port}: {exc.strerror}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
