"""What runs inside the job container: the harness (``python -m trainers.harness``) and the
built-in trainers. This package must import nothing from gateway/, enclave/ or policies/: only
trainers/ is baked into the runtime image. :mod:`trainers.contract` is the in-container
contract shared with the site agent."""
