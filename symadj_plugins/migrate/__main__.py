"""``python -m symadj_plugins.migrate``: exits 2 with a clear message when libcst (the ``migrate`` extra) is missing."""

import sys

from . import missing_libcst_message

if __name__ == "__main__":
    message = missing_libcst_message()
    if message is not None:
        print(f"symadj-migrate: error: {message}", file=sys.stderr)
        sys.exit(2)
    from .cli import main

    sys.exit(main())
