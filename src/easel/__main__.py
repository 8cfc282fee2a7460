"""``python -m easel``: the command line, as the ``easel`` script."""

from easel.cli import app

app(prog_name="easel")
