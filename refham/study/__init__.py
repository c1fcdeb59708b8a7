"""The symmetry-breaking study (docs: symmetry-study): the plan of runs, running it resumably
over MPI ranks, and its tables and figures."""
