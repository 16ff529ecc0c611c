"""CPU and GPU kernels.

Importing any part of turnout first (``server``, ``engine`` and ``kernels`` all import this) makes
OpenMP's idle threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``, unless set): the
native decode step runs its own thread per core, and a PyTorch operator's OpenMP threads spinning
for milliseconds after it returns would take those cores (measured: a one-row step 2.2 -> 7.0 ms).
It only takes effect where torch was not imported before turnout.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
