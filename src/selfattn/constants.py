"""The numbers every engine and kernel shares: scores are kept in base 2 (``log2(e)`` folded into
the scale, so the exponential is ``exp2``) and turned back into natural-log lse with ``ln 2``."""

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
