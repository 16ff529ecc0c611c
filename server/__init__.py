"""The HTTP gateway.

Importing it (``turnout serve`` does, before torch loads) makes OpenMP's idle threads sleep
instead of spinning (``OMP_WAIT_POLICY=PASSIVE``, unless set): the native decode step runs its own
thread per core, and a PyTorch operator's OpenMP threads spinning for milliseconds after it returns
would take those cores (measured: a one-row step 2.2 -> 7.0 ms). OpenMP reads it once, when it
loads, so it only takes effect where torch was not imported first; and it holds for every OpenMP
user in the process (llama.cpp's binding shares the library), which is why only the server sets it.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
