# Fault: exit 0 without writing any output.
