"""Analytic-Precond against CTM's preconditioning (docs/RESULTS.md): the entry point of
fewstep.experiments.compare_precond."""
import sys

from fewstep.experiments.compare_precond import main

if __name__ == "__main__":
    sys.exit(main())
