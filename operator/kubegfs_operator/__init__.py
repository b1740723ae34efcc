"""The kubegfs operator: Snapshot and Restore custom resources (kopf).

``main`` holds every ``@kopf.on`` registration and nothing else of substance; ``api`` parses
specs into typed values; ``objects`` builds statuses and conditions (pure); ``cluster`` turns
pods and nodes into a topology view; ``reconcile`` decides what to do.
"""

GROUP = "kubegfs.io"
VERSION = "v1alpha1"
FINALIZER = "kubegfs.io/finalizer"
