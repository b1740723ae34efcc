pytest_plugins = ["kubegfs.testing.k8s"]
