"""The command line every peer program of ``bench_peers.py`` shares: the same pair, data and budget."""

from __future__ import annotations

import argparse


def peer_parser(description: str | None) -> argparse.ArgumentParser:
    """``--teacher --student --data --output`` (required), ``--batch-size 8 --max-length 256 --max-steps 20
    --lr 5e-5``; a program adds its own flags after these."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("--teacher", "--student", "--data", "--output"):
        p.add_argument(name, required=True)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--max-steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=5e-5)
    return p
