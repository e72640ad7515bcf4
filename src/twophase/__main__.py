"""``python -m twophase``: the same command as the ``twophase`` console script."""

from .cli import main

if __name__ == "__main__":
    main()
