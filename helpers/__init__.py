"""Region-specific deep features from 3D CT with an inflated ImageNet DenseNet-121.

The pipeline is a straight line; each stage is one module with one small public function:

    io.load_scan -> regions.crop_regions -> extract.extract_features
        -> similarity.compare -> outputs.write_results

with the network built once by ``inflate.inflate_densenet121`` and reused for every region
and every scan. ``pipeline.run`` is the only end-to-end path; the CLI and the notebook call it
or its stages.
"""

__version__ = "0.1.0"
