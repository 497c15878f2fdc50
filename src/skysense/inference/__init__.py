"""Inference on whole scenes: streaming, resumable embedding into GeoTIFF/Zarr, and export.

Modules: :mod:`~skysense.inference.scene` (inputs of every modality read window by window onto one
grid), :mod:`~skysense.inference.windows` (window lattice, output blocks, blending weights),
:mod:`~skysense.inference.embed` (the streaming embedder), :mod:`~skysense.inference.writers`
(COG / Zarr block writers with a progress sidecar), :mod:`~skysense.inference.predict` (class
maps of a fine-tuned segmentation or change model and a classifier's labelled tiles, the same
way), :mod:`~skysense.inference.detect` (a fine-tuned detector's objects as GeoJSON, window by
window, resumable), :mod:`~skysense.inference.polygons` (a class map's regions as GeoJSON
polygons), :mod:`~skysense.inference.zonal` (an embedding per region of a GeoJSON),
:mod:`~skysense.inference.similarity` (every pixel's cosine similarity to examples),
:mod:`~skysense.inference.preview` (PCA
false-colour PNG), :mod:`~skysense.inference.export` (ONNX and ``torch.export`` programs of the
encoders).
"""

from skysense.inference.detect import DetectOptions, DetectReport, detect_scene
from skysense.inference.embed import EmbedOptions, EmbedReport, embed_scene
from skysense.inference.polygons import PolygonReport, class_map_polygons
from skysense.inference.predict import predict_scene
from skysense.inference.scene import Frame, Grid, Scene, resolve_frames, s2_frame_offsets
from skysense.inference.similarity import SimilarityReport, similarity_map
from skysense.inference.windows import WindowPlan
from skysense.inference.zonal import EmbeddingRaster, ZonalReport, region_embeddings

__all__ = [
    "DetectOptions",
    "DetectReport",
    "EmbedOptions",
    "EmbedReport",
    "EmbeddingRaster",
    "Frame",
    "Grid",
    "PolygonReport",
    "Scene",
    "SimilarityReport",
    "WindowPlan",
    "ZonalReport",
    "class_map_polygons",
    "detect_scene",
    "embed_scene",
    "predict_scene",
    "region_embeddings",
    "resolve_frames",
    "s2_frame_offsets",
    "similarity_map",
]
