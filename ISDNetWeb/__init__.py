"""ISDNet in the browser: the train-and-segment workflow served by trame-slicer.

``app`` (the page) and ``session`` (the workflow over ``ISDNetLib``'s train and segment logic) need trame-slicer
and Slicer's MRML; ``security`` and ``chart`` are plain Python. Started by ``isdnet-web`` (``cli``).
"""
