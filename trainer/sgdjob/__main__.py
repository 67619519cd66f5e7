"""`python -m sgdjob` is the `sgdjob` command."""

from sgdjob.cli import main

raise SystemExit(main())
