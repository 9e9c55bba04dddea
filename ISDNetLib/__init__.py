"""The Slicer side of ISDNet: logic that takes a MRML scene and has no GUI, shared by the ISDNet Train and
ISDNet Segment modules and the web app.

- ``export``: labeled and unlabeled volume nodes to a dataset folder the engine trains on;
- ``train``: ``TrainLogic``, a training child process followed into plot nodes;
- ``segment``: ``SegmentLogic``, a model applied to a volume node, the result imported as a segmentation;
- ``review``: an uncertainty map as an overlay, its most uncertain slices, a slice view jumped to one;
- ``suggest``: ``SuggestLogic``, which unlabeled volume to annotate next (``isdnet rank``), opened in the editor;
- ``child``: what the logics that run a short engine command as a child process share;
- ``volumes``: volume nodes to and from SimpleITK images on the exact same grid;
- ``runner``: the child-process runner the logics are given (tests inject their own);
- ``dependencies``: torch and the engine's packages, installed on first use inside Slicer.

It imports Slicer's MRML (``slicer``, ``vtk``) and ``isdnet.config``, never qt, ctk or torch, so it runs on
slicer-core and loads before torch is installed.
"""
