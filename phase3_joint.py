"""phase3_joint: not built yet (see the open issue); this stub exits 2 and writes nothing."""

import sys

if __name__ == "__main__":
    print("phase3_joint.py: not built yet", file=sys.stderr)
    sys.exit(2)
