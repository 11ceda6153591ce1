"""``python -m moe_operator``: the same entry point as the ``moe-operator`` console script."""

from moe_operator.cli import main

raise SystemExit(main())
