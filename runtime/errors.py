"""Error types a caller can catch, each with a message that says what to do next."""


class TvmdeployError(Exception):
    """Base of every error tvmdeploy raises on purpose."""


class BundleError(TvmdeployError):
    """A bundle is missing, unreadable, corrupt or from an incompatible format version."""


class IncompatibleDeviceError(TvmdeployError):
    """An artifact needs something this device lacks (a CPU feature, a GPU, another arch)."""


class InputError(TvmdeployError, ValueError):
    """Model inputs have the wrong names, dtype, rank, length or values."""


class RemoteError(TvmdeployError):
    """A remote device over TVM RPC is unreachable, busy, unknown to the tracker, or failed."""


class OptionError(TvmdeployError, ValueError):
    """Options that are malformed or do not go together (bad buckets, --rpc without --rpc-key)."""


class SignatureError(BundleError):
    """A bundle is unsigned, signed by a key that is not trusted, or changed after signing."""
