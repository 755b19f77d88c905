"""Bridges to other frameworks, each imported only when asked for (they are optional
dependencies): `detr_sparse.integrations.detectron2`."""
