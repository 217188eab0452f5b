# Fault: the remote code fails to import (hazard H1's message), reported like capture.py does.
import json, os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fault_common

args = fault_common.parse_args()
message = "cannot import name 'TransformersKwargs' from 'transformers.utils'"
with open(os.path.join(args.out_dir, "error.json"), "w") as f:
    json.dump({"stage": "load", "type": "ImportError", "message": message, "traceback": ""}, f)
print("ImportError: " + message, file=sys.stderr)
sys.exit(3)
