"""What runs inside Ray actors: the model, the engine, the Frontend and the ExpertShard.

Importing this package before torch allocates its first tensor turns on PyTorch's transparent-huge-page
allocation (``THP_MEM_ALLOC_ENABLE``, read once per process): the model's large temporaries (a prefill
step's activations, the experts' gathered rows) then come in 2 MiB pages instead of being faulted in 4 KiB at
a time, which made fresh multi-megabyte tensors several times slower to fill than to compute
(docs/performance.md). An explicit setting in the environment wins.
"""

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
