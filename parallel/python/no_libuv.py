"""TCPStore for torch builds without libuv (Debian's python3-torch 2.14.1).

torch's launcher and rendezvous code construct TCPStore in places without passing use_libuv
(torchrun's static and c10d rendezvous, the agent-store client of env://), so the C++ default
(libuv) fails on such builds with "use_libuv was requested but PyTorch was built without libuv
support". patch() makes TCPStore take its default from USE_LIBUV, as torch's env:// rendezvous
already does for the stores it builds itself. Nothing else changes.
"""

import os


def patch():
    import sys

    import torch.distributed as dist
    import torch.distributed.rendezvous  # noqa: F401

    # The module, not torch.distributed.rendezvous the function (`import ... as` would give that).
    rendezvous = sys.modules["torch.distributed.rendezvous"]

    base = dist.TCPStore
    if getattr(base, "_opensci_no_libuv", False):
        return

    class TCPStore(base):
        _opensci_no_libuv = True

        def __init__(self, *args, **kwargs):
            kwargs.setdefault("use_libuv", os.environ.get("USE_LIBUV", "1") == "1")
            super().__init__(*args, **kwargs)

    dist.TCPStore = TCPStore
    rendezvous.TCPStore = TCPStore
