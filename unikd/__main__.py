"""``python -m unikd``: the same as the ``unikd`` command."""

from unikd.cli import main

raise SystemExit(main())
