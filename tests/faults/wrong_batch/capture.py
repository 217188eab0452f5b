# Fault: well-formed logits, but for another batch (one row instead of the requested batch).
import json, os, sys, tempfile
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fault_common

args = fault_common.parse_args()
with open(args.tokens_file) as f:
    first_row = {"input_ids": [json.load(f)["input_ids"][0]]}
tmp = os.path.join(args.out_dir, "one-row.json")
with open(tmp, "w") as f:
    json.dump(first_row, f)
fault_common.write_output(args.out_dir, tmp, vocab=384, logit=0.0)
