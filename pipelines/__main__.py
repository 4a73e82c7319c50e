"""``python -m pipelines COMMAND ...`` is ``medseg COMMAND ...``: the one entry module of the command line.

torchrun starts it as ``torchrun --nproc-per-node N -m pipelines train CONFIG`` (or runs the ``medseg`` console
script: ``torchrun --nproc-per-node N $(which medseg) train CONFIG``). No other module of ``pipelines`` runs as
a script, so none is executed twice (once as ``__main__``, once when imported by its name).
"""

import sys

from pipelines.cli import main

sys.exit(main())
