"""``python -m streamrec`` = the ``streamrec`` command (used to spawn workers with the same interpreter)."""

from streamrec.cli import main

main()
