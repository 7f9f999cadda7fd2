"""phase2_meta: not built yet (see the open issue); this stub exits 2 and writes nothing."""

import sys

if __name__ == "__main__":
    print("phase2_meta.py: not built yet", file=sys.stderr)
    sys.exit(2)
