"""``python -m ich_node.cli``: kept so commands and unit files written before the
CLI moved to :mod:`ich_node.service.cli` keep working (README, systemd units)."""

from ich_node.service.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
