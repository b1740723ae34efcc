pytest_plugins = ["kubegfs_dev.pytest_plugin"]
