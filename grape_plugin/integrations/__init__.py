"""Host adapters (installed as ``grape_plugin.integrations``): thin layers over the GRAPE core."""
