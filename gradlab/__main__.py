"""``python -m gradlab`` is the ``gradlab`` command."""

from gradlab.cli import main

raise SystemExit(main())
