"""`python -m book [--profile small] [--publish-only]`: run every chapter and publish (book.chapters.main)."""

import sys

from book.chapters import main

if __name__ == "__main__":
    sys.exit(main())
