"""Suite-wide pytest setup: shared fixtures and an environment that never leaves loopback."""

import os

# botocore must never probe the cloud instance-metadata address for credentials.
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

pytest_plugins = ["tests.support.fixtures"]
