"""kubegfs: a GFS-style file system (one master, many chunkservers) with point-in-time
directory snapshots, built to run on Kubernetes."""

__version__ = "0.1.0"
