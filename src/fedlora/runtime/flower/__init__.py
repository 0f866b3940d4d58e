"""The Flower runtime: fedlora's Federation driven over Flower's Deployment Engine.

``wire`` turns tasks, results and base updates into Flower records and ``settings`` holds the
apps' run and node configuration; ``clients`` reaches the clients' SuperNodes (identification,
replicas' catch-up from the base log, client-side evaluation) and ``server`` runs the rounds
over a Grid; ``server_app`` and ``client_app`` are the Flower apps; ``deployment`` starts a
local SuperLink and SuperNodes (or connects to existing ones) and submits runs.

Nothing is imported here: a ClientApp process should load only what it uses.
"""
