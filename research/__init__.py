"""The project's studies: each module one question about token reduction, answered by measurement on the shipped
models (fair comparisons of the policies, where a calibration's gradient comes from, what an ideal relevance would
be, which selection rules hold, what the kept tokens contain, pruning then merging, one backbone for every
selection, whether a fine-tune closes the gap, a linear yardstick). Run them from the repository root as
`python -m research.NAME`; their write-ups are docs/research/, their results docs/results/. They may import the
library, `benchmarks` (the result tables) and `recipes`; nothing in the library imports them.
"""
