"""kubegfs development tooling (distribution ``kubegfs-dev``, not part of the kubegfs wheel).

* :mod:`kubegfs_dev.controlplane`, :mod:`kubegfs_dev.sim`, :mod:`kubegfs_dev.stack`: a real local
  kube-apiserver, simulated nodes and pods, kubegfs and its operator on top of them.
* :mod:`kubegfs_dev.demo`: the Kubernetes half of ``make run`` / ``make up``.
* :mod:`kubegfs_dev.pytest_plugin`: the control-plane pytest fixtures.
* :mod:`kubegfs_dev.netfault`: a TCP proxy whose link can be cut (partition tests).
* :mod:`kubegfs_dev.chaos`: seeded chaos against a witness model (``make chaos``).
* :mod:`kubegfs_dev.bench`: the benchmark suite (``make bench``).
"""
