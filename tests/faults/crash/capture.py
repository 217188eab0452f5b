# Fault: the interpreter dies by a signal (as a segfaulting extension would).
import os, signal
os.kill(os.getpid(), signal.SIGSEGV)
