"""Build-machine tooling around the bundles: cross-device reports and the baselines of
`bench --compare`."""
