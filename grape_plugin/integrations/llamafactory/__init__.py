"""GRAPE for LLaMA-Factory: a ``grape`` key in a ``dataset_info.json`` entry selects that dataset's responses.

    "pooled_sft": {"file_name": "pooled.json", "grape": {"top_k": 1}}

    grape-plugin llamafactory train config.yaml [key=value ...]     # select, then train (every rank)
    grape-plugin llamafactory select config.yaml -o DIR             # or write the selection for llamafactory-cli

See README.md in this folder. ``llamafactory-cli`` itself ignores the key and trains on every row. The host is in
``host.py`` with the commands' flows (registered by ``commands.py``), LLaMA-Factory's internals in ``compat.py``.
"""
