# Fault: exit 0 with an output file that is not safetensors.
import os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fault_common

args = fault_common.parse_args()
with open(os.path.join(args.out_dir, "output.safetensors"), "wb") as f:
    f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
