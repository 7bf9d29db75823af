"""The precision-sweep study: tasks, runs, sweeps and stability reports (uses lowprec and stosign)."""
