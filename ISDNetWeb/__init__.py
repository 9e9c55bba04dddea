"""ISDNet in the browser: the train-and-segment workflow served by trame-slicer.

``app`` (the server: life cycle, state and the page's actions), ``page`` (its layout) and ``session`` (the workflow
over ``ISDNetLib``'s train and segment logic) need trame-slicer and Slicer's MRML; ``guard`` limits what a websocket
client may send (wslink); ``security`` (the workspace, uploads, the request gate) and ``chart`` are plain Python.
Started by ``isdnet-web`` (``cli``).
"""
