"""`xlaserve version`."""

from __future__ import annotations

import argparse

import xlaserve


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser


def run(args: argparse.Namespace) -> int:
    del args
    print(f"xlaserve {xlaserve.__version__}")
    return 0
