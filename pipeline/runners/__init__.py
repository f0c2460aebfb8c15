"""One runner per stage of the table in pipeline/stages.py: read the stage's inputs, call the
pure step, write its outputs, return its summary. A runner touches only the files its table
entry declares (`files[name]`), so `d2d stage NAME` (the DVC stages) and the Prefect tasks,
which both call these, produce the same files. One module per group of stages, so that each
stage's DVC code dependency is its own runner's module: editing the evaluate runner does not
rerun training."""
