"""Subcommands that ship a trained run: merge, predict and serve."""

from __future__ import annotations

import argparse


def add_ship_commands(commands: argparse._SubParsersAction) -> dict:
    """Register the ship subcommands on ``commands``; return {name: handler}."""
    return {}
