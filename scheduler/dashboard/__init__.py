"""The admin dashboard: the live cluster in a browser, served by the scheduler over HTTPS.

Pure views (:mod:`.fleet`, :mod:`.topology_tree`) turn the replica's model into
what pages show; :mod:`.cluster_view` reads the model and the store;
:mod:`.live` pushes changes to open pages; :mod:`.app` holds the handlers and
:mod:`.server` the listener. Wired in ``scheduler.__main__``.
"""
