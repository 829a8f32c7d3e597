"""The numbers the kernels share: the Triton kernels keep scores in base 2 (``log2(e)`` folded into
the scale, so the exponential is ``exp2``) and turn them back into a natural-log lse with
``ln 2``. The torch-op engine and the native engine keep natural-log scores and subtract the row
maximum before any change of base, so a score near the float32 maximum never overflows."""

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
