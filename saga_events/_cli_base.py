"""What every ``saga-events`` subcommand module shares: the ``main`` group and its options.

One job: the click group the commands register on (``cli.py`` the daily ones,
``cli_admin.py`` setup, acl and doctor), its common options and logging set-up,
so that the command modules import this and never each other in a circle.
"""

from __future__ import annotations

import logging
import sys

try:
    import click
except ImportError:  # pragma: no cover - exercised by hand
    sys.stderr.write(
        "saga-events: the CLI needs the server extra: pip install 'saga-events[server]'\n"
    )
    raise SystemExit(2) from None

from . import __version__

__all__ = [
    "click",
    "main",
    "namespace_option",
    "redis_option",
    "setup_logging",
    "verbose_option",
]


def setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(
        level=max(level, logging.DEBUG),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


redis_option = click.option(
    "--redis", "redis_url", envvar="SAGA_REDIS_URL", help="Redis URL (env SAGA_REDIS_URL)."
)
namespace_option = click.option(
    "--namespace", "-n", default="default", envvar="SAGA_NAMESPACE", show_default=True,
    help="Registry namespace (env SAGA_NAMESPACE).",
)  # fmt: skip
verbose_option = click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")


@click.group()
@click.version_option(__version__)
def main() -> None:
    """saga-events: push-based service registry on Redis."""
