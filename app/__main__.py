"""`python -m app` is the `unblock` command."""

from app.cli import main

main()
