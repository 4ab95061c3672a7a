"""``python -m broker`` is the ``credential-broker`` command."""

from broker.cli import main

raise SystemExit(main())
