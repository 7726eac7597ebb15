"""``python -m distac`` (and ``accelerate launch -m distac``) run the CLI."""

from .cli import main

main()
