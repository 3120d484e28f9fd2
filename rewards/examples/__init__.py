"""Example reward plug-ins (docs/rewards.md): `plugin:1.0:rewards/examples/jpeg.py:JpegCompressibility` and
`plugin:1.0:rewards/examples/aesthetic.py:Aesthetic` (or `rewards.examples.jpeg:JpegCompressibility` as a module)."""
