"""The command-line tools on the device: ovseg-run, ovseg-check, ovseg-build and the demo."""
