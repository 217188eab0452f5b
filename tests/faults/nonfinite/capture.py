# Fault: a well-formed output whose logits are NaN.
import os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fault_common

args = fault_common.parse_args()
fault_common.write_output(args.out_dir, args.tokens_file, vocab=384, logit=float("nan"))
