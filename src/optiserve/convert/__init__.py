"""Import models from files or Python objects, and convert them to ONNX.

One module per source framework; `detect` decides which one a file or object belongs to.
"""
