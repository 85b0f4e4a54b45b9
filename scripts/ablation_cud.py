"""The CUD ablation (docs/RESULTS.md): the entry point of fewstep.experiments.ablation_cud."""
import sys

from fewstep.experiments.ablation_cud import main

if __name__ == "__main__":
    sys.exit(main())
