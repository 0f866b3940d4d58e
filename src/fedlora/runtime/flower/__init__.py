"""The Flower runtime: fedlora's Federation driven over Flower's Deployment Engine.

``codec`` turns tasks, results and base updates into Flower records; ``strategy`` drives the
Federation over a Grid; ``server_app`` and ``client_app`` are the Flower apps; ``deployment``
starts a local SuperLink and SuperNodes (or connects to existing ones) and submits runs.

Nothing is imported here: a ClientApp process should load only what it uses.
"""
