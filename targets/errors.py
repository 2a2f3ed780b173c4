"""Errors about target profiles (all under the one `TvmdeployError` a caller catches)."""

from tvmdeploy.runtime.errors import TvmdeployError


class ProfileError(TvmdeployError):
    """A profile file is malformed."""


class UnknownTargetError(ProfileError):
    """A profile name that has no TOML file; the message lists the known names."""


class NoProfileFitsError(ProfileError):
    """`host` was asked for, but no profile's `requires` is met by this machine."""
