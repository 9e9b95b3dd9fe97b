"""``python -m dataloader.prepare DATASET --raw DIR ...``: see :mod:`dataloader.prepare`."""
import sys

from dataloader.prepare import main

if __name__ == "__main__":
    sys.exit(main())
