#!/usr/bin/env python3
"""torchrun (python -m torch.distributed.run) with one repair for torch builds without libuv
(no_libuv.py: Debian's torch 2.14.1); same arguments, same agent, same failure reports."""

import sys

import no_libuv

no_libuv.patch()  # before the rendezvous modules import TCPStore

from torch.distributed.run import main  # noqa: E402  (imports the rendezvous modules after the patch)

if __name__ == "__main__":
    sys.exit(main())
