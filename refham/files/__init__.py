"""Everything that touches the disk or guards the machine: memory budgets checked before an
allocation, output paths checked before work, size-checked readers of hostile files, atomic and
verified checkpoints, one writer per run folder, and the readers of the data sets' own formats.
Imports the specification only for the names and shapes of parameters."""
