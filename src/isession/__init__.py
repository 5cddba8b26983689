"""isession: start interactive HPC sessions with the hpc.interactive Ansible collection."""

__version__ = "0.1.0"
