"""`python -m distill …` = the `distill` console command."""

from distill.cli import main

raise SystemExit(main())
