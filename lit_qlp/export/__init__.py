"""Library code behind the tools/ scripts: conversions and analyses of trained adapters."""
