"""Entry points: the `mpq` command and the local, Slurm and Ray-cluster launchers."""
