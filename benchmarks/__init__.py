"""fmjax benchmarks: each compares implementations side by side in one run and reports ratios."""
