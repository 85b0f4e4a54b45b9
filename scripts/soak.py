"""A bounded soak of `fewstep serve`: mixed requests under load, one fault of each kind in turn, a
report. The soak itself is fewstep.serving.soak (its docstring says what it does)."""
import sys

from fewstep.serving.soak import main

if __name__ == "__main__":
    sys.exit(main())
