"""The rtrain agent: runs on the GPU host, Python standard library only (>= 3.8).

Every call is `python3 <agent> VERB` with one JSON request on stdin and one JSON
reply on stdout (see protocol.py). The same package runs as `launcher.agent` and,
shipped as a zipapp, as `rtrain_agent`; it therefore uses relative imports only.
"""
