#!/usr/bin/env python
"""Take the random initial weights out of a plain EMA (a run trained without EMA warm-up): the
entry point of fewstep.training.debias_ema (its docstring says how)."""
import sys

from fewstep.training.debias_ema import main

if __name__ == "__main__":
    sys.exit(main())
