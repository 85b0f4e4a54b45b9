"""Ship a checkpoint as a demo model (demo/models/<name>/): the entry point of
fewstep.export.ship_demo_models (its docstring shows the commands)."""
import sys

from fewstep.export.ship_demo_models import main

if __name__ == "__main__":
    sys.exit(main())
